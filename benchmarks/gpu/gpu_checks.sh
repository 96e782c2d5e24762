#!/usr/bin/env bash
# knnflow's GPU checks, run as one script on a lent GPU machine (figures: docs/benchmarks.md).
#
#   bash benchmarks/gpu/gpu_checks.sh OUTDIR [setup|bench|all]
#
# setup: faiss-gpu, its check and the GPU tests; bench: the benchmarks. Two calls on one warm
# machine when the faiss-gpu files must travel in two parts (the lent machine takes 64 MiB per
# call).
#
# Expects the machine's python3 with CUDA torch; in .whl/ the nvidia-cuda-runtime-cu12 wheel,
# in .whlcpu/ faiss-cpu (the fallback), and faiss-gpu as below (pip download --no-deps ...). Where
# the machine has CUDA 13 only, cublas12_shim.c stands in for libcublas.so.12 (its header). Every step has a time
# limit and the whole script a deadline; one log (all.log) and JSON results go to OUTDIR.
set -u
OUT=${1:-${OUT:-/tmp/gpu-out}}
STAGE=${2:-all}
mkdir -p "$OUT"
exec > >(tee "$OUT/$STAGE.log") 2>&1
export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) began=$SECONDS
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then echo "=== $name: skipped (deadline)"; return; fi
    echo "=== $(date +%T) $name (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== $name: rc=$? in $((SECONDS - began))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cpus', os.cpu_count(), 'threads', torch.get_num_threads())"

# FAISS: the faiss-gpu 1.15.1 wheel, carried in two parts (.gpuA/libfaiss.so.xz, unpacked by
# an earlier call into /tmp/fg, and .gpuB/faiss_gpu_rest.tar.xz), with cuBLAS 12 calls forwarded
# to the machine's cuBLAS 13; faiss-cpu from .whl/ when that does not work.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-cu .whl/nvidia_cuda_runtime_cu12-*.whl || echo "cudart install failed"
if ls .whlcpu/faiss_cpu-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site-cpu .whlcpu/faiss_cpu-*.whl || echo "faiss-cpu install failed"
fi
if [ -f .gpuA/libfaiss.so.xz ] && [ ! -f /tmp/fg/libfaiss.so ]; then
    mkdir -p /tmp/fg && xz -d -T16 -c .gpuA/libfaiss.so.xz > /tmp/fg/libfaiss.so
fi
if [ -f /tmp/fg/libfaiss.so ] && [ -f .gpuB/faiss_gpu_rest.tar.xz ] \
        && [ ! -f /tmp/site-gpu/faiss/libfaiss.so ]; then
    mkdir -p /tmp/site-gpu && tar -xJf .gpuB/faiss_gpu_rest.tar.xz -C /tmp/site-gpu \
        && cp /tmp/fg/libfaiss.so /tmp/site-gpu/faiss/
fi
SITE=$(python3 -c "import site; print(' '.join(site.getsitepackages()))")
CUBLAS13=$(find $SITE /usr/local/cuda/lib64 -name 'libcublas.so.13' 2>/dev/null | head -1)
CURAND10=$(find $SITE /usr/local/cuda/lib64 -name 'libcurand.so.10' 2>/dev/null | head -1)
echo "libcublas.so.13: ${CUBLAS13:-not found}; libcurand.so.10: ${CURAND10:-not found}"
mkdir -p /tmp/shim
gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script="$HERE/cublas12.map" \
    -o /tmp/shim/libcublas.so.12 "$HERE/cublas12_shim.c" -ldl
echo 'void knnflow_cublaslt12_placeholder(void) {}' > /tmp/shim/lt.c
gcc -shared -fPIC -Wl,-soname,libcublasLt.so.12 -o /tmp/shim/libcublasLt.so.12 /tmp/shim/lt.c
# faiss-gpu 1.15 finds its CUDA 12 libraries through the nvidia.* packages of the cu12 wheels:
# cuda_runtime is the real one; cublas and curand point at the shim and at CUDA 13's curand.
mkdir -p /tmp/site-cu/nvidia/cublas/lib /tmp/site-cu/nvidia/curand/lib
ln -sf /tmp/shim/libcublas.so.12 /tmp/shim/libcublasLt.so.12 /tmp/site-cu/nvidia/cublas/lib/
[ -n "$CURAND10" ] && ln -sf "$CURAND10" /tmp/site-cu/nvidia/curand/lib/libcurand.so.10
export LD_LIBRARY_PATH="/tmp/shim:/tmp/site-cu/nvidia/cuda_runtime/lib:$(dirname "${CUBLAS13:-/x/x}"):${LD_LIBRARY_PATH:-}"
export _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1
KF="python3 -m cli.main"  # the knnflow command, run from the checkout on PYTHONPATH

