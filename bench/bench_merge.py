"""Merge benchmark: slerp of two Qwen3-0.6B-sized checkpoints (random weights, bf16 safetensors).

    .venv/bin/python bench/bench_merge.py

Side by side, each in its own subprocess, in turn (the order rotates each round), WARM timed rounds:
medians, the median of the
per-round ratios (runs made moments apart) and the best run of each (the least disturbed run on a
noisy machine):
  io        pure I/O with our reader and writer: every byte of both inputs read once (memory-mapped,
            pages populated and read ahead as the merge does; one input summed, the other copied
            into the output) and an output of the same size written
  raw       plain file I/O: read both files with readinto (4 MiB buffers), write the first one's bytes
  ours      qwen3train streaming slerp (t=0.5)
  mergekit  mergekit's slerp (t=0.5, --lazy-unpickle), in its own venv (outputs/bench/mergekit-venv)
Then, where the page cache can be dropped (root), 3 cold rounds: caches dropped before every run, so
every input is read from disk (the case of PERF.md 14, where I/O is disk-bound).
Peak memory is sampled in one more, untimed round (sampling /proc every 10 ms slows the child). The
page cache is flushed (``os.sync``) before every run, untimed, so no run pays for the write-back of
the previous one; imports, the load of the merge kernels and an untimed ``back_memory`` step are
outside the timed region.
Targets (PERF.md 14): peak RSS <= 4x the largest tensor in fp32 plus the interpreter; wall <= 2x I/O.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench" / "merge"
MK_VENV = REPO / "outputs" / "bench" / "mergekit-venv"
WARM = 9  # timed rounds with the inputs in the page cache
BACK_MB = 3072  # see back_memory


def make_inputs() -> list[Path]:
    """Two checkpoints with Qwen3-0.6B's shapes (28 layers, hidden 1024, vocab 151,936), written
    tensor by tensor with a config.json so transformers and mergekit recognise the architecture."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
                      torch_dtype="bfloat16", architectures=["Qwen3ForCausalLM"])
    shapes = {"model.embed_tokens.weight": (151936, 1024), "model.norm.weight": (1024,)}
    for i in range(28):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (2048, 1024), p + "self_attn.k_proj.weight": (1024, 1024),
                       p + "self_attn.v_proj.weight": (1024, 1024), p + "self_attn.o_proj.weight": (1024, 2048),
                       p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                       p + "mlp.gate_proj.weight": (3072, 1024), p + "mlp.up_proj.weight": (3072, 1024),
                       p + "mlp.down_proj.weight": (1024, 3072), p + "input_layernorm.weight": (1024,),
                       p + "post_attention_layernorm.weight": (1024,)})
    paths = []
    for seed in (1, 2):
        d = OUT / f"ckpt{seed}"
        paths.append(d)
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(d)
    return paths


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sampled(cmd: list[str], env=None, sample: bool = True) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``, sampling the child's anonymous RSS (RssAnon) and total RSS every 10 ms.

    ru_maxrss counts the pages of memory-mapped safetensors files, which are reclaimable page cache;
    RssAnon is the memory the process itself holds."""
    import threading

    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0, "rss": 0}

    def sample():
        while p.poll() is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("RssAnon:"):
                        peak["anon"] = max(peak["anon"], int(line.split()[1]))
                    elif line.startswith("VmRSS:"):
                        peak["rss"] = max(peak["rss"], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    if sample:
        t.start()
    out, err = p.communicate()
    if sample:
        t.join()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), peak["anon"] / 1024, peak["rss"] / 1024


def back_memory(mb: int) -> None:
    """Touch and free ``mb`` MiB of fresh memory, untimed, just before a timed run.

    On this VM (a balloon device with free-page reporting) memory the guest has freed is handed
    back to the host after a couple of seconds, and the next allocation of it waits on the host:
    writing a 1.14 GB file took 0.2 s in most runs and 1.6-3.4 s in about a third of them, whatever
    wrote it. Touching the memory first, outside the timed region, gives every run (I/O baselines,
    ours, mergekit) the same start: pages that the host already backs."""
    if mb > 0:
        import numpy as np

        a = np.ones(mb << 20, dtype=np.uint8)
        del a


def read_every_byte(t) -> int:
    """Load every byte of ``t`` once, at memory speed (an integer sum over 8-byte words)."""
    import torch

    b = t.reshape(-1).view(torch.uint8)
    n8 = b.numel() // 8 * 8
    try:
        return int(b[:n8].view(torch.int64).sum()) + int(b[n8:].sum())
    except RuntimeError:  # storage not 8-byte aligned
        return int(b.sum())


def worker(kind: str, a: str, b: str, out: str) -> dict:
    from qwen3train.merge.apply import merge_folders
    from qwen3train.merge.io import FolderReader, StreamingSafetensorsWriter, stream_tensors

    from qwen3train.merge import native

    native.lib()  # built once per machine (cached), loaded here: like the imports, not timed
    back_memory(int(os.environ.get("BENCH_BACK_MB", "0")))
    base = rss_mb()
    t = time.perf_counter()  # imports (torch: ~1 s) outside the timed region, for every kind
    if kind == "io":  # our reader and writer, no arithmetic
        ra, rb = FolderReader(a), FolderReader(b)
        keys = ra.keys()
        Path(out).mkdir(parents=True, exist_ok=True)
        w = StreamingSafetensorsWriter(Path(out) / "model.safetensors", [(ra.names[k], *ra.meta(k)) for k in keys])
        for k, (x, y) in stream_tensors([ra, rb], keys):  # the merge's reader, reading ahead
            read_every_byte(y)
            w.write_chunk(x)  # every byte of x read once, by the copy into the output file
            del x, y
        w.close()
    elif kind == "raw":  # plain file I/O: read both files in 4 MiB pieces, write the first one's bytes
        Path(out).mkdir(parents=True, exist_ok=True)
        ba, bb = bytearray(4 << 20), bytearray(4 << 20)
        with open(Path(a) / "model.safetensors", "rb", buffering=0) as fa, \
                open(Path(b) / "model.safetensors", "rb", buffering=0) as fb, \
                open(Path(out) / "model.safetensors", "wb", buffering=0) as fo:
            while n := fa.readinto(ba):
                fb.readinto(bb)
                fo.write(memoryview(ba)[:n])
    else:
        merge_folders([a, b], out, method="slerp", t=0.5, max_shard_size_mb=100_000)
    return {"kind": kind, "wall_s": time.perf_counter() - t, "peak_rss_mb": rss_mb(), "start_rss_mb": base}


def mergekit(a: Path, b: Path, out: Path, sample: bool = True) -> dict:
    cfg = OUT / "mergekit.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   f"parameters:\n  t: 0.5\ndtype: bfloat16\n")
    # mergekit's CLI entry point, after the same untimed back_memory step as our workers
    code = (f"import numpy as np; a = np.ones({BACK_MB if not sample else 0} << 20, dtype=np.uint8); del a; "
            "import sys; from mergekit.scripts.run_yaml import main; sys.argv[0] = 'mergekit-yaml'; sys.exit(main())")
    t = time.perf_counter()
    p, anon, rss = run_sampled([str(MK_VENV / "bin" / "python"), "-c", code, str(cfg), str(out), "--lazy-unpickle",
                                "--out-shard-size", "100B"], sample=sample)
    res = {"kind": "mergekit", "wall_s": time.perf_counter() - t, "peak_anon_mb": anon, "peak_rss_mb": rss}
    if p.returncode != 0:
        res["error"] = p.stderr[-1500:]
    return res


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next run reads its inputs from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ensure_mergekit() -> bool:
    if (MK_VENV / "bin" / "mergekit-yaml").exists():
        return True
    subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
    pip = [str(MK_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    ok = subprocess.run(pip + ["torch==2.13.0"]).returncode == 0 and subprocess.run(pip + ["mergekit"]).returncode == 0
    return ok


def main() -> None:
    a, b = make_inputs()
    size = sum((p / "model.safetensors").stat().st_size for p in (a, b)) / 2**20
    have_mk = ensure_mergekit()
    runs: dict[str, list[dict]] = {}
    mem: dict[str, list[dict]] = {}
    # default threading (torch uses both cores); setting OMP_NUM_THREADS=2 measurably slowed our merge here
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONWARNINGS": "ignore"}
    cold: dict[str, list[dict]] = {}
    can_drop = drop_caches()
    for rnd in range(WARM + 1 + (3 if can_drop else 0)):
        sample = rnd == WARM  # the memory round; the sampling thread slows the child, so it is not timed
        is_cold = rnd > WARM  # inputs read from disk: the page cache is dropped before each run
        kinds = ["io", "raw", "ours"] + (["mergekit"] if have_mk else [])
        kinds = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]  # no kind always runs first
        for kind in kinds:
            out = OUT / f"out_{kind}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no run pays for the write-back of the one before
            if is_cold:
                drop_caches()
            if kind == "mergekit":
                res = mergekit(a, b, out, sample)
            else:
                p, anon, rss = run_sampled([sys.executable, __file__, "--worker", kind, str(a), str(b), str(out)],
                                           env | {"BENCH_BACK_MB": str(0 if sample else BACK_MB)}, sample)
                if p.returncode != 0:
                    raise SystemExit(p.stderr[-3000:])
                res = dict(json.loads(p.stdout.strip().splitlines()[-1]), peak_anon_mb=anon, peak_rss_mb=rss)
            (cold if is_cold else mem if sample else runs).setdefault(kind, []).append(res)
            shutil.rmtree(out, ignore_errors=True)
    largest_fp32_mb = 151936 * 1024 * 4 / 2**20
    summary = {k: {"wall_s": statistics.median(r["wall_s"] for r in v), "wall_min_s": min(r["wall_s"] for r in v),
                   "peak_anon_mb": mem[k][0]["peak_anon_mb"], "peak_rss_mb": mem[k][0]["peak_rss_mb"],
                   "errors": [r["error"] for r in v + mem[k] if "error" in r]} for k, v in runs.items()}
    summary["per_round_ours_over_io"] = [o["wall_s"] / i["wall_s"] for o, i in zip(runs["ours"], runs["io"])]
    summary["per_round_ours_over_raw"] = [o["wall_s"] / i["wall_s"] for o, i in zip(runs["ours"], runs["raw"])]
    if "mergekit" in runs:
        summary["per_round_mergekit_over_ours"] = [m["wall_s"] / o["wall_s"] for m, o in zip(runs["mergekit"], runs["ours"])]
    if cold:
        summary["cold"] = {k: {"wall_s": statistics.median(r["wall_s"] for r in v),
                               "wall_min_s": min(r["wall_s"] for r in v)} for k, v in cold.items()}
        for base in ("io", "raw"):
            summary["cold"][f"per_round_ours_over_{base}"] = [o["wall_s"] / i["wall_s"]
                                                              for o, i in zip(cold["ours"], cold[base])]
    summary["inputs_mb"] = size
    summary["largest_tensor_fp32_mb"] = largest_fp32_mb
    (OUT / "bench_merge.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    io, ours = summary["io"], summary["ours"]
    print(f"ours / pure I/O wall = {ours['wall_s'] / io['wall_s']:.2f} (median of per-round ratios "
          f"{statistics.median(summary['per_round_ours_over_io']):.2f}; best run each: "
          f"{ours['wall_min_s'] / io['wall_min_s']:.2f}); ours peak anonymous RSS = "
          f"{ours['peak_anon_mb']:.0f} MB (pure I/O: {io['peak_anon_mb']:.0f} MB) = "
          f"{(ours['peak_anon_mb'] - io['peak_anon_mb']) / largest_fp32_mb:.2f}x the largest tensor in fp32 "
          f"({largest_fp32_mb:.0f} MB) above the I/O process")
    print(f"ours / raw file I/O: median of per-round ratios {statistics.median(summary['per_round_ours_over_raw']):.2f}; "
          f"best run each {ours['wall_min_s'] / summary['raw']['wall_min_s']:.2f}")
    if "cold" in summary:
        c = summary["cold"]
        print(f"cold cache (inputs from disk): ours {c['ours']['wall_s']:.2f} s / pure I/O {c['io']['wall_s']:.2f} s "
              f"= {statistics.median(c['per_round_ours_over_io']):.2f}, / raw {c['raw']['wall_s']:.2f} s = "
              f"{statistics.median(c['per_round_ours_over_raw']):.2f} (medians of per-round ratios)"
              + (f"; mergekit {c['mergekit']['wall_s']:.2f} s" if "mergekit" in c else ""))
    if "mergekit" in summary:
        mk = summary["mergekit"]
        print(f"mergekit / ours wall = {mk['wall_s'] / ours['wall_s']:.2f}; peak anonymous RSS mergekit / ours = "
              f"{mk['peak_anon_mb'] / ours['peak_anon_mb']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:6])))
    else:
        main()
