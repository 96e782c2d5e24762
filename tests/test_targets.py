"""knnflow.targets: cfm and ot-cfm (known cases), the exact target against float64 brute
force, make_target's options and bad input (EFM and knn-efm: test_efm.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_velocity, relative_error

from knnflow.errors import IndexMismatchError, InputError
from knnflow.index import Index
from knnflow.target_base import interpolate
from knnflow.targets import TARGETS, make_target


def flow_batch(points: torch.Tensor, batch: int, seed: int, t: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    x1 = points[torch.randint(points.shape[0], (batch,), generator=gen)]
    x0 = torch.randn(x1.shape, generator=gen)
    if t is None:
        t = torch.rand(batch, generator=gen) * 0.98
    return x0, x1, t


def test_cfm_is_x1_minus_x0_and_x_t_interpolates(digits):
    x0, x1, t = flow_batch(digits, 32, 0)
    out = make_target("cfm")(x0, x1, t)
    assert torch.equal(out.target, x1 - x0)
    assert torch.allclose(out.x_t, (1 - t)[:, None] * x0 + t[:, None] * x1)
    assert out.fallback is None


def test_exact_target_matches_brute_force(digits):
    x0, x1, t = flow_batch(digits, 64, 4)
    out = make_target("exact", data=digits)(x0, x1, t)
    assert relative_error(out.target, brute_force_velocity(out.x_t, t, digits)).max() < 1e-5


@pytest.fixture(scope="module")
def digits_index(digits):
    return Index.build(digits)


def test_bad_input_is_refused(digits, digits_index):
    with pytest.raises(InputError, match="choose one of: " + ", ".join(TARGETS)):
        make_target("ddpm", data=digits)
    with pytest.raises(InputError, match="build-index"):
        make_target("knn-efm", data=digits)
    with pytest.raises(IndexMismatchError, match="build-index"):
        make_target("knn-efm", index=digits_index, data=digits[:100])
    with pytest.raises(InputError, match="m must be a positive integer"):
        make_target("efm", data=digits, m=0)
    with pytest.raises(InputError, match="unknown pool 'global'"):
        make_target("efm", data=digits, pool="global")
    with pytest.raises(InputError, match="unknown fallback 'cfm'"):
        make_target("knn-efm", index=digits_index, fallback="cfm")
    with pytest.raises(InputError, match="the cfm target has no option tol"):
        make_target("cfm", tol=1e-3)
    with pytest.raises(InputError, match="the efm target has no option index"):
        make_target("efm", data=digits, index=digits_index)
    with pytest.raises(InputError, match="t must"):
        make_target("cfm")(digits[:2], digits[:2], torch.tensor([0.5, 1.0]))


def test_ot_pairing_minimises_the_batch_transport_cost():
    """The exact assignment against brute force over all 720 pairings of a batch of 6: its
    total squared distance (from explicit float64 differences) is the smallest, and it is
    a permutation."""
    import itertools

    from knnflow.targets import ot_pairing

    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x0, x1 = torch.randn(6, 1, 3, 3, generator=gen), torch.randn(6, 1, 3, 3, generator=gen)
        a, b = x0.reshape(6, -1).double(), x1.reshape(6, -1).double()
        cost = (b[:, None, :] - a[None, :, :]).square().sum(dim=2)  # cost[j, i]: x1_j ↔ x0_i
        best = min(sum(float(cost[j, p[j]]) for j in range(6))
                   for p in itertools.permutations(range(6)))
        perm = ot_pairing(x0, x1)
        assert sorted(perm.tolist()) == list(range(6))
        assert sum(float(cost[j, perm[j]]) for j in range(6)) == pytest.approx(best, rel=1e-12)


def test_ot_cfm_target_is_cfm_on_the_re_paired_noise(digits):
    """ot-cfm: x_t and x1 - x0 with x0 re-paired by ot_pairing; every noise row used once; the
    transport cost of the pairs it trains on is never above cfm's."""
    from knnflow.targets import ot_pairing

    x0, x1, t = flow_batch(digits, 32, seed=8)
    out = make_target("ot-cfm")(x0, x1, t)
    paired = x0[ot_pairing(x0, x1)]
    assert torch.equal(out.target, (x1 - paired).to(out.target.dtype))
    assert torch.allclose(out.x_t, interpolate(paired, x1, t))
    assert (x1 - paired).square().sum() <= (x1 - x0).square().sum()
    with pytest.raises(InputError, match="at least 2"):
        make_target("ot-cfm")(x0[:1], x1[:1], t[:1])
