"""A run resumes only on the data it started with (``<run>/data_fingerprint.json``, ``identity.check_data``)."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from helpers import make_pairs, train_cfg
from qwen3train.data.hf import ends_digest
from qwen3train.errors import ConfigError
from qwen3train.train.loop import run


class Crash(Exception):
    pass


def crash_at(step):
    def hook(s):
        if s == step:
            raise Crash()
    return hook


def test_resume_on_changed_data_is_refused_unless_forced(tiny_model_dir, tmp_path, capsys):
    """Records appended after the crash change every later batch plan: refused, naming the file and both
    counts; a record edited in place (the same count) too, to the same length also; run.resume=force goes on with a note. A copy of
    the same bytes (a new time stamp, a new index) resumes as before, to the weights of a run never stopped.
    Would catch: a resume that silently trains on other batches, or a false alarm on a touched file."""
    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    original = data.read_bytes()
    full = run(train_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=6, save_every=2))

    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=2)
    with pytest.raises(Crash):
        run(cfg, hooks=crash_at(3))
    fp = json.loads((tmp_path / "r" / "data_fingerprint.json").read_text())["sources"]
    assert fp[0][0]["records"] == 48 and fp[0][0]["file"] == str(data)

    data.write_bytes(original + data.read_bytes().splitlines(keepends=True)[0])  # one record more
    with pytest.raises(ConfigError, match=rf"changed since this run started: {data}: 48 records then, 49 now\. "
                                          r"Resuming at step 2 .*run\.resume=force"):
        run(cfg)
    lines = original.decode().splitlines(keepends=True)
    data.write_text("".join(lines[:5]) + lines[5].replace("what is", "what was") + "".join(lines[6:]))
    with pytest.raises(ConfigError, match="48 records then and now, with other content"):
        run(cfg)
    # a negative edited in place to the same length: no offset, task or positive moves (the index's own digest
    # is the same), only the text a batch reads. Before the content digest, this resumed silently.
    data.write_text("".join(lines[:5]) + lines[5].replace("unrelated text", "UNRELATED TEXT") + "".join(lines[6:]))
    assert data.stat().st_size == len(original)
    with pytest.raises(ConfigError, match=rf"{data}: the same 48 records at the same places, with other text in "
                                          r"them \(edited in place\)"):
        run(cfg)

    data.write_bytes(original)  # the same bytes again: a new time stamp (a new index), the same content
    os.utime(data, ns=(1, 1))
    resumed = run(cfg)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)

    forced = train_cfg(tiny_model_dir, data, tmp_path / "f", max_steps=6, save_every=2)
    with pytest.raises(Crash):
        run(forced, hooks=crash_at(3))
    data.write_bytes(original + original.splitlines(keepends=True)[0])
    forced.run.resume = "force"
    run(forced)
    assert "note: the training data changed since this run started" in capsys.readouterr().out
    assert json.loads((tmp_path / "f" / "data_fingerprint.json").read_text())["sources"][0][0]["records"] == 49


def test_a_run_folder_without_a_fingerprint_resumes(tiny_model_dir, tmp_path):
    """Runs started before the fingerprint existed are not checked (they resume as they did)."""
    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=4, save_every=2)
    with pytest.raises(Crash):
        run(cfg, hooks=crash_at(3))
    (tmp_path / "r" / "data_fingerprint.json").unlink()
    data.write_bytes(data.read_bytes() + data.read_bytes().splitlines(keepends=True)[0])
    run(cfg)
    assert json.loads((tmp_path / "r" / "data_fingerprint.json").read_text())["sources"][0][0]["records"] == 49


def test_what_the_batch_plans_leave_out_is_said(tiny_model_dir, tmp_path, capsys):
    """A task with fewer records than a global batch trains in mixed-task batches, said in a note naming it and
    its count; the first epoch's left-out records are counted. Would catch a small task never trained on (as
    batch plans of version 1 did, silently: only a number in data_summary.json)."""
    data = make_pairs(tmp_path / "d.jsonl", n=54, k=2, tasks=("alpha", "beta"))  # 27 each: 3 batches + 3 left
    with open(data, "a") as f:
        for i in range(3):
            f.write(json.dumps({"query": f"rare {i}?", "pos": [f"rare answer {i}"], "neg": ["x", "y"],
                                "task": "gamma"}) + "\n")
    run(train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=7))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("note: task", "note: epoch", "warning"))]
    assert any("task(s) 'gamma' (3) of" in x and "train in mixed-task batches" in x for x in lines), lines
    summary = json.loads((tmp_path / "r" / "data_summary.json").read_text())
    # 3 + 3 single-task batches; the pool (3 + 3 left of alpha and beta, gamma's 3) makes one mixed batch of 8
    assert (summary["plan"]["batches"], summary["plan"]["mixed_batches"], summary["plan"]["dropped_tail"]) == (7, 1, 1)
    tail = next(x for x in lines if "epoch 0's batches leave out" in x)
    assert "leave out 1 of 57 records (1.8%)" in tail, tail
    assert not [x for x in lines if x.startswith("warning")]

    clean = make_pairs(tmp_path / "c.jsonl", n=48, k=2)  # one task, 48 = 6 batches of 8: nothing left out
    run(train_cfg(tiny_model_dir, clean, tmp_path / "c", max_steps=1))
    assert not [x for x in capsys.readouterr().out.splitlines() if x.startswith(("warning", "note: task", "note: epoch"))]


def test_a_run_begun_with_version_1_plans_resumes_with_them(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint written before plan version 2 (its train_state.json has no "plan") resumes with version 1's
    batches: bitwise the weights of a version-1 run never stopped. Would catch an upgrade that silently
    changes the batches of a run in progress."""
    from qwen3train import integrity
    from qwen3train.data import loader

    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2, tasks=("alpha", "beta", "gamma", "delta", "epsilon"))
    monkeypatch.setattr(loader, "PLAN_VERSION", 1)  # the previous version's batch plans
    full = run(train_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=6, save_every=2))
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=2)
    with pytest.raises(Crash):
        run(cfg, hooks=crash_at(3))
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000002"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state.pop("plan") == 1
    (ckpt / "train_state.json").write_text(json.dumps(state))  # as the previous version wrote it
    integrity.write_manifest(ckpt)
    monkeypatch.undo()  # this version: plans of version 2 for new runs
    resumed = run(cfg)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    fresh = run(train_cfg(tiny_model_dir, data, tmp_path / "new", max_steps=6, save_every=2))
    c = load_file(fresh / "model.safetensors")
    assert not all((a[k] == c[k]).all() for k in a)  # a new run plans with version 2: other batches


