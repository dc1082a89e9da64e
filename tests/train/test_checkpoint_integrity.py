"""Checkpoints verify themselves: a damaged newest checkpoint is named and skipped (the run resumes from the
one before and ends where an uninterrupted run ends), a run whose checkpoints are all damaged stops with
one line, a full disk while saving stops with one line and leaves the previous checkpoint intact, and a
damaged export is refused by the merge."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_pairs, train_cfg
from qwen3train.errors import ConfigError
from qwen3train.integrity import verify
from qwen3train.train.loop import run


class Crash(Exception):
    pass


def _cfg(model_dir, tmp_path, out, steps=6):
    return train_cfg(model_dir, make_pairs(tmp_path / "d.jsonl", n=48, k=2), out, max_steps=steps, save_every=2,
                     keep_last=10)


def _damage(path, how):
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.unlink()


def test_verify_finds_flipped_truncated_and_deleted_files(tmp_path):
    from qwen3train.integrity import write_manifest

    for name in ("a.bin", "b.bin", "c.bin", "README.md"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 8)
    write_manifest(tmp_path)
    (tmp_path / "README.md").write_text("a model card rewritten by make eval")  # not checked: cards change
    assert verify(tmp_path) == []
    for name, how in (("a.bin", "flip"), ("b.bin", "truncate"), ("c.bin", "delete")):
        _damage(tmp_path / name, how)
    assert verify(tmp_path) == ["a.bin: checksum differs", "b.bin: 682 bytes, 2048 expected", "c.bin: missing"]
    assert verify(tmp_path / "nothing") is None  # no manifest: not verifiable, not damaged
    from qwen3train.integrity import recorded

    (tmp_path / "checksums.json").write_text('{"version": 1, "files": {"a.bin": {"size": "x"}}}')  # malformed
    assert verify(tmp_path) == ["checksums.json: unreadable"] and recorded(tmp_path) == {}


@pytest.mark.parametrize("how", ["flip"])
def test_damaged_newest_checkpoint_is_skipped(tiny_model_dir, tmp_path, capsys, how):
    """A bit flipped in the newest checkpoint's engine file (the torch file still loads: only the checksum
    catches it): resume names it and starts from the one before; the final weights equal an uninterrupted
    run's."""
    full = run(_cfg(tiny_model_dir, tmp_path, tmp_path / "a"))
    cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "b")
    with pytest.raises(Crash):
        run(cfg, hooks=lambda s: (_ for _ in ()).throw(Crash()) if s == 5 else None)
    ckpts = tmp_path / "b" / "checkpoints"
    assert verify(ckpts / "step_0000004") == [] and verify(ckpts / "step_0000004" / "model") == []
    _damage(ckpts / "step_0000004" / "engine" / "engine.pt", how)
    assert verify(ckpts / "step_0000004")  # the damage is seen
    capsys.readouterr()
    resumed = run(cfg)
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / 'step_0000004'} is damaged" in out and "resumed from" in out
    assert f"{ckpts / 'step_0000002'} (step 2)" in out
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_stops_with_one_line(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "b")
    with pytest.raises(Crash):
        run(cfg, hooks=lambda s: (_ for _ in ()).throw(Crash()) if s == 3 else None)
    _damage(tmp_path / "b" / "checkpoints" / "step_0000002" / "engine" / "engine.pt", "truncate")
    with pytest.raises(ConfigError, match=r"every checkpoint under .* is damaged \(step_0000002\).*run.resume=never"):
        run(cfg)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC at the second save (simulated in torch.save): one-line error naming the intact checkpoint, no
    partial folder left, and a rerun resumes from step 2."""
    from qwen3train.train import checkpoint

    cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "b")
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        where = str(getattr(f, "name", f))  # the writer hands torch.save an open file
        if where.endswith("engine.pt") and "step_0000004" in where:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(ConfigError, match=r"no space left on the device while saving step_0000004.*step_0000002 is intact"):
        run(cfg)
    ckpts = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]
    assert verify(ckpts / "step_0000002") == []
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (run(cfg) / "model.safetensors").exists()


def test_merge_refuses_a_damaged_export(tiny_model_dir, tmp_path):
    from qwen3train.merge.apply import merge_folders
    from qwen3train.merge.io import MergeError

    run(_cfg(tiny_model_dir, tmp_path, tmp_path / "b", steps=4))
    ckpts = tmp_path / "b" / "checkpoints"
    good = [ckpts / "step_0000002" / "model", ckpts / "step_0000004" / "model"]
    merged = merge_folders(good, tmp_path / "m")
    assert verify(merged) == []  # the merge writes its own checksums
    _damage(good[1] / "model.safetensors", "flip")
    with pytest.raises(MergeError, match=r"step_0000004/model is damaged \(model.safetensors: checksum differs\)"):
        merge_folders(good, tmp_path / "m2")


def test_retired_checkpoints_keep_their_exports_and_refuse_to_resume(tiny_model_dir, tmp_path):
    """``retire`` (what the pipeline does once a training stage is done): the engine state and RNG files go,
    the export stays and still merges, the checksums describe what is left, a second call frees nothing, and
    a rerun asking for more steps stops with one line instead of taking a checkpoint without optimizer state
    (or silently starting over). Catches a retire that leaves a manifest naming deleted files (every later
    resume would call it damaged) and a resume that loads a retired checkpoint. A rerun of the same finished run
    trains nothing (its last checkpoint is at the end: only the final copy is redone)."""
    from qwen3train.merge.apply import merge_folders, select_checkpoints
    from qwen3train.train.checkpoint import list_checkpoints, retire

    cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "b", steps=4)
    run(cfg)
    ckpts = list_checkpoints(tmp_path / "b")
    before = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file())
    freed = [retire(c) for c in ckpts]
    after = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file())
    assert all(f > 0 for f in freed) and before - after >= sum(freed) * 0.99
    assert after < before / 3  # the engine state (weights + two AdamW moments) was most of it
    for c in ckpts:
        assert not (c / "engine").exists() and not list(c.glob("rng_rank*.pt"))
        assert verify(c) == [] and verify(c / "model") == []
    assert [retire(c) for c in ckpts] == [0, 0]
    merge_folders(select_checkpoints(tmp_path / "b", last=2, every=1), tmp_path / "m")
    steps = (tmp_path / "b" / "metrics.jsonl").read_text()
    run(cfg)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == steps
    cfg.run.max_steps = 6  # more steps than the run trained: nothing can resume them
    with pytest.raises(ConfigError, match=r"keep only their exported model .*model.init_from=.*step_0000004/model"):
        run(cfg)


def test_a_checkpoint_resumed_by_another_engine_is_one_line_naming_both(tmp_path):
    """``run.resume=force`` after ``engine=`` changed: each engine's load found none of its files and ended in a
    traceback (torch: FileNotFoundError for engine.pt; FSDP and DeepSpeed: their reader's error). Now one line
    names the engine that wrote it (checked end to end by hand: exit status 2 both ways between torch and fsdp)."""
    from qwen3train.train.engine import ENGINE_FILES, check_written_by

    engine = tmp_path / "step_0000002" / "engine"
    (engine / ENGINE_FILES["fsdp"]).mkdir(parents=True)
    check_written_by(engine, "fsdp")  # its own: no error
    for backend in ("torch", "deepspeed"):
        with pytest.raises(ConfigError, match=f"written by engine.backend=fsdp, not engine.backend={backend}"):
            check_written_by(engine, backend)
    (engine / ENGINE_FILES["fsdp"]).rmdir()
    with pytest.raises(ConfigError, match="no engine this version knows.*model.init_from="):
        check_written_by(engine, "torch")


def test_a_save_reads_each_file_once(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint's manifest takes its export's digests from the export's own manifest, written a moment
    before, instead of reading those weights again (they were hashed twice per save); every other file is hashed
    once. Fails on a save that hashes a file twice or leaves one out of the manifest."""
    from collections import Counter

    from qwen3train import integrity
    from qwen3train.train.checkpoint import list_checkpoints

    hashed, real = Counter(), integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p, *a: hashed.update([str(p)]) or real(p, *a))
    run(_cfg(tiny_model_dir, tmp_path, tmp_path / "r", steps=4))
    ckpts = list_checkpoints(tmp_path / "r")
    assert len(ckpts) == 2 and max(hashed.values()) == 1, hashed.most_common(3)
    for c in ckpts:
        files = integrity.recorded(c)
        assert "model/model.safetensors" in files and "engine/engine.pt" in files
        assert sorted(files) == sorted(integrity.listing(c))  # every file, none twice
        written = {k.split(f".{c.name}.tmp/", 1)[1] for k in hashed if f"/.{c.name}.tmp/" in k}  # saved as .tmp
        assert written == set(files), written ^ set(files)
        monkeypatch.setattr(integrity, "file_digest", real)
        assert verify(c) == []
        monkeypatch.setattr(integrity, "file_digest", lambda p, *a: hashed.update([str(p)]) or real(p, *a))


def test_files_are_dealt_to_hashers_by_bytes():
    """Ranks hash a checkpoint's files together; each file goes to exactly one, by size, so the largest
    shares stay within one file of each other (catches a file dealt twice or dropped, and dealing by count,
    which gives one rank the engine state and the export's weights together)."""
    from qwen3train.integrity import shares

    sizes = {"engine/engine.pt": 1600, "model/model.safetensors": 540, "model/tokenizer.json": 4, "a": 1, "b": 1}
    got = shares(sizes, 2)
    assert sorted(sum(got, [])) == sorted(sizes)
    assert got[0] == ["engine/engine.pt"] and "model/model.safetensors" in got[1]
    assert shares(sizes, 1) == [sorted(sizes, key=lambda r: (-sizes[r], r))] and shares({}, 3) == [[], [], []]


def test_retire_keeps_the_digests_it_was_saved_with(tmp_path):
    """``retire`` rewrites a checkpoint's manifest after deleting its engine state; the digests of what stays
    are the ones taken when it was saved, so an export damaged before it was retired is still named as
    damaged (hashing it again would record the damaged bytes as good)."""
    from qwen3train.integrity import write_manifest
    from qwen3train.train.checkpoint import retire

    c = tmp_path / "checkpoints" / "step_0000002"
    for rel in ("engine/engine.pt", "rng_rank0.pt", "model/model.safetensors", "model/config.json"):
        (c / rel).parent.mkdir(parents=True, exist_ok=True)
        (c / rel).write_bytes(bytes(range(256)) * 4)
    (c / "train_state.json").write_text('{"step": 2}')
    write_manifest(c / "model")
    write_manifest(c)
    _damage(c / "model" / "model.safetensors", "flip")
    assert retire(c) == 2048
    assert verify(c) == ["model/model.safetensors: checksum differs"]
    assert '"resumable": false' in (c / "train_state.json").read_text()
    (c / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 4)  # repaired
    assert verify(c) == [] and verify(c / "model") == []
