"""The command line checked before Hydra runs it: the config composed once, as the run will compose it, so that a
wrong key, type or value in the overrides or in a config of the user's own ``--config-dir`` is one line and status 2
(Hydra itself prints several lines and exits 1); under ``-m`` every value a sweep names is composed the same way
before any job starts. Where the command line means what Hydra would read otherwise, it is respelled: a new key of a
mapping field with Hydra's ``+``, a mapping given whole replacing the default one (``~`` then ``+``), a
``data.mixture`` replacing the config's ``data.train_files``."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

MULTIRUN = ("-m", "--multirun")


def _config_path() -> str:
    """``pkg://qwen3train.configs`` where the package ships its configs (a wheel, an editable install
    that maps them); a source tree without that mapping falls back to the repository's folder."""
    try:
        if importlib.util.find_spec("qwen3train.configs") is not None:
            return "pkg://qwen3train.configs"
    except ModuleNotFoundError:
        pass
    return "../../configs"


def _multi_rank() -> bool:
    return os.environ.get("WORLD_SIZE", "1") != "1"


def report(message: str, collective: bool = True) -> None:
    """Print a user's mistake as one line and exit 2. ``collective``: every rank meets the same mistake
    (the config, a data file the ranks validated together), so only rank 0 prints it; a mistake one
    rank alone meets is printed by that rank, naming it."""
    rank = os.environ.get("RANK", "0")
    if not (collective and _multi_rank() and rank != "0"):
        where = f" (rank {rank})" if _multi_rank() and not collective else ""
        print(f"error{where}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def precheck(argv: list[str]) -> list[str]:
    """The command line checked (``report`` and exit 2 on a mistake) and respelled where it must be."""
    if any(a.startswith(("--help", "-h", "--info", "--cfg")) and a not in MULTIRUN for a in argv):
        return argv
    name, overrides, user_dir, hydra_own = "stage1", [], None, []
    for i, a in enumerate(argv):
        if a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        elif a.startswith("--config-dir="):
            user_dir = a.split("=", 1)[1]
        elif a in ("--config-dir", "-cd") and i + 1 < len(argv):
            user_dir = argv[i + 1]
        elif (i and argv[i - 1] in ("--config-dir", "-cd")) or a in MULTIRUN:
            continue  # the folder of `--config-dir DIR`; the sweep flag
        elif a.startswith("--"):
            return argv  # another Hydra flag: let Hydra handle the whole command line
        elif not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra")):
            overrides.append(a)
        else:
            hydra_own.append(a)
    shadowed = _shadowed(user_dir, name) if user_dir is not None else []
    runs = [overrides]
    if any(a in MULTIRUN for a in argv):
        runs = _sweep(overrides, lambda group: _options(user_dir, group))
        _sampled_by_the_sweeper(name, overrides, hydra_own, user_dir)
    respelled, added = {}, []
    for k, run in enumerate(runs):
        spelled, more = _settle(name, run, user_dir, shadowed)
        if k == 0:  # the first run's respellings of what every run shares (a swept value differs between runs)
            respelled, added = {o: new for o, new in spelled.items() if o in overrides}, more
    return [b for a in argv for b in respelled.get(a, [a])] + added


def _sweep(overrides: list[str], options=None) -> list[list[str]]:
    """The runs to compose for a sweep: each swept key's first value with the rest, then each other value of each
    swept key in turn (a bad value anywhere in the sweep is met; not every combination). A ``glob`` over a config
    group is the group's options it matches (``options(group)``: what Hydra's basic sweeper runs; none matching is
    the command line's mistake); an ``interval`` (a range an optimizing sweeper samples) is composed at both ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - a sweep the parser refuses is the command line's mistake
        report(str(e).strip().splitlines()[0])
    values = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
            continue
        key, value = o.get_key_element(), o.value()
        if isinstance(value, IntervalSweep):
            values.append([f"{key}={value.start}", f"{key}={value.end}"])
        elif isinstance(value, Glob):
            matched = value.filter(options(key)) if options else []
            if not matched:
                report(f"{o.input_line}: matches no option of config group '{key}'"
                       + (f" (options: {', '.join(options(key))})" if options else ""))
            values.append([f"{key}={v}" for v in matched])
        else:
            values.append([f"{key}={v}" for v in o.sweep_string_iterator()])
    first = [v[0] for v in values if v]
    runs = [first]
    for i, vals in enumerate(values):
        runs += [first[:i] + [v] + first[i + 1:] for v in vals[1:]]
    return runs


def _sampled_by_the_sweeper(name: str, overrides: list[str], hydra_own: list[str], user_dir: str | None) -> None:
    """An ``interval`` is sampled by an optimizing sweeper (Optuna's, Ax's); under Hydra's basic one (the default)
    the sweep stopped with its traceback ("BasicSweeper does not support sweep type"): one line instead."""
    intervals = [o for o in overrides if re.search(r"=\s*(tag\(.*)?interval\(", o)]
    if not intervals:
        return
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    first = [o for o in overrides if o not in intervals]
    try:
        with _initialize(user_dir):
            target = compose(config_name=name, overrides=first + hydra_own, return_hydra_config=True) \
                .hydra.sweeper.get("_target_", "")
    except Exception as e:  # noqa: BLE001 - a sweeper override that does not compose (its plugin missing)
        report(_one_line(e, f"{e} {e.__cause__ or ''}"))
    finally:
        GlobalHydra.instance().clear()
    if target.endswith("BasicSweeper"):
        report(f"{intervals[0]}: an interval is sampled by an optimizing sweeper (hydra/sweeper=optuna, with "
               f"hydra-optuna-sweeper installed); Hydra's basic sweeper runs lists, range() and glob(): e.g. "
               f"{intervals[0].split('=', 1)[0]}=1e-5,1e-4,1e-3")


def _options(user_dir: str | None, group: str) -> list[str]:
    """The options of a config group on the command's search path (ours, then ``--config-dir``'s)."""
    from hydra.core.global_hydra import GlobalHydra

    with _initialize(user_dir):
        names = GlobalHydra.instance().config_loader().get_group_options(group)
    GlobalHydra.instance().clear()
    return sorted(names)


def _settle(name: str, overrides: list[str], user_dir: str | None,
            shadowed: list[str] = ()) -> tuple[dict[str, list[str]], list[str]]:
    """Compose until the command line means what it says: (override -> its respelling, overrides added); a mistake
    is reported (one line, exit 2), as is a group option the run chooses that is one of ``shadowed`` (a file of
    the user's that ours of the same name hides)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    overrides, respelled, added = list(overrides), {}, []

    def respell(old: str, new: list[str]) -> None:
        j = overrides.index(old)
        overrides[j:j + 1] = new
        respelled[old] = new

    for _ in range(len(overrides) + 3):
        init = _initialize(user_dir)
        try:
            with init:
                cfg = compose(config_name=name, overrides=overrides)
                replaced = _replaced_data(cfg, overrides)
                if replaced:  # (each added once: the next compose finds the pair settled)
                    overrides += replaced
                    added += replaced
                    continue
                merged = [o for o in overrides if _whole_mapping(o) and _plain_mapping(cfg, o.split("=", 1)[0])]
                if not merged:
                    OmegaConf.to_object(cfg)
                    if shadowed:
                        _chosen(compose(config_name=name, overrides=overrides, return_hydra_config=True), shadowed,
                                user_dir)
                    return respelled, added
            for o in merged:  # Hydra merged a mapping given whole into the default; it replaces it
                respell(o, [f"~{o.split('=', 1)[0]}", f"+{o}"])
            continue
        except Exception as e:  # noqa: BLE001 - composition failures are the command line's mistakes
            if os.environ.get("QWEN3TRAIN_DEBUG") == "1":
                raise
            text = f"{e} {e.__cause__ or ''}"
            new_key = re.search(r"Could not override '([^']+)'", text)
            if new_key and "is not in struct" in text:  # a new key: fine in a mapping (a dataclass refuses
                key = new_key.group(1)  # it again below, naming it), so retry it with Hydra's +; a mapping
                at = next((i for i, o in enumerate(overrides) if o.split("=", 1)[0] == key), None)
                if at is not None:  # given whole (models={a: x}) replaces the default one: ~ then +
                    o = overrides[at]
                    respell(o, [f"~{key}", f"+{o}"] if _whole_mapping(o) else [f"+{o}"])
                    continue
            report(_one_line(e, text))
        finally:
            GlobalHydra.instance().clear()
    return respelled, added


def _one_line(e: Exception, text: str) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines()
             if ln.strip() and not ln.startswith("To append")][:2]  # no "+" hint: a schema refuses it
    if e.__cause__ is not None and str(e.__cause__).strip():  # Hydra puts the reason in the cause
        lines.append(str(e.__cause__).strip().splitlines()[0])
    options = re.search(r"Available options in '[^']+':\s*\n((?:\s+\S+\n?)+)", str(e))
    if options:  # a group option that is not there: the ones that are, on the same line
        lines[-1] = lines[-1].rstrip(":") + ": " + ", ".join(options.group(1).split())
    full_key = re.search(r"full_key: (\S+)", text)  # a config file's value: Hydra names the key below
    if full_key and full_key.group(1) not in " ".join(lines):
        lines.append(f"(key {full_key.group(1)})")
    key = re.search(r"override (\S+?)=", text)
    if "is not a ListConfig, list or tuple" in text and key:  # a list given as one value
        lines.append(f"(a list: {key.group(1)}=[...], e.g. {key.group(1)}=[a,b])")
    return " ".join(lines) if lines else type(e).__name__


