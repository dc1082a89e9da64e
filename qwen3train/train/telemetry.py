"""Metrics: ``metrics.jsonl`` always, a progress bar on rank 0, wandb when enabled.

This is the only module that imports wandb, and only when ``run.wandb=true``: online when the user is
logged in (``WANDB_API_KEY``, or the key ``wandb login`` stored in ~/.netrc), offline otherwise, so runs
on air-gapped clusters still log locally; ``WANDB_MODE`` set by the user wins. The run id carries the
config hash: reruns of one config continue one wandb run, a changed config gets its own. wandb never stops
a run: online but unreachable at the start (logged in on a head node, no network on the compute nodes), the
run logs offline with a note; an error while logging or finishing is a note, and metrics.jsonl has it all.
"""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path

import torch

from qwen3train import dist

# bf16 dense peak FLOP/s, for model-FLOPs utilisation on GPU
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_FLOPS.items():
        if key in name:
            return val
    return None


def host_rss_gib() -> float | None:
    """This process's resident host memory now (Linux: ``/proc/self/statm``, ~10 us; None elsewhere). Logged every
    step, so that memory that creeps up over a long run (a leak in a data path, a cache without a bound) shows
    long before the node's out-of-memory killer ends the run."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when logged in (API key in the environment or in the netrc
    file ``wandb login`` writes, for the configured host); else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        auth = None
    return "online" if auth and auth[2] else "offline"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def start_wandb(**kw):
    """``wandb.init`` in ``wandb_mode()``; online and unreachable (a cluster's compute nodes often have no
    network; a login on the head node makes the mode online): one note and the same run offline, for
    ``wandb sync`` later, never a stopped run."""
    import wandb

    mode = wandb_mode()
    try:
        return wandb.init(mode=mode, **kw)
    except Exception as e:  # noqa: BLE001 - wandb's errors for an unreachable server vary (CommError, timeouts)
        if mode == "offline":
            raise
        wandb.teardown()  # the failed run's id stays taken in wandb's service otherwise
        run = wandb.init(mode="offline", **kw)
        print(f"note: wandb could not start online ({type(e).__name__}: {first_line(e)}); logging offline in "
              f"{Path(run.dir).parent}: `wandb sync` it where the server is reachable", flush=True)
        return run


def wandb_run_id(run_name: str, config_hash: str | None) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name)
    return f"{base}-{config_hash}" if config_hash else base


class Telemetry:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, use_wandb: bool, project: str,
                 run_name: str, config: dict, flops_per_token: float, config_hash: str | None = None) -> None:
        self.main = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self.bar = None
        self.wandb = None
        if not self.main:
            return
        self._truncate_after(start_step)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True)
        if use_wandb:
            self.wandb = start_wandb(project=project, name=run_name, dir=str(run_dir), config=config,
                                     resume="allow", id=wandb_run_id(run_name, config_hash))
        self._t = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def reset_clock(self) -> None:
        """The next step's time starts now (work between steps that is not training: the memory rehearsal)."""
        self._t = time.perf_counter()

    def log(self, step: int, metrics: dict, samples: int, tokens: int) -> None:
        if not self.main:
            return
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        metrics = dict(metrics, step=step, step_time_s=dt, samples_per_s=samples / dt, tokens_per_s=tokens / dt)
        if self.peak:
            metrics["mfu"] = self.flops_per_token * tokens / dt / (self.peak * dist.world_size())
        if torch.cuda.is_available():
            metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30  # this rank's peak so far
        rss = host_rss_gib()
        if rss is not None:
            metrics["host_rss_gib"] = round(rss, 4)  # rank 0's, now
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001 - telemetry never stops training: metrics.jsonl has it all
                print(f"note: wandb stopped taking metrics at step {step} ({type(e).__name__}: "
                      f"{first_line(e)}); the run goes on, its metrics in {self.path}", flush=True)
                self.wandb = None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('acc', float('nan')):.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001 - the run's work is saved; its metrics are in metrics.jsonl
                print(f"note: wandb did not finish ({type(e).__name__}: {first_line(e)})", flush=True)
