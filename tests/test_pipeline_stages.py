"""The pipeline's stage markers: a finished stage is skipped only while its config and inputs are unchanged."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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
