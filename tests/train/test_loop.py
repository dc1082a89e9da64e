"""The loop: exact resume after a crash, atomic checkpoints, pruning, divergence, CLI stages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from helpers import make_pairs, train_cfg
from qwen3train.errors import TrainingDiverged
from qwen3train.train.loop import run


class Crash(Exception):
    pass


def _cfg(tiny_model_dir, tmp_path, out, mixture):
    from qwen3train.data.sources import MixtureSource

    if not mixture:
        return train_cfg(tiny_model_dir, make_pairs(tmp_path / "d.jsonl", n=48, k=2), out, max_steps=8, save_every=2,
                         keep_last=10)
    a = make_pairs(tmp_path / "a.jsonl", n=24, k=2, tasks=("alpha",))
    b = make_pairs(tmp_path / "b.jsonl", n=24, k=2, tasks=("beta",))
    cfg = train_cfg(tiny_model_dir, a, out, max_steps=8, save_every=2, keep_last=10)
    cfg.data.train_files = []
    first = MixtureSource([str(a)], 2.0)
    if mixture == "streaming":  # the first source read through `datasets` streaming instead
        first = MixtureSource(weight=2.0, dataset="json", data_files=[str(a)], streaming=True, shuffle_buffer=8)
    cfg.data.mixture = [first, MixtureSource([str(b)], 1.0)]
    return cfg


@pytest.mark.parametrize("mixture", [False, "mixture", "streaming"])
def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path, mixture):
    """With a mixture, each source's cursor and the step's draw resume too (3 batches per source per
    epoch: 8 steps cross epochs); a streamed source resumes at the same row of its shuffled stream. The
    interrupted run makes its batches ahead on the data thread (``data.prefetch=1``, the default), the
    resumed one in the loop (0): equal weights also say the checkpoint's cursor did not count the batch
    made ahead (a resume would skip it) and that both ways make the same batches."""
    full = run(_cfg(tiny_model_dir, tmp_path, tmp_path / "a", mixture))

    cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "b", mixture)

    def crash(step):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        run(cfg, hooks=crash)
    # a save interrupted half-way leaves only a .tmp folder, which resume ignores
    (tmp_path / "b" / "checkpoints" / ".step_0000006.tmp" / "engine").mkdir(parents=True)
    # and a ZeRO resharding (train/reshard.py) a kill interrupted leaves its partial copy: removed on resume
    stale = tmp_path / "b" / "checkpoints" / ".resharded-step_0000004" / "universal" / "zero"
    stale.mkdir(parents=True)
    (stale / "optimizer_state.pt").write_bytes(b"partial")
    assert not (tmp_path / "b" / "final").exists()
    cfg.data.prefetch = 0
    resumed = run(cfg)
    assert not stale.parent.parent.exists()

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, 9))  # no duplicated steps after resume
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert all(x["data_wait_s"] >= 0 for x in la + lb)


def test_last_checkpoint_without_engine_state_and_a_kill_before_the_final_copy(tiny_model_dir, tmp_path):
    """``run.final_engine_state=false`` (what the pipeline sets): the last checkpoint has no optimizer or RNG
    state and is not resumable, a mid-run one keeps them, and the weights equal a run that kept everything.
    Would catch: the mid-run checkpoint losing its state, a different final model, and a kill after the last
    checkpoint but before ``final/`` retraining (or refusing to resume: no resumable checkpoint is left)."""
    data = make_pairs(tmp_path / "d.jsonl", n=32, k=2)
    full = run(train_cfg(tiny_model_dir, data, tmp_path / "a", max_steps=4, save_every=2, keep_last=10))
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "b", max_steps=4, save_every=2, keep_last=10)
    cfg.run.final_engine_state = False
    lean = run(cfg)
    last, mid = tmp_path / "b" / "checkpoints" / "step_0000004", tmp_path / "b" / "checkpoints" / "step_0000002"
    assert not (last / "engine").exists() and not list(last.glob("rng_rank*.pt"))
    assert json.loads((last / "train_state.json").read_text())["resumable"] is False
    assert (mid / "engine").is_dir() and list(mid.glob("rng_rank*.pt"))
    assert (tmp_path / "a" / "checkpoints" / "step_0000004" / "engine").is_dir()
    a, b = load_file(full / "model.safetensors"), load_file(lean / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    # the weights are linked, not copied; the card is a copy of its own (evaluation rewrites it)
    assert os.path.samefile(lean / "model.safetensors", last / "model" / "model.safetensors")
    assert not os.path.samefile(lean / "README.md", last / "model" / "README.md")

    import shutil

    shutil.rmtree(lean)  # as a kill between the last checkpoint and the final copy leaves it
    steps = (tmp_path / "b" / "metrics.jsonl").read_text()
    again = run(cfg)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == steps  # no step trained again
    c = load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_with_another_config_is_refused_unless_forced(tiny_model_dir, tmp_path):
    """A rerun of a run folder with a changed setting that matters (the learning rate) stops with one
    ConfigError naming the change and how to go on, instead of silently mixing two configs; a change that
    only says how often to save is allowed; run.resume=force continues; run_meta.json records the hash."""
    from qwen3train.errors import ConfigError

    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=2, keep_last=10)

    def crash(step):
        if step == 3:
            raise Crash()

    with pytest.raises(Crash):
        run(cfg, hooks=crash)
    first = json.loads((tmp_path / "r" / "run_meta.json").read_text())
    assert len(first["config_hash"]) == 12
    changed = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=2, keep_last=10, lr=5e-3)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.005.*run.resume=force"):
        run(changed)
    harmless = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=3, keep_last=10)
    with pytest.raises(Crash):  # same hash: it resumes (and reaches the crash hook again at step 3)
        run(harmless, hooks=lambda step: (_ for _ in ()).throw(Crash()) if step == 3 else None)
    changed.run.resume = "force"
    run(changed)
    meta = json.loads((tmp_path / "r" / "run_meta.json").read_text())
    assert meta["config_hash"] != first["config_hash"]


def test_pruning_keeps_last_and_every(tiny_model_dir, tmp_path):
    from qwen3train.train.checkpoint import list_checkpoints

    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=1, keep_last=2)
    cfg.run.keep_every = 3
    run(cfg)
    names = [p.name for p in list_checkpoints(tmp_path / "r")]
    assert names == ["step_0000003", "step_0000005", "step_0000006"]


@pytest.mark.parametrize("limit", [0, 2])
def test_non_finite_loss_stops_with_clear_message(tiny_model_dir, tmp_path, limit):
    """A temperature of 1e-45 makes every step's loss and gradients non-finite: the run skips
    ``run.skip_nonfinite_steps`` of them in a row, then stops at the next (0: at the first), naming the last
    good checkpoint and the file listing each skipped step's records. It fails if a non-finite step is applied
    or skipped without limit (the run would end as if trained)."""
    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, temperature=1e-45)
    cfg.run.skip_nonfinite_steps = limit
    with pytest.raises(TrainingDiverged, match=rf"non-finite loss .* at step {limit + 1}: {limit + 1} step\(s\) in a "
                                               rf"row, more than run.skip_nonfinite_steps={limit}; stopping"):
        run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "r" / "skipped_steps.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, limit + 2))
    assert all(len(x["records"]) == 8 and not x["update_applied"] for x in lines)
    assert not (tmp_path / "r" / "final").exists()


def test_a_step_with_nonfinite_gradients_is_skipped(tiny_model_dir, tmp_path):
    """Step 3's gradients made NaN (its loss times NaN, the real backward and engine step): the update is dropped,
    as DeepSpeed drops an overflow: after step 3 the weights, AdamW's moments and the schedule are exactly those
    after step 2 (the old loop applied it: NaN weights, the run stopped), the step is marked in the metrics, its
    8 records (queries of the data file) are listed, and the run trains on to step 6 with finite losses."""
    from faults import nonfinite

    data = make_pairs(tmp_path / "d.jsonl", n=48, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=6, save_every=1, keep_last=10)
    undo = nonfinite({3})
    try:
        run(cfg)
    finally:
        undo()

    def engine(step):
        return torch.load(tmp_path / "r" / "checkpoints" / f"step_{step:07d}" / "engine" / "engine.pt",
                          weights_only=False)

    two, three, four = engine(2), engine(3), engine(4)
    for k, v in two["model"].items():
        assert torch.equal(v, three["model"][k]), k
        assert torch.isfinite(v).all(), k
    assert any(not torch.equal(v, four["model"][k]) for k, v in three["model"].items())
    moments = [(a, b) for sa, sb in zip(two["optimizer"]["state"].values(), three["optimizer"]["state"].values())
               for a, b in ((sa["exp_avg"], sb["exp_avg"]), (sa["exp_avg_sq"], sb["exp_avg_sq"]), (sa["step"], sb["step"]))]
    assert moments and all(torch.equal(a, b) for a, b in moments)
    assert two["scheduler"]["last_epoch"] == three["scheduler"]["last_epoch"] == four["scheduler"]["last_epoch"] - 1
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m.get("skipped", 0) for m in metrics] == [0, 0, 1, 0, 0, 0]
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(metrics) if i != 2)
    assert metrics[2]["lr"] == metrics[1]["lr"] != metrics[3]["lr"]
    (line,) = [json.loads(x) for x in (tmp_path / "r" / "skipped_steps.jsonl").read_text().splitlines()]
    queries = {json.loads(x)["query"] for x in data.read_text().splitlines()}
    assert line["step"] == 3 and len(line["records"]) == 8 and {r["query"] for r in line["records"]} <= queries
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()


def test_malformed_data_through_the_loop(tiny_model_dir, tmp_path):
    from qwen3train.data.records import DataError

    data = make_pairs(tmp_path / "d.jsonl", n=20, k=2)
    with open(data, "a") as f:
        f.write('{"query": "x", "pos": "not a list", "neg": ["n"]}\n')
    with pytest.raises(DataError, match=r"d.jsonl:21: field 'pos'"):
        run(train_cfg(tiny_model_dir, data, tmp_path / "r"))
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "s", max_steps=1)
    cfg.data.on_error = "skip"
    run(cfg)
    summary = json.loads((tmp_path / "s" / "data_summary.json").read_text())
    assert summary["records"] == 20 and summary["rejected"] == 1
    assert (tmp_path / "s" / "rejects.jsonl").read_text().count("\n") == 1


@pytest.mark.slow
def test_make_stage1_then_stage2_loss_falls(tiny_model_dir, tmp_path):
    """The real CLI on the demo data (stdlib docstrings): stage 2 starts from stage 1's export."""
    from qwen3train.data.demo import build

    build(tmp_path / "data")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    common = [f"model.name_or_path={tiny_model_dir}"]
    s1 = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", *common,
          f"run.output_dir={tmp_path}/s1", f"data.train_files=[{tmp_path}/data/train_pairs.jsonl]", "run.max_steps=30"]
    s2 = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage2", *common,
          f"run.output_dir={tmp_path}/s2", f"model.init_from={tmp_path}/s1/final",
          f"data.train_files=[{tmp_path}/data/train_hn.jsonl]", "run.max_steps=20"]
    for cmd in (s1, s2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("s1", "s2"):
        losses = [json.loads(x)["loss"] for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (stage, losses)
    assert (tmp_path / "s2" / "final" / "modules.json").exists()


def test_every_step_logs_the_host_memory_the_process_holds(tiny_model_dir, tmp_path):
    """``host_rss_gib`` in metrics.jsonl is the process's resident memory at that step: the reader follows 256 MiB
    mapped and touched (and their release), and every row of a run has a value in the range of the process's
    resident memory. Would catch the peak (``ru_maxrss``, which never falls) or virtual size logged instead, pages
    read as bytes or as KiB, or a row without it. (Mapped directly: an allocator that keeps what it freed, as a
    process with glibc's MALLOC_MMAP_MAX_=0 does, or one loaded by a library, hands a heap block back without a
    new page: seen in a CI simulation, where the pytest worker's resident memory did not move for a 256 MiB array.)"""
    import mmap

    from qwen3train.train.telemetry import host_rss_gib

    size, page = 256 * 2**20, mmap.PAGESIZE
    before = host_rss_gib()
    block = mmap.mmap(-1, size)
    for offset in range(0, size, page):  # one byte per page: every page resident
        block[offset] = 1
    held = host_rss_gib()
    block.close()
    after = host_rss_gib()
    assert 0.24 <= held - before <= 0.30 and held - after >= 0.24, (before, held, after)
    data = make_pairs(tmp_path / "d.jsonl", n=24, k=2)
    run(train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=2))
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    now = host_rss_gib()
    assert len(rows) == 2 and all(0.1 < r["host_rss_gib"] <= 1.5 * now for r in rows), (rows, now)


def test_wandb_offline_logging(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    data = make_pairs(tmp_path / "d.jsonl", n=24, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=2)
    cfg.run.wandb = True
    run(cfg)
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_wandb_unreachable_or_failing_never_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Logged in (a key) but the server unreachable (a closed local port, as on compute nodes without network):
    the run trains, says so in a note and logs offline under the same run id; later a failing ``log`` is a note
    and metrics.jsonl still has every step. Would catch: wandb's CommError as the run's traceback at step 0
    (before: after wandb's 90 s init timeout), the offline retry refused ("run ID ... is in use") without the
    teardown, a logging error that stops training."""
    import socket

    import wandb

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    wandb.teardown()  # wandb reads the environment once per process: an earlier test's settings would stay
    calls = [0]
    real_log = wandb.sdk.wandb_run.Run.log

    def log(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("the wandb service is gone")
        return real_log(self, *a, **k)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    data = make_pairs(tmp_path / "d.jsonl", n=24, k=2)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "r", max_steps=3)
    cfg.run.wandb = True
    try:
        run(cfg)
    finally:
        wandb.teardown()  # this test's unreachable server is not left in the settings of the worker's later tests
    out = capsys.readouterr().out
    assert "note: wandb could not start online (CommError" in out and "logging offline in" in out, out[-3000:]
    assert "note: wandb stopped taking metrics at step 2 (RuntimeError: the wandb service is gone)" in out
    assert calls[0] == 2  # not called again after the failure
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(wandb_run_id_of(cfg)), runs
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def wandb_run_id_of(cfg):
    from qwen3train.train import identity
    from qwen3train.train.telemetry import wandb_run_id

    return wandb_run_id(cfg.run.name, identity.config_hash(cfg))


def test_wandb_goes_online_when_logged_in(tmp_path, monkeypatch):
    """`wandb login` stores the key in ~/.netrc and no WANDB_API_KEY is set: the run must go online (the
    old rule forced offline whenever WANDB_API_KEY was unset); no key anywhere: offline; WANDB_MODE wins.
    The run id carries the config hash, so two configs of one run name never merge."""
    from qwen3train.train.telemetry import wandb_mode, wandb_run_id

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    rc = tmp_path / "netrc"
    rc.write_text("machine other.host login user password x\n")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    assert wandb_mode() == "offline"
    rc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    assert wandb_run_id("stage1/a b", "0a1b2c3d4e5f") == "stage1-a-b-0a1b2c3d4e5f"


def test_multirun_jobs_get_their_own_folders(tiny_model_dir, tmp_path):
    """`-m optim.lr=a,b`: each job trains in <output_dir>/<num>_<overrides>, with its own config; before,
    both jobs wrote one folder and the second resumed the first."""
    data = make_pairs(tmp_path / "d.jsonl", n=24, k=0)
    cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=stage1", "-m", "optim.lr=1e-3,2e-3",
           f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{data}]", "run.max_steps=2",
           "engine.micro_batch_size=8", "engine.global_batch_size=8", f"run.output_dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "final").is_dir())
    assert jobs == ["0_optim.lr=0.001", "1_optim.lr=0.002"], jobs
    for name, lr in zip(jobs, ("0.001", "0.002")):
        assert f"lr: {lr}" in (tmp_path / "sweep" / name / "config.yaml").read_text()
        assert len((tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines()) == 2  # not resumed
