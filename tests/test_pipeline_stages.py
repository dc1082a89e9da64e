"""The pipeline's stage markers: a finished stage is skipped only while its config and inputs are unchanged."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

from qwen3train.pipeline import Pipeline


@dataclass
class Cfg:
    threshold: float = 0.7


def test_changed_config_or_input_reruns_the_stage_and_clears_its_outputs(compose, tmp_path):
    """Before: `.done.json` ignored the config, so a changed threshold silently reused old outputs. Now:
    same config and inputs -> skipped; a changed config -> old outputs removed, run again; a changed
    input file -> run again; markers record the fingerprint."""
    pc = compose("pipeline", [f"output_dir={tmp_path / 'out'}"])
    pipe = Pipeline(pc)
    src = tmp_path / "in.jsonl"
    src.write_text("a\n")
    out = pipe.out / "filter" / "kept.jsonl"
    calls = []

    def fn():
        calls.append(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / "stale.txt").write_text("from an earlier run") if len(calls) == 1 else None
        out.write_text(f"run {len(calls)}\n")

    pipe.stage("filter", [src], [out], fn, Cfg())
    pipe.stage("filter", [src], [out], fn, Cfg())
    assert len(calls) == 1  # unchanged: skipped
    pipe.stage("filter", [src], [out], fn, Cfg(threshold=0.8))
    assert len(calls) == 2 and not (out.parent / "stale.txt").exists()  # config changed: cleared and rerun
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input file was rewritten
    pipe.stage("filter", [src], [out], fn, Cfg(threshold=0.8))
    assert len(calls) == 3
    rec = json.loads((pipe.out / "filter" / ".done.json").read_text())
    assert rec["fingerprint"]["inputs"][str(src)].startswith("2:")  # size 2 bytes, then the time
    assert len(rec["fingerprint"]["config_hash"]) == 12


def test_a_stage_max_length_sets_only_that_stage_budget(compose, tmp_path):
    """`rerank.max_length` is the reranker's prompt budget (model.max_doc_length) and leaves the embedder
    stages at the model's; unset, every stage keeps the model's (so existing runs' stage hashes hold)."""
    from qwen3train.stage_marker import config_hash

    pc = compose("smoke", [f"output_dir={tmp_path / 'out'}", "rerank.max_length=192"])
    pipe = Pipeline(pc)
    rr = pipe.train_cfg(pc.rerank, "rerank", ["m.jsonl"], None)
    s2 = pipe.train_cfg(pc.stage2, "stage2", ["m.jsonl"], None)
    assert rr.model.max_doc_length == 192 and s2.model.max_doc_length == pc.model.max_doc_length != 192
    plain = Pipeline(compose("smoke", [f"output_dir={tmp_path / 'out'}"]))
    assert config_hash(plain.train_cfg(plain.cfg.stage2, "stage2", ["m.jsonl"], None)) == config_hash(s2)


def test_evaluation_writing_a_model_card_does_not_make_a_finished_stage_stale(tmp_path):
    """`make eval` adds its results to each export's card (README.md, the card in qwen3train.json). Before,
    that changed stage 1's fingerprint, so rerunning a finished pipeline retrained from the filter on. The
    weights and the export's other facts still count."""
    from qwen3train.models.card import add_evaluation, set_card
    from qwen3train.stage_marker import path_fingerprint

    model = tmp_path / "final"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 64)
    (model / "qwen3train.json").write_text(json.dumps({"kind": "embedder", "end_token": "<|endoftext|>"}))
    set_card(model, base_model="base", lineage=[{"stage": "stage1", "steps": 30}])
    before = path_fingerprint(model)
    add_evaluation(model, [{"dataset": "trec", "ndcg@10": 0.4}])
    assert "trec" in (model / "README.md").read_text() and path_fingerprint(model) == before
    meta = json.loads((model / "qwen3train.json").read_text())
    (model / "qwen3train.json").write_text(json.dumps(meta | {"end_token": "<|im_end|>"}))
    assert path_fingerprint(model) != before  # an export fact other than the card
    (model / "qwen3train.json").write_text(json.dumps(meta))
    assert path_fingerprint(model) == before
    (model / "model.safetensors").write_bytes(b"v" * 65)
    assert path_fingerprint(model) != before  # new weights


