"""The GPU paths against the CPU and float64 references; skipped where torch sees no GPU.

CI has no GPU: these run in the device checks (benchmarks/gpu/gpu_checks.sh)."""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_velocity, flow_queries, relative_error

from knnflow.data import load_dataset
from knnflow.estimators import ExactVelocity, KNNVelocity
from knnflow.faiss_backend import faiss_gpu_count
from knnflow.index import Index
from knnflow.synthetic import synthetic_images
from knnflow.targets import make_target

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def images():
    return synthetic_images(6000, (3, 16, 16), seed=5)


@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_exact_engine_on_gpu_matches_float64(images, t):
    points = images.reshape(len(images), -1)
    x = flow_queries(points, t, 16, seed=1)
    out = ExactVelocity(points, device="cuda")(x.cuda(), t)
    assert out.velocity.is_cuda
    assert float(relative_error(out.velocity.cpu(), brute_force_velocity(x, t, points)).max()) \
        < 1e-5


def test_faiss_gpu_index_search_matches_cpu(images):
    if faiss_gpu_count() == 0:
        pytest.skip("this faiss build has no GPU support")
    points = images.reshape(len(images), -1)
    index = Index.build(images, device="cuda")
    cpu = Index.build(images)
    queries = flow_queries(points, 0.7, 64, seed=2) / 0.7
    a, b = index.search(queries, 8, method="faiss"), cpu.search(queries, 8, method="faiss")
    assert torch.equal(a.ids, b.ids) and torch.allclose(a.sq_distances, b.sq_distances)


@pytest.mark.parametrize("search_device", ["cpu", "cuda"])
@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 32, 32)])
def test_certified_bound_with_the_exact_fallback_on_gpu(images, search_device, shape):
    """The exact engine on the GPU, the certified search on the CPU or (search_device) on
    the GPU too; the bound holds against float64 either way. 3×32×32 takes the DCT transform
    and the fine sketch (pair_dots' GPU blocks), 3×16×16 the PCA and the coarse sketch only."""
    if shape != tuple(images.shape[1:]):
        images = synthetic_images(6000, shape, seed=5)
    points = images.reshape(len(images), -1)
    index = Index.build(images, device="cuda" if faiss_gpu_count() else "cpu")
    # route="certify": the default on a GPU ("faster") may send every t to the exact engine.
    estimator = KNNVelocity(index, tol=1e-4, device="cuda", search_device=search_device,
                            route="certify")
    for t in (0.0, 0.1, 0.5, 0.9):
        x = flow_queries(points, t, 32, seed=3)
        out = estimator(x, t)
        reference = brute_force_velocity(x, t, points)
        err = (out.velocity.double() - reference).norm(dim=1)
        assert bool((err <= out.error_bound + 1e-4 * reference.norm(dim=1)).all())
    assert not bool(out.fallback.all())  # t = 0.9 certifies


@pytest.mark.parametrize("spec", [{"name": "efm", "m": 64}, {"name": "efm", "m": 64,
                                  "pool": "shared"}, {"name": "exact"}, {"name": "cfm"}])
def test_targets_on_gpu_match_cpu(spec):
    data = load_dataset("digits").reshape(-1, 64)
    gen = torch.Generator().manual_seed(0)
    x1, x0, t = data[:32], torch.randn(32, 64, generator=gen), torch.rand(32, generator=gen)
    outs = [make_target(data=data, device=device, **spec)(
        x0, x1, t, generator=torch.Generator().manual_seed(1)) for device in ("cpu", "cuda")]
    assert outs[1].target.is_cuda
    assert torch.allclose(outs[0].target, outs[1].target.cpu(), rtol=1e-4, atol=1e-4)


def test_route_faster_on_gpu_times_and_holds_the_bound(images):
    """The default route on a GPU times the exact engine against certifying once; whatever it
    chooses, every row stays within its bound of float64, and the routed rows are exact."""
    points = images.reshape(len(images), -1)
    estimator = KNNVelocity(Index.build(images), tol=1e-4, device="cuda")
    assert estimator.route == "faster"
    t = torch.linspace(0.05, 0.99, 64)
    x = torch.cat([flow_queries(points, float(ti), 1, seed=i) for i, ti in enumerate(t)])
    out = estimator(x, t)
    low, high = estimator.floors
    assert estimator.route_timings and torch.equal(out.routed, (t >= low) & (t < high))
    reference = brute_force_velocity(x, t, points)
    err = (out.velocity.double() - reference).norm(dim=1)
    assert bool((err <= out.error_bound + 1e-4 * reference.norm(dim=1)).all())


@pytest.mark.parametrize("fallback", ["exact", "efm"])
@pytest.mark.parametrize("search_device", ["cpu", "cuda"])
@pytest.mark.parametrize("route", ["certify", "faster"])
def test_knn_efm_target_on_gpu(fallback, search_device, route):
    """knn-efm on the GPU, its certified search on either device, low t falling back to the
    exact engine or to EFM: finite targets on the GPU, and with the exact fallback equal to
    the exact target within the bound."""
    images = load_dataset("digits")
    data = images.reshape(-1, 64)
    index = Index.build(images)
    gen = torch.Generator().manual_seed(0)
    x1, x0, t = data[:32], torch.randn(32, 64, generator=gen), torch.linspace(0, 0.99, 32)
    out = make_target("knn-efm", index=index, data=data, device="cuda", fallback=fallback,
                      search_device=search_device, route=route)(
        x0, x1, t, generator=torch.Generator().manual_seed(1))
    assert out.target.is_cuda and bool(torch.isfinite(out.target).all())
    if fallback == "exact":
        exact = make_target("exact", data=data)(x0, x1, t,
                                                generator=torch.Generator().manual_seed(1))
        assert torch.allclose(out.target.cpu(), exact.target, rtol=1e-4, atol=1e-4)


def test_training_steps_on_gpu(tmp_path):
    from knnflow.runs import TrainConfig
    from knnflow.trainer import train

    config = TrainConfig(dataset="digits", target="efm", target_options={"m": 32}, steps=3,
                         log_every=1,
                         checkpoint_every=3)
    logged = train(config, tmp_path / "run", device="cuda")  # prefetches batches on GPUs
    assert len(logged) == 3 and all(entry.loss > 0 for entry in logged)


def test_resume_on_gpu_is_bit_exact(tmp_path):
    """A run stopped at step 4 and resumed (GPU dropout generator restored) ends as one run."""
    from safetensors.torch import load_file

    from knnflow.runs import TrainConfig
    from knnflow.trainer import train

    def config(steps):
        return TrainConfig(dataset="digits", target="efm", target_options={"m": 16},
                           steps=steps, log_every=1,
                           checkpoint_every=4, keep_checkpoints=5)

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    train(config(8), tmp_path / "whole", device="cuda")
    train(config(4), tmp_path / "parts", device="cuda")
    train(config(8), tmp_path / "parts", resume=True, device="cuda")
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step_8.safetensors"))
    b = load_file(str(tmp_path / "parts" / "checkpoints" / "step_8.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_closed_form_sampling_on_gpu_matches_cpu():
    """`knnflow sample --closed-form --device cuda`: û* on the GPU, samples back on the CPU,
    equal to the CPU's up to float32 rounding of the flow."""
    from knnflow.sampling import sample_closed_form

    index = Index.build(load_dataset("digits")[:300])
    cpu = sample_closed_form(index, 6, seed=3, steps=20)
    gpu = sample_closed_form(index, 6, seed=3, steps=20, device="cuda")
    assert gpu.device.type == "cpu"
    assert torch.allclose(cpu, gpu, atol=1e-4)