def _ours() -> Path:
    """The folder of our configs."""
    path = _config_path()
    if path.startswith("pkg://"):  # (a package folder: an installed wheel's, or the one an editable install maps)
        return Path(list(importlib.util.find_spec(path[len("pkg://"):]).submodule_search_locations)[0])
    return Path(os.path.dirname(os.path.abspath(__file__))) / path


def _shadowed(user_dir: str, name: str) -> list[str]:
    """Hydra reads our configs before a ``--config-dir`` (its search path: ours, then the command line's), so a file
    of the user's with the name of one of ours is never read: the command's own config so named is one line (the
    run would run ours, silently), other such files one note; returned (a group option the run chooses is refused
    once composed: ``_chosen``)."""
    user = Path(user_dir).resolve()
    if not user.is_dir():
        report(f"--config-dir {user_dir}: no such folder")
    ours = _ours()
    same = sorted(str(f.relative_to(user)) for f in user.rglob("*.yaml") if (ours / f.relative_to(user)).is_file())
    if f"{name}.yaml" in same:
        report(f"--config-dir {user_dir}: {name}.yaml has the name of one of ours, which is read first: yours would "
               f"not be used; give it another name (it can start from ours: defaults: [{name}, _self_])")
    if same and os.environ.get("RANK", "0") == "0":
        print(f"note: {', '.join(same)} in --config-dir {user_dir} have the names of ours, which are read first: "
              f"yours are not used; give them other names", file=sys.stderr, flush=True)
    return same