def test_data_rewritten_under_the_running_job_stops_it_and_restoring_it_resumes(tiny_model_dir, tmp_path):
    """Another job writes over the training file in place at step 3: the run stops with one error naming the
    file and the change, not trains on whatever text now sits at the indexed offsets (other records, half
    records). The file put back (a new time stamp: a new index, the same content), the same command resumes and
    ends on the weights of a run never disturbed."""
    from qwen3train.data.records import DataError

    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    original = data.read_bytes()
    full = run(train_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=6, save_every=2))

    def overwrite(step):
        if step == 3:
            st = data.stat()
            with open(data, "r+b") as h:  # the same inode, the same size, the lines in another order
                h.write(b"".join(original.splitlines(keepends=True)[::-1]))
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=2)
    with pytest.raises(DataError, match=rf"{data}: field '<file>': changed while this run reads it"):
        run(cfg, hooks=overwrite)
    data.write_bytes(original)
    resumed = run(cfg)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_a_fingerprint_recorded_before_the_content_digest_is_compared_on_what_it_holds(tmp_path):
    """A run begun before files' ``content`` digests were recorded resumes on the same data (not a false "data
    changed" for every run in progress on upgrade), and is still refused on an index of other records."""
    from qwen3train.train.identity import DATA, check_data

    then = [[{"file": "/d.jsonl", "records": 48, "digest": "a" * 32}]]
    (tmp_path / DATA).write_text(json.dumps({"sources": then}))
    check_data(tmp_path, [[{"file": "/d.jsonl", "records": 48, "digest": "a" * 32, "content": "c" * 32}]], "auto", 2)
    with pytest.raises(ConfigError, match="48 records then and now, with other content"):
        check_data(tmp_path, [[{"file": "/d.jsonl", "records": 48, "digest": "b" * 32, "content": "c" * 32}]],
                   "auto", 2)
    (tmp_path / DATA).write_text(json.dumps({"sources": [[dict(then[0][0], content="c" * 32)]]}))
    with pytest.raises(ConfigError, match="with other text in them"):
        check_data(tmp_path, [[{"file": "/d.jsonl", "records": 48, "digest": "a" * 32, "content": "d" * 32}]],
                   "auto", 2)


