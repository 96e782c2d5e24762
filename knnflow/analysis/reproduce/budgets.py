"""What a reproduction costs: the budgets per data set, the targets it trains, and
where its work folder and page go."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from knnflow.choices import COLLAPSE_GRID as DEFAULT_GRID
from knnflow.choices import REPRODUCE_DATASETS as DATASETS
from knnflow.errors import InputError, OptionError

REPRODUCE_TAUS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.85,0.9,0.925,0.95,0.975,1"


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a reproduction, identical for every target.

    steps, batch_size, preset, seeds: training (lr, warm-up and EMA are the preset's
    defaults, knnflow.models.presets). samples / sample_steps: Euler samples per run for FID
    and memorization. velocity_*: t bins and queries per bin of the velocity error (EMA
    weights). hybrid_*: noises and Euler steps of hybrid sampling at every τ of `taus`.
    collapse_*: pairs, t grid and square sizes of the collapse analysis (None: the data's own
    size). bootstrap: replicates of the FID bootstrap. closed_form_index: û* for the velocity
    error and hybrid sampling from the certified KNNVelocity over the index (for large data)
    instead of the exact engine. efm_large_max: the second EFM's M is min(n, this).
    threads: CPU threads of torch and of numpy/scipy's
    BLAS (None: the libraries' defaults).
    """

    name: str
    preset: str
    steps: int
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 128
    log_every: int = 10
    checkpoint_every: int = 200
    flip: bool = False
    efm_m: int = 128
    # The large EFM's M: n (None) or at most this. On CIFAR-10 with flips, M = n = 100,000
    # candidates per row would gather ~40 GB per step; the paper's largest M is 1000.
    efm_large_max: int | None = None
    samples: int = 512
    sample_steps: int = 100
    velocity_bins: int = 20
    velocity_n: int = 512
    hybrid_n: int = 128
    hybrid_steps: int = 100
    # The copy onset lies near 1 on small data (digits: ~0.92), so the grid is finer there.
    taus: str = REPRODUCE_TAUS
    classifier_epochs: int | None = None
    collapse_pairs: int = 256
    collapse_grid: str = DEFAULT_GRID
    collapse_sides: tuple[int, ...] | None = None
    bootstrap: int = 100
    closed_form_index: bool = False
    threads: int | None = None
    limit: int | None = None


# digits: the tiny U-Net on one CPU thread. On the 2-core machine these budgets were set on,
# a second thread made a training step 1.3× (cfm) to 1.9× (efm-1498) faster when the machine
# was otherwise idle, and up to 10× slower while another process used the other core (OpenMP
# threads waiting on each other); --threads 2 is the choice for a machine of your own. small:
# about 15 minutes there; 50 Euler steps for sampling (100 in full) keep it inside that.
# cifar10: the paper's released configuration (conf/train_cifar10.yaml of
# github.com/generativemodels/closedformfm): 128-channel U-Net (preset cifar), batch 128,
# lr 2e-4, 5000 warm-up steps, EMA 0.9999, horizontal flips, 500,000 steps in full. efm-n then
# has M = 100,000 candidates per row (both flips of the 50,000 images): by far the most
# expensive target, as in the paper.
BUDGETS: dict[str, dict[str, Budget]] = {
    "digits": {
        "small": Budget("small", "tiny", steps=800, log_every=10, checkpoint_every=200,
                        samples=512, sample_steps=50, hybrid_n=128, hybrid_steps=50,
                        collapse_sides=(8, 16, 32), bootstrap=100, threads=1),
        "full": Budget("full", "tiny", steps=4000, seeds=(0, 1), log_every=20,
                       checkpoint_every=500, samples=2048, sample_steps=100, hybrid_n=256,
                       hybrid_steps=100, collapse_sides=(8, 16, 32), bootstrap=200, threads=1),
    },
    # mnist: the tiny U-Net on 60,000 images of 28×28, meant for a GPU (on 2 CPU cores a step
    # takes ~1.5 s, so small runs for hours there); efm-n capped at M = 1000 like cifar10.
    "mnist": {
        "small": Budget("small", "tiny", steps=2000, log_every=20, checkpoint_every=500,
                        samples=2048, sample_steps=100, velocity_n=512, hybrid_n=256,
                        collapse_sides=(7, 14, 28), bootstrap=100, efm_large_max=1000),
        "full": Budget("full", "tiny", steps=20_000, seeds=(0, 1), log_every=100,
                       checkpoint_every=2000, samples=10_000, sample_steps=100,
                       velocity_n=512, hybrid_n=256, collapse_sides=(7, 14, 28),
                       bootstrap=200, efm_large_max=1000),
    },
    "cifar10": {
        "small": Budget("small", "cifar", steps=20_000, log_every=100, checkpoint_every=2000,
                        flip=True, samples=10_000, sample_steps=100, velocity_n=256,
                        hybrid_n=256, collapse_pairs=256, bootstrap=100,
                        closed_form_index=True, efm_large_max=1000),
        "full": Budget("full", "cifar", steps=500_000, log_every=100, checkpoint_every=10_000,
                       flip=True, samples=50_000, sample_steps=100, velocity_n=512,
                       hybrid_n=256, collapse_pairs=256, bootstrap=200, closed_form_index=True,
                       efm_large_max=1000),
    },
}