def _chosen(cfg, shadowed: list[str], user_dir: str) -> None:
    """A group option the composed run uses (``engine=zero2``, named or by default) that is a file of the user's
    hidden by ours: one line, or the run would train with ours."""
    choices = cfg.hydra.runtime.choices
    for rel in shadowed:
        group, _, option = rel.removesuffix(".yaml").rpartition("/")
        if group and choices.get(group) == option:
            report(f"--config-dir {user_dir}: {rel} has the name of one of ours, which is read first: this run "
                   f"({group}={option}) would use ours, not yours; give yours another name ({group}/my_{option}.yaml, "
                   f"then {group}=my_{option}; it can start from ours: defaults: [{option}, _self_])")


def _initialize(user_dir: str | None):
    """Hydra's compose API on the search path the command runs with: our configs, then a ``--config-dir`` of the
    user's (as Hydra's own entry point builds it: the primary config is looked up on the whole path, which the
    public ``initialize_*`` helpers cannot give a second folder for)."""
    import contextlib

    from hydra import initialize_config_dir, initialize_config_module
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    path = _config_path()
    ours = path if path.startswith("pkg://") else str(_ours())
    if user_dir is None:
        return (initialize_config_module(ours[len("pkg://"):], version_base="1.3") if ours.startswith("pkg://")
                else initialize_config_dir(ours, version_base="1.3"))

    @contextlib.contextmanager
    def both():
        search = create_config_search_path(ours)
        search.prepend(provider="command-line", path=f"file://{os.path.abspath(user_dir)}",
                       anchor=SearchPathQuery(provider="schema"))
        GlobalHydra.instance().clear()
        Hydra.create_main_hydra2(task_name="precheck", config_search_path=search)
        try:
            yield
        finally:
            GlobalHydra.instance().clear()

    return both()


def _replaced_data(cfg, overrides: list[str]) -> list[str]:
    """``data.mixture=[...]`` on the command line replaces the files the config names in ``data.train_files`` (every
    stage's config names its demo files there): the override that empties them, where the command line does not
    set them too (both given is still refused)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    out = []
    for key in sorted(keys):
        prefix, _, leaf = key.rpartition(".")
        files = f"{prefix}.train_files"
        if leaf == "mixture" and prefix.rpartition(".")[2] == "data" and files not in keys and \
                OmegaConf.select(cfg, key) and OmegaConf.select(cfg, files):
            out.append(f"{files}=[]")
    return out


def _whole_mapping(override: str) -> bool:
    """``key={...}``: a mapping given whole (not ``key.sub=...``, not already ``+``/``~``)."""
    key, eq, value = override.partition("=")
    return bool(eq) and not key.startswith(("+", "~")) and value.lstrip().startswith("{")


def _plain_mapping(cfg, key: str) -> bool:
    """Whether ``key`` is a free mapping of the config (``eval.models``), not a schema's section (``optim``,
    whose ``optim={lr: 1e-4}`` sets fields and keeps the others)."""
    node = OmegaConf.select(cfg, key)
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict
