"""Property tests of the merge methods (pure functions over tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from qwen3train.merge import METHODS
from qwen3train.merge.apply import merge_state_dicts
from qwen3train.merge.gram import combine, gram
from qwen3train.merge.slerp import slerp


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 2, 3)])
def test_endpoints_and_symmetry(shape):
    a, b = rand(*shape, seed=1), rand(*shape, seed=2)
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-6)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-6)
    for t in (0.1, 0.3, 0.5, 0.9):
        assert torch.allclose(slerp(t, a, b), slerp(1 - t, b, a), atol=1e-6)


def test_colinear_and_zero_inputs_reduce_to_lerp():
    a = rand(10, seed=3)
    for b in (2.5 * a, -a, torch.zeros(10)):
        for t in (0.25, 0.5):
            assert torch.allclose(slerp(t, a, b), (1 - t) * a + t * b, atol=1e-6)


def test_norms_and_angles_interpolate_on_the_sphere():
    a = torch.nn.functional.normalize(rand(64, seed=4), dim=0) * 3.0
    b = torch.nn.functional.normalize(rand(64, seed=5), dim=0) * 3.0
    omega = math.acos(float(a @ b) / 9.0)
    for t in (0.2, 0.5, 0.8):
        m = slerp(t, a, b)
        assert abs(m.norm().item() - 3.0) < 1e-5  # equal norms are kept
        assert abs(math.acos(float(m @ a) / (3.0 * m.norm())) - t * omega) < 1e-4  # constant angular speed


def test_slerp_differs_from_lerp_for_distinct_directions():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.5, a, b), torch.tensor([math.sqrt(0.5)] * 2), atol=1e-6)


@pytest.mark.parametrize("method", ["running_slerp", "multislerp", "linear"])
def test_n_way_of_identical_inputs_returns_the_input(method):
    x = rand(6, 5, seed=6)
    for dtype, exact in ((torch.float32, False), (torch.bfloat16, True)):
        xs = [x.to(dtype)] * 4
        out = combine(xs, METHODS[method](gram(xs), torch.ones(4, dtype=torch.float64), 0.5))
        if exact:
            assert torch.equal(out, xs[0])
        else:
            assert torch.allclose(out, xs[0], rtol=1e-6, atol=1e-7)


def test_two_way_spherical_methods_agree_with_slerp():
    a, b = rand(32, seed=7), rand(32, seed=8)
    b = b / b.norm() * a.norm()  # equal norms: the Karcher mean is the slerp midpoint
    w = torch.ones(2, dtype=torch.float64)
    g = gram([a, b])
    mid = slerp(0.5, a, b)
    assert torch.allclose(combine([a, b], METHODS["running_slerp"](g, w, 0.5)), mid, atol=1e-5)
    assert torch.allclose(combine([a, b], METHODS["multislerp"](g, w, 0.5)), mid, atol=1e-5)


def test_multislerp_stays_on_the_sphere_for_unit_inputs():
    xs = [torch.nn.functional.normalize(rand(16, seed=s), dim=0) for s in range(5)]
    out = combine(xs, METHODS["multislerp"](gram(xs), torch.tensor([1, 2, 3, 1, 1.0], dtype=torch.float64), 0.5))
    assert abs(out.norm().item() - 1.0) < 1e-5


def test_task_vector_mode_adds_the_base_back():
    base = {"w": rand(20, seed=9)}
    d1, d2 = rand(20, seed=10) * 0.1, rand(20, seed=11) * 0.1
    sds = [{"w": base["w"] + d1}, {"w": base["w"] + d2}]
    got = merge_state_dicts(sds, "slerp", t=0.5, base=base)["w"]
    assert torch.allclose(got, base["w"] + slerp(0.5, d1, d2), atol=1e-5)


def test_gram_keeps_the_angle_between_nearly_identical_checkpoints():
    """Consecutive checkpoints differ by ~1e-3 of their norm: the angle must survive rounding."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3_000_000, generator=g).to(torch.bfloat16)
    b = (a.float() + 2e-3 * torch.randn(3_000_000, generator=g)).to(torch.bfloat16)
    a64, b64 = a.double(), b.double()  # exact products of bf16 values, float64 sums: the reference
    d = b64 - a64
    # 1 - cos = (|d|^2 - (|b| - |a|)^2) / (2 |a| |b|), free of cancellation
    one_minus_cos = (d @ d - (b64.norm() - a64.norm()) ** 2) / (2 * a64.norm() * b64.norm())
    want = 2 * math.asin(math.sqrt(one_minus_cos.item() / 2))
    gm = gram([a, b])
    got = math.acos(gm[0, 1].item() / math.sqrt(gm[0, 0].item() * gm[1, 1].item()))
    assert want < 5e-3 and abs(got - want) / want < 1e-5