def check_dataset(dataset: str) -> str:
    if dataset not in BUDGETS:
        raise InputError(f"knnflow reproduce does not know the data set {dataset!r}; choose one "
                         f"of: {', '.join(DATASETS)}")
    return dataset


def get_budget(dataset: str, name: str, steps: int | None = None,
               limit: int | None = None, threads: int | None = None) -> Budget:
    """The named budget of a data set, with the step count, training-set limit and thread
    count replaced where given."""
    budgets = BUDGETS[check_dataset(dataset)]
    if name not in budgets:
        raise OptionError(f"unknown {{budget}} {name!r}; choose one of: {', '.join(budgets)}",
                          "budget")
    budget = budgets[name]
    for option, value in (("steps", steps), ("limit", limit), ("threads", threads)):
        if value is not None and value < 1:
            raise OptionError(f"must be at least 1, got {value}", option)
    return replace(budget, steps=steps or budget.steps, limit=limit or budget.limit,
                   threads=threads or budget.threads)


def default_work_folder(dataset: str, budget: Budget) -> Path:
    """runs/reproduce-DATASET-BUDGET, with -stepsN / -limitN when those differ from the named
    budget, so that runs of other settings never share a folder."""
    name = f"reproduce-{dataset}-{budget.name}"
    base = BUDGETS.get(dataset, {}).get(budget.name)
    if base is not None and budget.steps != base.steps:
        name += f"-steps{budget.steps}"
    if budget.limit is not None:
        name += f"-limit{budget.limit}"
    return Path("runs") / name


# Written into every figures folder, so a later call replaces only a folder it made.
FIGURES_MARK = ".knnflow-reproduce-figures"


def default_page(dataset: str, budget: Budget) -> Path:
    """docs/results/DATASET.md, with the work folder's -stepsN / -limitN suffix when those
    differ from the named budget, so a trial run never replaces the page of a full one."""
    suffix = default_work_folder(dataset, budget).name[len(f"reproduce-{dataset}-{budget.name}"):]
    return Path("docs/results") / f"{dataset}{suffix}.md"


def check_page_paths(md_path: Path, work: Path) -> None:
    """Refuse a page whose figures folder (the page's path without .md) exists but was not
    made by this command, or holds the work folder."""
    figures = md_path.parent / md_path.stem
    if md_path.suffix != ".md":
        raise OptionError(f"must name a .md file, got {md_path}", "out_md")
    if figures.exists() and not (figures / FIGURES_MARK).is_file():
        raise OptionError(f"{figures} exists and holds no figures of knnflow reproduce (the "
                          "page's figures go there); choose another {out_md}", "out_md")
    resolved = figures.resolve()
    if resolved == work.resolve() or resolved in work.resolve().parents:
        raise OptionError(f"the figures folder {figures} would hold the work folder {work}; "
                          "choose another {out_md} or {work}", "out_md", "work")


@dataclass(frozen=True)
class TargetSpec:
    """One row of the comparison: its label, the training target and EFM's M."""

    label: str
    target: str
    m: int = 128


def target_specs(n: int, budget: Budget) -> list[TargetSpec]:
    """cfm, ot-cfm, efm-128, efm-n (M capped at budget.efm_large_max) and knn-efm; n: the points û*
    sums over (with flips, 2× images)."""
    large = n if budget.efm_large_max is None else min(n, budget.efm_large_max)
    if large == budget.efm_m:
        raise OptionError(f"the training set has {n} points, the M of efm-{budget.efm_m}: "
                          "efm-n would repeat it; choose another {limit}", "limit")
    return [TargetSpec("cfm", "cfm"), TargetSpec("ot-cfm", "ot-cfm"),
            TargetSpec(f"efm-{budget.efm_m}", "efm", budget.efm_m),
            TargetSpec(f"efm-{large}", "efm", large), TargetSpec("knn-efm", "knn-efm")]


def run_config(dataset: str, budget: Budget, spec: TargetSpec, seed: int,
               index_folder: Path, root: str | Path | None = None):
    """The TrainConfig of one run: everything but the target and its options (efm's m,
    knn-efm's index) is the budget's."""
    from knnflow.runs import TrainConfig

    options = ({"m": spec.m} if spec.target == "efm" else
               {"index": str(index_folder)} if spec.target == "knn-efm" else {})
    return TrainConfig(dataset=dataset, root=str(root) if root is not None else None,
                       limit=budget.limit, target=spec.target, target_options=options,
                       flip=budget.flip, preset=budget.preset, batch_size=budget.batch_size,
                       steps=budget.steps, seed=seed, log_every=budget.log_every,
                       checkpoint_every=budget.checkpoint_every, sample_every=0)
