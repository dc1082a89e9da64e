"""A finished pipeline stage's marker (``<stage>/.done.json``): what it records of the stage's config and inputs,
and the rule that decides whether the stage is unchanged (skipped on a rerun) or runs again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from qwen3train.train.identity import drop_late_defaults


def config_hash(cfg) -> str | None:
    """The stage config's resolved YAML, hashed; fields added since a release count only once set
    (``identity.LATE_DEFAULTS``), so a finished stage stays finished after an upgrade."""
    if cfg is None:
        return None
    tree = drop_late_defaults(OmegaConf.to_container(OmegaConf.structured(cfg)))
    text = OmegaConf.to_yaml(OmegaConf.create(tree), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


CARD_FILES = ("README.md", "qwen3train.json")  # an export's model card, and its facts (the card among them)


def _card_free(f: Path) -> str:
    """An export's ``qwen3train.json`` without its ``card`` (which evaluation rewrites), hashed."""
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        st = f.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if isinstance(meta, dict):
        meta.pop("card", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def path_fingerprint(path: Path, cards: bool = False) -> str:
    """Size and modification time of a file, or of every file under a folder (hidden ones excepted).

    In a folder, model cards do not count: ``make eval`` writes its results into each export's card
    (README.md and the ``card`` of qwen3train.json), and a finished stage must not rerun because a later
    stage scored its model (before, every rerun of a finished pipeline trained again from the filter on).
    ``cards=True``: the earlier fingerprint, cards included (to read markers written before)."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return "absent"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.name == CARD_FILES[0] and not cards:
            continue
        if f.name == CARD_FILES[1] and not cards:
            h.update(f"{f.relative_to(path)}:{_card_free(f)}\n".encode())
            continue
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def unchanged(marker: dict, finger: dict, inputs: list) -> bool:
    """Whether a stage's ``.done.json`` matches its config and inputs now. Markers without a fingerprint
    (the oldest) are trusted; markers before version 2 counted model cards, and are compared that way."""
    if "fingerprint" not in marker or marker["fingerprint"] == finger:
        return True
    if "fingerprint_version" in marker:
        return False
    return marker["fingerprint"] == dict(finger, inputs={str(i): path_fingerprint(Path(i), cards=True) for i in inputs})