def test_rerank_merge_false_evaluates_the_final_reranker(compose, tmp_path, monkeypatch):
    """`rerank_merge=false` (chosen for both recipes, where the merge lost on dev): make eval reranks
    with the reranker's final checkpoint; with true, with the merged one."""
    from conftest import FIXTURES

    monkeypatch.setattr("qwen3train.merge.apply.select_checkpoints", lambda *a, **k: [])  # no stage 2 run here

    col = f"eval.collections=[{FIXTURES / 'vaswani'}]"
    merged = Pipeline(compose("pipeline", [f"output_dir={tmp_path}", col, "rerank_merge=true"])).eval_cfg().rerankers
    final = Pipeline(compose("pipeline", [f"output_dir={tmp_path}", col, "rerank_merge=false"])).eval_cfg().rerankers
    assert merged == {"reranker(merged)": str(tmp_path.resolve() / "rerank_merged")}
    assert final == {"reranker": str(tmp_path.resolve() / "rerank" / "final")}


def test_the_reranker_is_evaluated_with_the_prompt_budget_it_was_trained_with(compose, tmp_path, monkeypatch):
    """eval.max_length is the embedders' budget; the reranker's whole prompt (template + instruction + query
    + document) used to get the same number, so a reranker trained at 192 was scored with its documents cut
    to what 128 leaves. Now: rerank.max_length unless eval.rerank_max_length says otherwise."""
    monkeypatch.setattr("qwen3train.merge.apply.select_checkpoints", lambda *a, **k: [])
    base = [f"output_dir={tmp_path}", "eval.max_length=128"]
    assert Pipeline(compose("pipeline", base + ["rerank.max_length=192"])).eval_cfg().rerank_max_length == 192
    both = base + ["rerank.max_length=192", "eval.rerank_max_length=256"]
    assert Pipeline(compose("pipeline", both)).eval_cfg().rerank_max_length == 256


def test_the_reranker_trains_on_negatives_mined_by_the_final_embedder(compose, tmp_path, monkeypatch):
    """The reranker reorders the top-k of the merged embedder, so its hard negatives come from that model
    (stage rerank_mine), not from stage 1's file that stage 2 trained on: before, the reranker learnt on
    stage 1's mistakes and lowered a strong first stage. rerank_negatives=stage1 keeps the old wiring."""
    monkeypatch.setattr("qwen3train.merge.apply.select_checkpoints", lambda *a, **k: [])
    calls = {}
    monkeypatch.setattr(Pipeline, "stage", lambda self, name, inputs, outputs, fn, cfg=None: calls.setdefault(name, cfg))
    monkeypatch.setattr(Pipeline, "drop", lambda self, name, outputs: calls.setdefault(name, "dropped"))

    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path}", "mine.sample=1000", "rerank_mine_sample=600"]))
    pipe.run()
    out = tmp_path.resolve()
    assert "rerank_mine" in pipe.stages() and pipe.stages().index("rerank_mine") < pipe.stages().index("rerank")
    assert calls["rerank_mine"].embedder == str(out / "merged") and calls["rerank_mine"].sample == 600
    assert calls["rerank_mine"].inputs == calls["mine"].inputs  # the same records, another miner
    assert calls["rerank"].data.train_files == [str(out / "rerank_mine" / "mined.jsonl")]
    assert calls["stage2"].data.train_files == [str(out / "mine" / "mined.jsonl")]

    calls.clear()
    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path}", "rerank_negatives=stage1"]))
    pipe.run()
    assert "rerank_mine" not in pipe.stages() and calls["rerank_mine"] == "dropped"
    assert calls["rerank"].data.train_files == [str(out / "mine" / "mined.jsonl")]


