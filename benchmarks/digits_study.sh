#!/usr/bin/env bash
# The short digits study of issue 5: cfm, efm-128 and knn-efm trained with the same seed and
# step budget (tiny preset, CPU), then 512 samples each and their memorization summary.
# Usage: bash benchmarks/digits_study.sh [STEPS] [OUT]   (defaults: 600, runs/study)
set -euo pipefail
STEPS=${1:-600}
OUT=${2:-runs/study}
KNNFLOW=${KNNFLOW:-knnflow}
mkdir -p "$OUT"
$KNNFLOW build-index digits --out "$OUT/index" --overwrite > /dev/null
for spec in "cfm" "efm --m 128" "knn-efm --index $OUT/index"; do
    name=$(echo "$spec" | cut -d' ' -f1)
    # shellcheck disable=SC2086
    $KNNFLOW train digits --target $spec --steps "$STEPS" --log-every 50 --seed 0 \
        --name "$OUT/$name" --overwrite > /dev/null
    $KNNFLOW sample "$OUT/$name" --n 512 --overwrite > /dev/null
    $KNNFLOW memorization "$OUT/$name/samples" --index "$OUT/index" --json --overwrite \
        > "$OUT/$name/memorization.json"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| target | ms/step (median) | ms on target (median) | loss at 100 / 300 / final "
      "| d1 mean | d1 / reference | memorized (d1/d2 < 1/3) |")
print("|---|---|---|---|---|---|---|")
for name in ("cfm", "efm", "knn-efm"):
    lines = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    loss = {m["step"]: m["loss"] for m in lines}
    summary = json.loads((out / name / "memorization.json").read_text())
    label = "efm-128" if name == "efm" else name
    print(f"| {label} | {statistics.median(m['ms_step'] for m in lines):.1f} | "
          f"{statistics.median(m['ms_target'] for m in lines):.1f} | "
          f"{loss.get(100, float('nan')):.3f} / {loss.get(300, float('nan')):.3f} / "
          f"{lines[-1]['loss']:.3f} | {summary['d1']['mean']:.3f} | "
          f"{summary['d1_mean_over_reference_mean']:.3f} | "
          f"{summary['memorized']['count']} ({100 * summary['memorized']['fraction']:.1f}%) |")
PY