def test_a_streamed_source_grown_or_moved_to_other_files_is_refused_on_resume(tiny_model_dir, tmp_path):
    """A streamed source's fingerprint holds the files ``datasets`` resolves it to (a hub dataset's commit is in
    their names) and each local one's size and a digest of its ends: rows appended after the crash, a file rewritten
    to the same size, or another file listed, are refused on resume, naming the file; the same file resumes, and so
    does a run begun before the ends digest existed. Before, a stream's fingerprint was its name, so a resume read
    on into other data silently (a shuffled stream's rows at other places). A run begun before the files were
    recorded is compared on its name. Would catch the files left out of the fingerprint or a false alarm."""
    from qwen3train.data.sources import MixtureSource
    from qwen3train.train.identity import DATA, check_data

    data = make_pairs(tmp_path / "d.jsonl", n=24, k=2)
    original = data.read_bytes()
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=4, save_every=2)
    cfg.data.train_files = []
    cfg.data.mixture = [MixtureSource(weight=1.0, dataset="json", data_files=[str(data)], streaming=True,
                                      shuffle_buffer=8)]
    with pytest.raises(Crash):
        run(cfg, hooks=crash_at(3))
    fp = json.loads((tmp_path / "r" / DATA).read_text())["sources"]
    assert fp[0]["files"] == [{"file": str(data), "bytes": len(original), "ends": ends_digest(data)}]
    # rewritten to the same size: another record's text in the first line
    data.write_bytes(original.replace(b"number", b"NUMBER", 1))
    with pytest.raises(ConfigError, match=rf"{data}: the same {len(original)} bytes, rewritten"):
        run(cfg)
    data.write_bytes(original + original.splitlines(keepends=True)[0])
    with pytest.raises(ConfigError, match=rf"changed since this run started: {data}: {len(original)} bytes then, "
                                          rf"{len(original) + len(original.splitlines(keepends=True)[0])} now"):
        run(cfg)
    other = tmp_path / "e.jsonl"
    other.write_bytes(original)
    moved = [dict(fp[0], files=[{"file": str(other), "bytes": len(original)}])]
    with pytest.raises(ConfigError, match=r"1 files then, 1 now \(another revision or other files"):
        check_data(tmp_path / "r", moved, "auto", 2)
    (tmp_path / "r" / DATA).write_text(json.dumps({"sources": [{"streamed": fp[0]["streamed"]}]}))  # an older run
    check_data(tmp_path / "r", moved, "auto", 2)
    sized = [dict(fp[0], files=[{"file": str(data), "bytes": len(original)}])]  # begun before the ends digest
    (tmp_path / "r" / DATA).write_text(json.dumps({"sources": sized}))
    check_data(tmp_path / "r", fp, "auto", 2)
    (tmp_path / "r" / DATA).write_text(json.dumps({"sources": fp}))
    data.write_bytes(original)
    run(cfg)  # the same file: resumes to the end
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_a_change_after_an_unchanged_streamed_source_is_named(tmp_path):
    """A mixture whose streamed source is as it was and whose indexed file changed: the line names the indexed file,
    not the stream. Would catch the first streamed source taken for the change whatever it holds."""
    from qwen3train.train.identity import DATA, check_data

    stream = {"streamed": "hf:json[train]", "files": [{"file": "/s.jsonl", "bytes": 10}]}
    then = [stream, [{"file": "/d.jsonl", "records": 48, "digest": "a" * 32}]]
    (tmp_path / DATA).write_text(json.dumps({"sources": then}))
    with pytest.raises(ConfigError, match=r"/d\.jsonl: 48 records then, 49 now"):
        check_data(tmp_path, [stream, [{"file": "/d.jsonl", "records": 49, "digest": "b" * 32}]], "auto", 2)


def test_the_ends_digest_reads_both_ends_of_a_large_file_and_all_of_a_small_one(tmp_path):
    """A streamed file's ``ends`` digest covers its first and last 64 KiB: a byte changed in either is seen, a byte
    changed in the middle of a larger file is not (the documented limit: the file is not read); a file of at most
    64 KiB is digested whole, and one between 64 and 128 KiB in every byte. Would catch a tail not read (no seek, or
    a seek past the end), bytes between the two parts skipped, or a digest of the name or size alone."""
    from qwen3train.data.hf import ENDS

    def digest_after(size, where):
        path = tmp_path / f"f{size}_{where}.bin"
        body = bytearray(b"a" * size)
        if where is not None:
            body[where] = ord("b")
        path.write_bytes(bytes(body))
        return ends_digest(path)

    big = 3 * ENDS
    base = digest_after(big, None)
    assert digest_after(big, 0) != base and digest_after(big, big - 1) != base
    assert digest_after(big, ENDS + 10) == base  # the middle: not read
    small = ENDS // 2
    assert digest_after(small, small // 2) != digest_after(small, None)
    mid = ENDS + ENDS // 2  # head and tail overlap: every byte read once
    assert all(digest_after(mid, w) != digest_after(mid, None) for w in (0, ENDS - 1, ENDS, mid - 1))
