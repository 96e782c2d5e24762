"""knnflow's targets inside torchcfm's and flow_matching's own training loops.

Each test runs the library's minimal training loop (its README's: draw x0, x1 and t, ask the
matcher or path for (x_t, target), regress a small network on it) for a few dozen steps on
digits with knnflow's adapter swapped in, and checks that the loss goes down and that the
adapter's target equals knnflow's own target on the same (x0, x1, t). Skipped where the
library is not installed (`make install` installs both when the registry has them).
"""

from __future__ import annotations

import functools

import pytest
import torch

import knnflow
from knnflow.errors import IndexMismatchError, InputError
from knnflow.targets import make_target


@functools.cache
def digits_and_index():
    data = knnflow.load_dataset("digits")
    return data, knnflow.Index.build(data)


class VelocityNet(torch.nn.Module):
    """A small MLP v(x, t) on flattened 8×8 images."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 256), torch.nn.SiLU(),
                                       torch.nn.Linear(256, 256), torch.nn.SiLU(),
                                       torch.nn.Linear(256, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        return self.net(torch.cat([flat, t.reshape(-1, 1).to(flat)], dim=1)).reshape(x.shape)


def batches(data: torch.Tensor, steps: int, size: int = 128):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x1 = data[torch.randint(len(data), (size,), generator=gen)]
        yield torch.randn(x1.shape, generator=gen), x1


def fit(data: torch.Tensor, loss_of, steps: int = 60) -> list[float]:
    """The training loop both libraries' READMEs show, around its library-specific part
    loss_of(model, x0, x1): a seeded MLP, Adam, `steps` batches of digits. The losses."""
    torch.manual_seed(0)
    model = VelocityNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for x0, x1 in batches(data, steps):
        optimizer.zero_grad()
        loss = loss_of(model, x0, x1)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def falls(losses: list[float]) -> bool:
    return sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


@pytest.mark.parametrize("target", ["knn-efm", "efm"])
def test_torchcfm_loop_with_knnflow_matcher(target):
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    from knnflow.adapters.torchcfm import KNNFlowMatcher

    data, index = digits_and_index()
    matcher = KNNFlowMatcher(index, target=target, data=data)
    reference = cfm.ConditionalFlowMatcher(sigma=0.0)
    def loss_of(model, x0, x1):  # torchcfm's README step, matcher swapped
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        return torch.mean((model(xt, t) - ut) ** 2)

    losses = fit(data, loss_of)
    assert falls(losses), losses
    # Same convention as torchcfm's own matcher; ut is knnflow's target on (x0, x1, t).
    x0, x1 = next(batches(data, 1, 32))
    t = torch.rand(32, generator=torch.Generator().manual_seed(1)) * 0.99
    t_ours, xt, ut, eps = matcher.sample_location_and_conditional_flow(x0, x1, t,
                                                                       return_noise=True)
    _, xt_theirs, ut_cfm = reference.sample_location_and_conditional_flow(x0, x1, t)
    assert torch.equal(t_ours, t) and bool((eps == 0).all())
    assert torch.allclose(xt, xt_theirs, atol=1e-6)
    ours = make_target(target, index=index if target == "knn-efm" else None,
                       data=index.training_set() if target == "efm" else None)(
        x0, x1, t, generator=torch.Generator().manual_seed(5))
    if target == "knn-efm":  # deterministic: equal to knnflow's own target
        assert torch.equal(ut, ours.target)
    else:  # efm draws candidates: equal for the same draws
        again = KNNFlowMatcher(index, target="efm", seed=5)
        assert torch.equal(again.sample_location_and_conditional_flow(x0, x1, t)[2],
                           ours.target)
    assert not torch.allclose(ut, ut_cfm)  # not the conditional x1 - x0


def test_flow_matching_loop_with_knnflow_path():
    path_module = pytest.importorskip("flow_matching.path")
    from knnflow.adapters.flow_matching import KNNEFMPath

    data, index = digits_and_index()
    path = KNNEFMPath(index, target="knn-efm", data=data)
    reference = path_module.CondOTProbPath()
    gen = torch.Generator().manual_seed(2)

    def loss_of(model, x_0, x_1):  # flow_matching's README step, path swapped
        t = torch.rand(x_1.shape[0], generator=gen)
        sample = path.sample(x_0=x_0, x_1=x_1, t=t)
        return torch.pow(model(sample.x_t, sample.t) - sample.dx_t, 2).mean()

    losses = fit(data, loss_of)
    assert falls(losses), losses
    x_0, x_1 = next(batches(data, 1, 32))
    t = torch.rand(32, generator=torch.Generator().manual_seed(3)) * 0.99
    ours = path.sample(x_0=x_0, x_1=x_1, t=t)
    theirs = reference.sample(x_0=x_0, x_1=x_1, t=t)
    assert type(ours) is type(theirs)  # flow_matching's own PathSample
    assert torch.allclose(ours.x_t, theirs.x_t, atol=1e-6)
    assert torch.equal(ours.dx_t, make_target("knn-efm", index=index)(x_0, x_1, t).target)


def test_adapters_refuse_other_data_in_one_line():
    from knnflow.adapters.flow_matching import KNNEFMPath
    from knnflow.adapters.torchcfm import KNNFlowMatcher

    data, index = digits_and_index()
    with pytest.raises(IndexMismatchError, match="checksum"):
        KNNFlowMatcher(index, data=data.flip(0))
    with pytest.raises(IndexMismatchError, match="1497 points|1498 points"):
        KNNEFMPath(index, data=data[:100])
    with pytest.raises(InputError, match="choose one of: knn-efm, efm, exact"):
        KNNFlowMatcher(index, target="cfm")
    wrong = torch.zeros(4, 1, 28, 28)
    with pytest.raises(InputError, match=r"x1 has shape \(4, 1, 28, 28\).*1×8×8"):
        KNNFlowMatcher(index).sample_location_and_conditional_flow(wrong, wrong)
