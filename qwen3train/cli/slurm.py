"""SLURM's environment -> the launcher's (``scripts/launch.sh``): nodes, this node's rank, the master
address and port, processes per node. Used by ``scripts/train_slurm.sh``:

    eval "$(python -m qwen3train.cli.slurm)"    # prints: export NNODES=2 NODE_RANK=1 MASTER_ADDR=gpu017 ...

* ``NNODES``: ``SLURM_JOB_NUM_NODES`` (or ``SLURM_NNODES``).
* ``NODE_RANK``: ``SLURM_NODEID`` (set inside an ``srun`` step; with one task per node it equals
  ``SLURM_PROCID``).
* ``MASTER_ADDR``: the first host of ``SLURM_JOB_NODELIST`` (compressed lists such as
  ``gpu[007-009,012],cpu3`` are expanded here; ``scontrol`` is not needed).
* ``MASTER_PORT``: ``MASTER_PORT`` if set, else ``20000 + SLURM_JOB_ID % 20000``: the same on every
  node of a job, different for two jobs sharing a node.
* ``NGPU`` (processes per node): ``NGPU`` if set, else ``SLURM_GPUS_ON_NODE``, else the count in
  ``SLURM_GPUS_PER_NODE`` (``8`` or ``h100:8``), else the devices in ``CUDA_VISIBLE_DEVICES``, else 1.
"""

from __future__ import annotations

import os
import re
import shlex
import sys


def expand_hostlist(spec: str) -> list[str]:
    """``"gpu[01-03,07],login"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login"]`` (zero padding kept;
    several bracket groups in one name are expanded left to right)."""
    hosts = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", spec):
        item = item.strip()
        if not item:
            continue
        names = [""]
        for prefix, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if not prefix and not group:
                continue
            parts = []
            for rng in group.split(",") if group else []:
                if "-" in rng:
                    lo, hi = rng.split("-", 1)
                    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                        raise ValueError(f"SLURM host list {spec!r}: bad range {rng!r}")
                    parts += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
                else:
                    parts.append(rng)
            names = [n + prefix + p for n in names for p in (parts or [""])]
        hosts += names
    return hosts


def _gpus_per_node(env) -> int:
    if env.get("NGPU"):
        return int(env["NGPU"])
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    per_node = env.get("SLURM_GPUS_PER_NODE", "")
    if per_node:
        m = re.search(r"(\d+)\s*$", per_node.split("(")[0])
        if m:
            return int(m.group(1))
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible != "NoDevFiles":
        return len([d for d in visible.split(",") if d.strip()])
    return 1


def launcher_env(env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("not inside a SLURM allocation: SLURM_JOB_NODELIST is not set (submit with sbatch)")
    hosts = expand_hostlist(nodelist)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    node_rank = int(env.get("SLURM_NODEID") or env.get("SLURM_PROCID") or 0)
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside the job's {nnodes} nodes")
    port = env.get("MASTER_PORT", "")
    if port in ("", "auto"):  # "auto" is the Makefile's default: one port for all nodes comes from the job id
        port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
            "MASTER_PORT": port, "NGPU": str(_gpus_per_node(env))}


def main() -> None:
    try:
        out = launcher_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