def test_a_stage_the_config_leaves_out_loses_its_stale_outputs(compose, tmp_path):
    """After `rerank_merge=false`, the earlier run's rerank_merged model and its lineage entry go: before,
    the report listed a stage that had not run and a stale merged reranker stayed beside the new one."""
    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'out'}"]))
    out = pipe.out / "rerank_merged"

    def fn():
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"old")

    pipe.stage("rerank_merge", [], [out], fn, Cfg())
    pipe.stage("report", [], [], lambda: None, Cfg())
    assert "rerank_merge" in json.loads(pipe.lineage_path.read_text())
    again = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'out'}", "rerank_merge=false"]))
    again.drop("rerank_merge", [out])
    assert not out.exists() and not (pipe.out / "rerank_merge").exists()
    assert set(json.loads(pipe.lineage_path.read_text())) == {"report"}
    again.drop("rerank_merge", [out])  # nothing left: a no-op


def test_a_marker_written_before_cards_were_ignored_still_resumes(compose, tmp_path):
    """A stage finished by the previous version (its marker's fingerprint counted the input model's card,
    no fingerprint_version) is skipped while nothing changed, so upgrading mid-run does not retrain."""
    from qwen3train.stage_marker import path_fingerprint

    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'out'}"]))
    model = tmp_path / "final"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    (model / "README.md").write_text("card")
    out = pipe.out / "filter" / "kept.jsonl"
    calls = []

    def fn():
        calls.append(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("x\n")

    pipe.stage("filter", [model], [out], fn, Cfg())
    marker = pipe.out / "filter" / ".done.json"
    rec = json.loads(marker.read_text())
    del rec["fingerprint_version"]
    rec["fingerprint"]["inputs"][str(model)] = path_fingerprint(model, cards=True)  # as the old version wrote it
    marker.write_text(json.dumps(rec))
    pipe.stage("filter", [model], [out], fn, Cfg())
    assert len(calls) == 1  # resumed
    (model / "model.safetensors").write_bytes(b"new weights")
    pipe.stage("filter", [model], [out], fn, Cfg())
    assert len(calls) == 2  # a real change still reruns it


def test_eta_learns_each_kind_of_work_from_the_stages_that_ran(compose, tmp_path):
    """Before any stage: the defaults for this device; after a training stage ran at twice the default
    cost, training stages are estimated at about twice (the default weighs as a prior), and kinds not yet
    seen scale by the same measured/default ratio."""
    from qwen3train.eta import ETA

    eta = ETA(compose("pipeline", [f"output_dir={tmp_path}"]))
    start = eta.start("stage1")
    first = {n: eta.remaining([n]) - start for n in ("stage1", "stage2", "mine")}  # the work, past the start
    assert all(v > 0 for v in first.values())
    eta.done("stage1", start + 2 * first["stage1"])
    assert 1.3 < (eta.remaining(["stage2"]) - start) / first["stage2"] <= 2.0
    assert (eta.remaining(["mine"]) - start) / first["mine"] == pytest.approx(2.0)


def test_eta_prices_each_stage_by_the_model_that_runs_it(compose, tmp_path):
    """make smoke generates with SmolLM2-135M and trains a random model ~1,500x smaller. Pricing the
    remaining stages at the generator's measured rate per parameter of the *trained* model made the
    2-minute run announce "25 min" after stage 0; its stages, nearly all process start, took 78 s in all
    (measured: 6.6-18.6 s each). After stage 0 ran as long as it did then (46.5 s), the rest is estimated
    within 30 s - 3 min."""
    from qwen3train.eta import ETA, _params

    shapes = {"gen": (576, 30, 1536), "tiny": (64, 2, 128)}  # SmolLM2-135M's shape; the random tiny Qwen3's
    for name, (h, layers, ffn) in shapes.items():  # the ETA reads a model's config.json only
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"hidden_size": h, "num_hidden_layers": layers, "intermediate_size": ffn}))
    cfg = compose("smoke", [f"output_dir={tmp_path}", f"synth.generator={tmp_path / 'gen'}",
                            f"model.name_or_path={tmp_path / 'tiny'}"])
    assert _params(cfg.synth.generator) > 1000 * _params(cfg.model.name_or_path)  # the case this covers
    eta = ETA(cfg)
    rest = ["stage1", "filter", "mine", "stage2", "merge", "rerank_mine", "rerank", "eval", "report"]
    # stage 0 on transformers' generate (smoke's backend: 46.5 and 51.7 s measured) is priced as that backend,
    # not at vLLM's rate (15 s announced before)
    assert 30 < ETA(cfg).remaining(["synth"]) < 90, ETA(cfg).remaining(["synth"])
    eta.done("synth", 46.5)
    assert 30 < eta.remaining(rest) < 180, eta.remaining(rest)
    assert eta.remaining(["report"]) < 1  # in the pipeline's own process: no start to pay


def test_a_done_training_stage_keeps_only_the_exports_of_its_checkpoints(compose, tmp_path, tiny_model_dir):
    """Once stage 2 is marked done its checkpoints lose their engine state (keep_engine_state=false, the
    default) and keep the exports the merge reads; a rerun that finds the stage done retires what a kill left;
    keep_engine_state=true keeps everything; a stage that is not training is never touched."""
    import shutil
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs, train_cfg

    from qwen3train.train.loop import run

    src = make_pairs(tmp_path / "d.jsonl", n=32, k=2)
    for keep in (False, True):
        pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / f'out{keep}'}", f"keep_engine_state={keep}"]))
        cfg = train_cfg(tiny_model_dir, src, pipe.out / "stage2", max_steps=4, save_every=2, keep_last=0)
        pipe.stage("stage2", [src], [pipe.out / "stage2" / "final"], lambda: run(cfg), Cfg())
        engines = sorted(p.parent.name for p in (pipe.out / "stage2" / "checkpoints").glob("step_*/engine"))
        models = sorted(p.parent.name for p in (pipe.out / "stage2" / "checkpoints").glob("step_*/model"))
        assert models == ["step_0000002", "step_0000004"]
        assert engines == (models if keep else [])
    # a kill between the marker and the end of the retiring: the next run (keep_engine_state=false) finishes it
    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'outTrue'}"]))
    shutil.copytree(pipe.out / "stage2", pipe.out / "filter")  # checkpoints under a stage that is not training
    pipe.stage("stage2", [src], [pipe.out / "stage2" / "final"], lambda: pytest.fail("a done stage ran"), Cfg())
    assert not list((pipe.out / "stage2" / "checkpoints").glob("step_*/engine"))
    pipe.retire("filter")
    assert len(list((pipe.out / "filter" / "checkpoints").glob("step_*/engine"))) == 2


def test_the_reranker_fusion_weight_is_chosen_on_the_merge_dev_pairs(compose, tmp_path, monkeypatch):
    """rerank_fusion=dev (the default) hands the merge gate's dev pairs to evaluation, which chooses the
    reranker's weight on them; "none" scores the reranker alone; a dev file that is not there is not
    passed (evaluation would fail on it); any other value is refused."""
    monkeypatch.setattr("qwen3train.merge.apply.select_checkpoints", lambda *a, **k: [])
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"query": "q", "pos": ["d"]}\n')
    pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'o'}", f"merge.dev_file={dev}"]))
    assert pipe.eval_cfg().rerank_fusion_dev_file == str(dev)
    alone = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'o'}", f"merge.dev_file={dev}", "rerank_fusion=none"]))
    assert alone.eval_cfg().rerank_fusion_dev_file is None
    gone = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'o'}", f"merge.dev_file={tmp_path / 'nope.jsonl'}"]))
    assert gone.eval_cfg().rerank_fusion_dev_file is None
    with pytest.raises(Exception, match="rerank_fusion must be 'dev' or 'none'"):
        compose("pipeline", [f"output_dir={tmp_path / 'o'}", "rerank_fusion=sometimes"])


def test_an_upgrade_keeps_the_config_hash_of_finished_stages(compose):
    """A stage is skipped when its marker's config hash is unchanged, and a stopped training run resumes only
    when its identity hash is. Adding a field (optim.fused, eval.rerank_fusion, eval.rerank_fusion_dev_file)
    changed both for every training stage, so after an upgrade a pipeline retrained from stage 1 (seen: a
    finished seed-1 pipeline lost its stage 1) and a stopped stage refused to resume. Both hashes of the
    shipped configs are those the previous version recorded (computed by it, caf7b0a); a late field set to
    something else still counts (a real change reruns the stage)."""
    from qwen3train.stage_marker import config_hash
    from qwen3train.train import identity

    names = ("stage1", "stage2", "rerank", "eval")
    cfgs = [compose(n, ["run.output_dir=x"] if n != "eval" else []) for n in names]
    got = [config_hash(c) for c in cfgs]
    assert got == ["294cd456f57d", "024faba1044a", "18b9c8cb5784", "f3ff205f015e"]
    assert [identity.config_hash(c) for c in cfgs[:3]] == ["231f5894c766", "74d2c950617d", "42a0a087510f"]
    fused = compose("stage1", ["run.output_dir=x", "optim.fused=true"])
    assert config_hash(fused) != got[0] and identity.config_hash(fused) != "231f5894c766"
    assert config_hash(compose("eval", ["rerank_fusion=0.5"])) != got[3]
    # mining's and the filter's markers (their hashes before their stall_report_s, 90e4a84); a report changes nothing
    assert [config_hash(compose(n, ["inputs=[a.jsonl]"])) for n in ("mine", "filter")] == ["8d102e409fa0",
                                                                                          "18169b66cfc1"]
    assert config_hash(compose("mine", ["inputs=[a.jsonl]", "stall_report_s=60"])) == "8d102e409fa0"
    assert config_hash(compose("mine", ["inputs=[a.jsonl]", "consistency_top_k=5"])) != "8d102e409fa0"  # a filter
    assert [config_hash(compose("synth", o)) for o in ([], ["stall_report_s=60"])] == ["5a38cbf2a5c4"] * 2  # a7299be's
    # what to write, not what is computed: the pipeline's export-only last checkpoint changes neither hash
    lean = compose("stage1", ["run.output_dir=x", "run.final_engine_state=false"])
    assert config_hash(lean) == got[0] and identity.config_hash(lean) == "231f5894c766"
    # nor does the limit of skipped non-finite steps: a run it stopped resumes with a higher one
    patient = compose("stage1", ["run.output_dir=x", "run.skip_nonfinite_steps=10"])
    assert config_hash(patient) == got[0] and identity.config_hash(patient) == "231f5894c766"
    # a field of each source of a mixture (data.mixture[].stream_split, 2026-12-06): a run begun before it
    # recorded the sources without it
    mix = "data.mixture=[{dataset: json, data_files: [a.jsonl], streaming: true}, {files: [b.jsonl]}]"
    streamed = compose("stage1", ["run.output_dir=x", "data.train_files=[]", mix])
    before = identity.config_dict(streamed)
    assert [m.pop("stream_split") for m in before["data"]["mixture"]] == ["auto", "auto"]
    assert identity.config_hash(streamed) == identity.config_hash(before) and config_hash(streamed) == config_hash(before)
    split = compose("stage1", ["run.output_dir=x", "data.train_files=[]", mix.replace("streaming: true", "streaming: true, stream_split: files")])
    assert identity.config_hash(split) != identity.config_hash(before) and config_hash(split) != config_hash(before)


def test_training_stages_write_their_last_checkpoint_export_only_unless_the_engine_state_is_kept(compose, tmp_path):
    """keep_engine_state=false (the default) removes a done stage's optimizer state, so the pipeline does not
    write it for the last checkpoint (~10 s and 1.6 GB a stage for SmolLM2-135M); true keeps it everywhere."""
    for keep in (False, True):
        pipe = Pipeline(compose("pipeline", [f"output_dir={tmp_path / 'o'}", f"keep_engine_state={keep}"]))
        for stage, name in ((pipe.cfg.stage1, "stage1"), (pipe.cfg.stage2, "stage2"), (pipe.cfg.rerank, "rerank")):
            assert pipe.train_cfg(stage, name, [], None).run.final_engine_state is keep, (name, keep)


def test_stage_processes_keep_the_memory_they_free(tmp_path):
    """keep_freed_memory: a process started with a stage's environment reuses the memory it frees (glibc);
    with the C library's defaults a training step's large tensors (an MLP's forward and backward over 4,000
    tokens: fp32 activations of 49 MB, above the 32 MB that glibc's dynamic mmap threshold can reach) come fresh
    from the kernel every step. Page faults of the steadiest of 7 steps after 3 warm-up ones: 0 in 8 of 8 runs
    kept, 84,000-96,000 with the defaults (every step faults; a kept run's step now and then takes one
    tensor's pages, 12,000, which an old median-of-7 rule would let through only by luck). fp32, not bf16
    autocast: on a CPU without bf16 matmuls the same probe took 82 s a process instead of 10. Would catch a
    misspelled or ignored setting; the user's own MALLOC_* settings are left alone."""
    import subprocess
    import sys

    from qwen3train.pipeline import KEEP_FREED_MEMORY, stage_env

    probe = ("import resource, torch\n"
             "a, b = torch.nn.Linear(576, 3072), torch.nn.Linear(3072, 576)\n"
             "x = torch.randn(4000, 576, requires_grad=True)\n"
             "def step():\n"
             "    b(torch.nn.functional.silu(a(x)) * a(x)).pow(2).mean().backward()\n"
             "for _ in range(3):\n    step()\n"
             "per = []\n"
             "for _ in range(7):\n"
             "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    step()\n"
             "    per.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
             "print(min(per))\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(env):
        return int(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    kept, default = faults(stage_env(base, True)), faults(stage_env(base, False))
    assert default > 5_000, (kept, default)  # the probe is valid: the defaults give each step fresh pages
    assert kept < 1_000, (kept, default)  # a steady step reuses what the last one freed
    assert stage_env(dict(base, MALLOC_ARENA_MAX="2"), True).get("MALLOC_MMAP_MAX_") is None
    assert set(KEEP_FREED_MEMORY) <= set(stage_env(base, True))


def test_eta_reads_a_hub_models_shape_from_the_local_cache(tmp_path, monkeypatch):
    """Users on a cluster pass hub names (model.name_or_path=Qwen/Qwen3-8B); the ETA read only local folders and
    priced every such model as 1e8 parameters (an 8B model's stages announced ~70x too short). A model already
    in the Hugging Face cache is read from there, offline; one that is not falls back without a network call."""
    from qwen3train.eta import _params

    snap = tmp_path / "models--Org--Big" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--Org--Big" / "refs").mkdir()
    (tmp_path / "models--Org--Big" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 36,
                                                  "intermediate_size": 12288}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _params("Org/Big") == 36 * (4 * 4096**2 + 3 * 4096 * 12288)
    assert _params("Org/Missing") == 1e8


def test_a_training_stage_stopped_on_a_users_mistake_says_where_its_settings_go(compose, tmp_path, tiny_model_dir):
    """A stage that exits 2 (its own one line above, e.g. out of memory asking for engine.micro_batch_tokens)
    makes the pipeline name the spelling that reaches that stage alone: batch settings are per stage in a
    pipeline (``stage2.engine.micro_batch_tokens``); the pipeline-wide ``engine.*`` would rerun stage 1 too.
    Would catch a hint that names the stage-less key, or one given for a stage that is not training."""
    from qwen3train.errors import ConfigError

    pc = compose("pipeline", [f"output_dir={tmp_path / 'out'}", f"model.name_or_path={tiny_model_dir}"])
    pipe = Pipeline(pc)
    cfg = pipe.train_cfg(pc.stage2, "stage2", [str(tmp_path / "absent.jsonl")], None)  # exits 2: no such file
    with pytest.raises(ConfigError) as e:
        pipe.launch("stage2", cfg)
    assert "stage stage2 stopped on the error above; fix it (batch settings are per stage here: " \
           "stage2.engine.micro_batch_tokens=..., stage2.run.resume=...)" in str(e.value), str(e.value)