export PYTHONPATH="/tmp/site-gpu:/tmp/site-cu:$REPO"
if [ "$STAGE" != bench ]; then
    step faiss-gpu 100 python3 "$HERE/faiss_gpu_check.py"
fi
if [ -f /tmp/site-gpu/faiss/libfaiss.so ] && python3 "$HERE/faiss_gpu_check.py" --quick; then
    FAISS_DEV=cuda
else
    echo "=== faiss-gpu unusable here: faiss-cpu for the index, torch on the GPU"
    export PYTHONPATH="/tmp/site-cpu:/tmp/site-cu:$REPO"
    FAISS_DEV=cpu
fi
echo "=== FAISS on $FAISS_DEV"
if [ "$STAGE" != bench ]; then
    step pytest-gpu 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
    step profile-exact 60 python3 "$HERE/profile_exact.py"
fi
if [ "$STAGE" = setup ]; then echo "=== setup done at ${SECONDS}s"; exit 0; fi
# In order of what the open issues need most; the last steps run as the deadline allows.
# Real images first: photos (3×32×32) and photos at 64×64, cut from scikit-image's photographs
# (its wheel and those it needs in .whl/ when the machine lacks them).
if ! python3 -c "import skimage" 2>/dev/null && ls .whl/scikit_image-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-compile --no-cache-dir --find-links .whl \
        --target /tmp/site-skimage scikit-image || echo "scikit-image install failed"
    export PYTHONPATH="$PYTHONPATH:/tmp/site-skimage"
fi
for SIZE in 32 64; do
    step index-photos$SIZE 90 $KF build-index photos --size $SIZE --device $FAISS_DEV \
        --out /tmp/idx-photos$SIZE --overwrite
    step bench-exact-photos$SIZE 150 $KF bench exact --size $SIZE --device cuda \
        --t-grid 0:0.95:0.1 --json-out "$OUT/exact-photos$SIZE.json"
    step bench-knn-photos$SIZE 150 $KF bench knn --index /tmp/idx-photos$SIZE --device cuda \
        --t-grid 0.3,0.5,0.7,0.9 --json-out "$OUT/knn-photos$SIZE.json"
    step bench-memorization-photos$SIZE 90 $KF bench memorization \
        --index /tmp/idx-photos$SIZE --json-out "$OUT/memorization-photos$SIZE.json"
done
step index-50k 90 $KF build-index synthetic --device $FAISS_DEV --out /tmp/idx50k --overwrite
step bench-train 150 $KF bench train --dataset synthetic --index /tmp/idx50k --preset cifar \
    --device cuda --targets cfm,efm-128,efm-128-shared,knn-efm-faster,knn-efm-certify,exact \
    --steps 10 --warmup 2 --json-out "$OUT/train.json"
step bench-train-gpu-search 150 $KF bench train --dataset synthetic --index /tmp/idx50k \
    --preset cifar --device cuda --targets cfm,knn-efm-faster,knn-efm-certify,exact \
    --steps 10 --warmup 2 \
    --knn-search-device cuda --json-out "$OUT/train-gpu-search.json"
step bench-knn-50k-gpu-search 120 $KF bench knn --index /tmp/idx50k --device cuda \
    --search-device cuda --route certify --t-grid 0.1,0.5,0.9 \
    --json-out "$OUT/knn50k-gpu-search.json"
step bench-knn-50k 120 $KF bench knn --index /tmp/idx50k --device cuda --route certify \
    --t-grid 0.1,0.5,0.9 --json-out "$OUT/knn50k.json"
step bench-knn-50k-faster 120 $KF bench knn --index /tmp/idx50k --device cuda --route faster \
    --t-grid 0.1,0.5,0.9 --json-out "$OUT/knn50k-faster.json"
step index-200k 120 $KF build-index synthetic --limit 200000 --device $FAISS_DEV \
    --out /tmp/idx200k --overwrite
step bench-knn-200k-gpu-search 120 $KF bench knn --index /tmp/idx200k --device cuda \
    --search-device cuda --route certify --t-grid 0.1,0.5,0.9 \
    --json-out "$OUT/knn200k-gpu-search.json"
echo "=== done at $((SECONDS))s"
