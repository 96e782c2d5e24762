"""The choices and defaults that the command line names in its help.

Each list here is the single definition of what a user may pick: the module that implements
the choice imports it from here. This module imports nothing heavy (no torch, faiss, numpy or
matplotlib), so `knnflow ... --help` and option errors return without loading them.
"""

from __future__ import annotations

# The data set of build-index, train and memorization when none is named.
DEFAULT_DATASET = "digits"

# Training targets (knnflow.targets) and their options.
TARGETS = ("cfm", "ot-cfm", "efm", "knn-efm", "exact")
# The first of each tuple is the default.
EFM_POOLS = ("independent", "shared")
EFM_M = 128
KNN_FALLBACKS = ("exact", "efm")
KNN_TOL = 1e-4
KNN_BUDGET = 0.005
# KNNVelocity's routes (knnflow.estimators), knn-efm's --knn-route.
ROUTES = ("auto", "certify", "faster")

# ODE solvers (knnflow.sampling): the name a user types → torchdiffeq's method.
SOLVERS = {"euler": "euler", "heun": "heun2", "midpoint": "midpoint", "rk4": "rk4",
           "dopri5": "dopri5"}

# Index folders (knnflow.index).
INDEX_KINDS = ("flat", "ivf")
DTYPE_NAMES = ("float32", "float16")

# knnflow bench (knnflow.bench).
BENCH_DATASET = "photos"
# The default t grid of bench exact and bench knn: training draws t ~ U[0,1), so the grid
# covers it evenly; t > 0.95 is the U[0,1) row's (and --t-grid's) business.
BENCH_T_GRID = "0:0.95:0.05"
QUICK_TS = (0.0, 0.1, 0.5, 0.7, 0.9, 0.99, 0.999)
UNIFORM_LABEL = "U[0,1)"

# knnflow collapse (knnflow.analysis.collapse).
COLLAPSE_ESTIMATORS = ("auto", "exact", "knn")
COLLAPSE_GRID = "0:0.99:0.01"

# knnflow memorization (knnflow.nearest): reference points of the d1/d2 quantiles.
MEMORIZATION_REFERENCE = 10_000

# knnflow hybrid (knnflow.analysis.hybrid).
HYBRID_TAUS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
COPY_FRACTION = 0.9
HYBRID_REFERENCE = 1000
GRID_ROWS = 8

# knnflow velocity-error (knnflow.analysis.velocity_error).
WEIGHT_SETS = ("ema", "raw")
WEIGHT_LABELS = {"ema": "EMA weights", "raw": "raw weights"}

# knnflow fid (knnflow.analysis.fid) and train-classifier (knnflow.analysis.classifier).
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
DINOV2_FILE = "dinov2_vitl14_torchscript.pt"
# Small data sets need more passes: 10 epochs of digits (1498 images) take a few seconds on
# one CPU core and reach ~98-99%; MNIST needs only 3.
SMALL_DATASET = 10_000

# knnflow reproduce (knnflow.analysis.reproduce).
REPRODUCE_DATASETS = ("digits", "mnist", "cifar10")
