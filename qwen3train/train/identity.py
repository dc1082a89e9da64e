"""What a run folder is: the hash of its resolved config, the package version, the git commit and the
command-line overrides (``<run>/run_meta.json``), and the rule that a run resumes only with the config
it was started with.

The hash covers everything that changes the result; settings that only say where and how often to
write (``run.name``, ``run.output_dir``, ``run.save_every``, ``run.keep_*``, ``run.resume``,
``run.wandb*``) are left out, so a resumed run may keep fewer checkpoints or log elsewhere. A change of the
micro batches alone resumes where the loss does not depend on them (``MEMORY_ONLY``: the fix for a run
stopped out of memory). The training data is part of a run too: ``check_data`` refuses a resume on other
records (``<run>/data_fingerprint.json``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

NEUTRAL = {"run": {"name", "output_dir", "save_every", "keep_last", "keep_every", "export_checkpoints", "resume",
                   "wandb", "wandb_project"}}
RESUME_MODES = ("auto", "force", "never")
# Fields added after a release, at their defaults (the same results as before: optim.fused=null computes the same
# AdamW update with torch's fused kernel, equal to rounding). Both a run's identity (resuming a stopped stage) and
# the pipeline's stage markers (skipping a finished one) leave them out while they hold that default, so a run
# started by the previous version resumes after an upgrade: a new field changes the resolved config. Dotted from
# the config's top; a field set to anything else counts as usual. Add each new field here with that default.
# ``name[]`` stands for every item of the list ``name`` (the sources of a mixture).
LATE_DEFAULTS = {"optim.fused": None, "rerank_fusion": None, "rerank_fusion_dev_file": None,
                 "data.mixture[].stream_split": "auto", "loss.mask_not_neg": True,
                 "data.mixture[].format": "qwen3train", "data.mixture[].columns": {}, "loss.kd_weight": 0.0,
                 "loss.kd_temperature": 1.0,
                 "loss.hardness_strength": 0.0, "consistency_top_k": None}  # mining's (its stage marker's config has it at the top)
# Fields added after a release that only say what to write, never what is computed: left out at any value (as
# NEUTRAL's are, and from the stage markers too). run.skip_nonfinite_steps changes nothing a finite run computes:
# a run stopped by it resumes with a higher limit.
LATE_NEUTRAL = ("run.final_engine_state", "data.prefetch", "data.stream_retries", "run.skip_nonfinite_steps", "engine.rehearse_memory",
                "engine.fsdp_load", "engine.fsdp_shard_size", "engine.zero3_init",
                "engine.fsdp_reshard_after_forward", "run.stall_report_s", "run.save_in_background",
                "stall_report_s",  # mining's, the filter's, evaluation's (their stage markers' configs have it at the top)
                "eval.stall_report_s",  # the pipeline's evaluation section
                # how evaluation on several processes cuts and waits for its encoding (the scores do not change):
                # at the top of evaluation's stage marker, in the pipeline's eval section
                "encode_chunk_size", "encode_timeout_min", "eval.encode_chunk_size", "eval.encode_timeout_min")
# How a batch is cut into micro batches: memory, not results, where the loss does not depend on the cut
# (GradCache, the reranker: ``train.memory.loss_keeps``). A run stopped out of memory resumes with a smaller
# micro batch; the hash still covers them (a finished stage with another cut is another run of the pipeline).
MEMORY_ONLY = ("engine.micro_batch_size", "engine.micro_batch_tokens")
_ANY = object()


def normalize_resume(value) -> str:
    """``run.resume``: auto (resume a run of the same config, refuse another), force, never; true/false
    (the former spellings) mean auto/never."""
    v = str(value).strip().lower()
    v = {"true": "auto", "false": "never", "yes": "auto", "no": "never"}.get(v, v)
    if v not in RESUME_MODES:
        raise ValueError(f"run.resume must be one of {RESUME_MODES} (or true/false), got {value!r}")
    return v


def config_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def drop_late_defaults(tree: dict) -> dict:
    """``tree`` (a config as nested dicts) without the ``LATE_DEFAULTS`` fields that hold their default and
    without the ``LATE_NEUTRAL`` ones; in place."""
    for dotted, default in [*LATE_DEFAULTS.items(), *((d, _ANY) for d in LATE_NEUTRAL)]:
        *parents, key = dotted.split(".")
        nodes = [tree]
        for p in parents:
            nodes = [n.get(p.removesuffix("[]")) for n in nodes if isinstance(n, dict)]
            if p.endswith("[]"):
                nodes = [item for n in nodes if isinstance(n, list) for item in n]
        for node in nodes:
            if isinstance(node, dict) and key in node and (default is _ANY or node[key] == default):
                del node[key]
    return tree


def _strip(d: dict) -> dict:
    out = drop_late_defaults(json.loads(json.dumps(d, default=str)))
    for section, keys in NEUTRAL.items():
        for k in keys:
            out.get(section, {}).pop(k, None)
    return out


def config_hash(cfg_or_dict) -> str:
    d = cfg_or_dict if isinstance(cfg_or_dict, dict) else config_dict(cfg_or_dict)
    return hashlib.sha256(json.dumps(_strip(d), sort_keys=True).encode()).hexdigest()[:12]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changes(old: dict, new: dict) -> dict[str, tuple]:
    a, b = _flatten(_strip(old)), _flatten(_strip(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def changed_keys(old: dict, new: dict, limit: int = 4) -> str:
    diffs = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes(old, new).items()]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not under @hydra.main (tests, library use)
        return []


def meta(cfg) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("qwen3train")
    except PackageNotFoundError:
        ver = None
    return {"config_hash": config_hash(cfg), "version": ver,
            "git_commit": git_commit(Path(__file__).resolve().parents[2]), "overrides": overrides()}


def check_resume(run_dir: Path, cfg, mode: str) -> None:
    """Refuse to resume a run folder whose recorded config differs from this one (unless ``force``)."""
    from qwen3train.errors import ConfigError

    recorded = run_dir / "run_meta.json"
    if mode == "force" or not recorded.exists():
        return
    old = json.loads(recorded.read_text())
    new_hash = config_hash(cfg)
    if old.get("config_hash") == new_hash:
        return
    diff = ""
    old_cfg = run_dir / "config.yaml"
    if old_cfg.exists():
        from omegaconf import OmegaConf

        from qwen3train.train.memory import loss_keeps

        before, now = OmegaConf.to_container(OmegaConf.load(old_cfg)), config_dict(cfg)
        changed = changes(before, now)
        if changed and set(changed) <= set(MEMORY_ONLY) and loss_keeps(cfg):
            from qwen3train import dist

            if dist.is_main():
                print(f"note: resuming with another micro batch ({changed_keys(before, now)}): "
                      f"memory only, the loss does not depend on it", flush=True)
            return
        diff = f" (changed: {changed_keys(before, now)})"
    raise ConfigError(
        f"{run_dir} holds a run of another config (hash {old.get('config_hash')}, now {new_hash}){diff}: "
        f"continue it with this config with run.resume=force, start over with run.resume=never, "
        f"or write elsewhere with run.output_dir=...")


DATA = "data_fingerprint.json"


def check_data(run_dir: Path, fingerprint: list, mode: str, step: int) -> None:
    """Refuse to resume on training data other than the run started with (``<run>/data_fingerprint.json``,
    written when it started): the batch plans follow from the records, so other data means other batches
    from the checkpoint on, silently. ``force`` goes on with the new data (said in a note); a run folder
    written before the fingerprint existed is not checked. Every rank checks (a collective mistake)."""
    from qwen3train import dist
    from qwen3train.errors import ConfigError

    path = run_dir / DATA
    if not path.exists():
        return
    old = json.loads(path.read_text())["sources"]
    fingerprint = _as_then(old, fingerprint)
    if old == fingerprint:
        return
    what = _data_change(old, fingerprint)
    if mode == "force":
        if dist.is_main():
            print(f"note: the training data changed since this run started ({what}); run.resume=force: going on "
                  f"with the new data from step {step}", flush=True)
        return
    raise ConfigError(f"the training data changed since this run started: {what}. Resuming at step {step} would "
                      f"draw other batches than the run began with: restore the data, continue on the new data with "
                      f"run.resume=force, or start over with run.resume=never")


def write_data(run_dir: Path, fingerprint: list) -> None:
    tmp = run_dir / f".{DATA}.tmp"
    tmp.write_text(json.dumps({"sources": fingerprint}, indent=1))
    tmp.replace(run_dir / DATA)


# what a data fingerprint came to hold after runs had begun: compared only where the run's first one has it
LATER_FINGERPRINT_KEYS = ("content", "files", "ends")


def _as_then(old: list, new: list) -> list:
    """``new`` without what the run's first fingerprint lacks of ``LATER_FINGERPRINT_KEYS`` (a file's ``content``
    digest, a stream's ``files`` or their ``ends`` digests: a run begun before they were recorded, or on an index
    built before): compared on what both know."""
    def strip(a, b):
        if isinstance(a, list) and isinstance(b, list):
            return [strip(x, y) for x, y in zip(a, b)] + b[len(a):]
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: strip(a[k], v) if k in a else v for k, v in b.items()
                    if k in a or k not in LATER_FINGERPRINT_KEYS}
        return b

    return strip(old, new)


def _data_change(old: list, new: list) -> str:
    if len(old) != len(new):
        return f"{len(old)} sources then, {len(new)} now"
    for a, b in zip(old, new):
        if a == b:
            continue
        if isinstance(a, dict) and "streamed" in a:
            return _stream_change(a, b)
        a, b = (x if isinstance(x, list) else [x] for x in (a, b))
        if [f.get("file") for f in a] != [f.get("file") for f in b]:
            return f"files {[f.get('file') for f in a]} then, {[f.get('file') for f in b]} now"
        for fa, fb in zip(a, b):
            if fa != fb:
                if fa.get("records") != fb.get("records"):
                    return f"{fa['file']}: {fa['records']:,} records then, {fb['records']:,} now"
                if fa.get("digest") == fb.get("digest"):
                    return (f"{fa['file']}: the same {fa.get('records', 0):,} records at the same places, with "
                            f"other text in them (edited in place)")
                return f"{fa['file']}: {fa.get('records', 0):,} records then and now, with other content"
    return "other sources"


def _stream_change(a: dict, b) -> str:
    now_name = b.get("streamed") if isinstance(b, dict) else None
    if now_name != a["streamed"]:
        return f"the streamed source {a['streamed']} then, {now_name or 'an indexed one'} now"
    then, now = a.get("files", []), b.get("files", [])
    names_then, names_now = [f["file"] for f in then], [f["file"] for f in now]
    if names_then != names_now:
        gone = [f for f in names_then if f not in names_now][:3]
        new = [f for f in names_now if f not in names_then][:3]
        return (f"{a['streamed']}: {len(then)} files then, {len(now)} now (another revision or other files; "
                f"then: {gone}, now: {new})")
    for fa, fb in zip(then, now):
        if fa != fb:
            if fa.get("bytes") == fb.get("bytes"):
                return f"{fa['file']}: the same {fa.get('bytes')} bytes, rewritten (other content at its start or end)"
            return f"{fa['file']}: {fa.get('bytes')} bytes then, {fb.get('bytes')} now"
    return f"{a['streamed']}: other files"
