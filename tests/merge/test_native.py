"""The fused merge kernels (kernels.c through native.py): built from source, checked against float64
references and against the torch implementation they replace, independent of the thread count, and
replaced by the torch implementation when they cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen3train.merge import gram as G
from qwen3train.merge import native

HAVE_CC = native._compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine: merging uses torch ops")


def inputs(n, dtype, size=300_001, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g) * 0.02
    return [(base + 0.01 * torch.randn(size, generator=g)).to(dtype) for _ in range(n)]


@needs_cc
def test_kernels_build_from_source_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3TRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", False)
    assert native.lib() is not None
    built = list((tmp_path / "kernels").glob("merge-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp*"))


@needs_cc
def test_unwritable_cache_builds_in_the_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache path is a file: no folder can be made there
    monkeypatch.setenv("QWEN3TRAIN_CACHE", str(blocker))
    monkeypatch.setattr(native, "_lib", False)
    assert native.lib() is not None
    assert Path(native.lib()._name).parent.name.startswith("qwen3train-kernels-")


def test_unbuildable_kernels_fall_back_to_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QWEN3TRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_lib", False)
    with caplog.at_level("WARNING"):
        assert native.lib() is None
    assert "using torch ops" in caplog.text
    xs = inputs(2, torch.bfloat16)
    assert not native.supports(xs)
    assert G.combine(xs, torch.tensor([0.5, 0.5])).dtype == torch.bfloat16  # the torch path still merges


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_gram_frame_matches_a_float64_reference(dtype, n, monkeypatch):
    xs = inputs(n, dtype)
    x = torch.stack([t.double() for t in xs])
    d = x - x[0]
    d[0] = x[0]  # rows: x_0, d_1, ..., d_{n-1}
    want = d @ d.T
    got = torch.tensor(native.gram_frame(xs), dtype=torch.float64)
    scale = want.abs().max()
    assert ((got - want).abs() / scale).max() < 1e-6
    full = x @ x.T
    assert torch.allclose(G.gram(xs), full, rtol=1e-6, atol=1e-6 * full.abs().max().item())
    monkeypatch.setattr(native, "_lib", None)  # the torch fallback: same frame, fp32 sums over larger blocks
    assert torch.allclose(G.gram(xs), full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [3, 5])  # the specialised kernel (n <= 4) and the general one
def test_combine_agrees_with_the_torch_implementation(dtype, n, monkeypatch):
    xs = inputs(n, dtype)
    c = torch.tensor([0.7, -0.2, 0.5, 0.3, -0.1][:n], dtype=torch.float64)
    fused = G.combine(xs, c, dtype)
    want = sum(float(ci) * x.double() for ci, x in zip(c, xs))
    monkeypatch.setattr(native, "_lib", None)
    plain = G.combine(xs, c, dtype)
    # both do the same fp32 arithmetic (a few roundings of the terms) and round once to the dtype
    fi = torch.finfo(dtype)  # (subnormal outputs are spaced tiny * eps apart)
    bound = fi.eps * want.abs() + fi.tiny * fi.eps + 4 * 2.0**-24 * sum(abs(float(ci)) * x.double().abs()
                                                                     for ci, x in zip(c, xs))
    assert ((fused.double() - want).abs() <= bound).all()
    assert ((plain.double() - want).abs() <= bound).all()
    assert (fused == plain).float().mean() > 0.99


@needs_cc
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    xs = inputs(3, torch.bfloat16, size=5_000_003)
    outs = []
    for threads in (1, 3):
        monkeypatch.setattr(native, "THREADS", threads)
        out = torch.empty(xs[0].numel(), dtype=torch.bfloat16)
        native.combine_into(xs, [0.3, 0.3, 0.4], 0, out)
        outs.append((native.gram_frame(xs), out))
    assert outs[0][0] == outs[1][0] and torch.equal(outs[0][1], outs[1][1])


@needs_cc
def test_special_values_round_like_torch():
    x = torch.tensor([0.0, -0.0, 1e-40, 3.0e38, float("inf"), float("nan"), 1.00390625, 1.01171875])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    native.combine_into([x], [1.0], 0, out)
    want = x.to(torch.bfloat16)
    finite = ~x.isnan()
    assert torch.equal(out[finite].view(torch.int16), want[finite].view(torch.int16))  # incl. -0, ties to even
    assert out[~finite].isnan().all()
