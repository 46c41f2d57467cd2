#!/usr/bin/env bash
# Full held-out evaluation on kermany_train (3 seeds): anomaly screening, fidelity, synthetic-data utility
# and privacy. Prints the headline figures and the wall time; writes metrics.json and report.html.
#
#   bash benchmarks/evaluate_kermany.sh [DATA_DIR] [OUT_DIR] [extra --set key=value ...]
#
# DATA_DIR defaults to ../shared/data/kermany_train beside the checkout; OUT_DIR to runs/eval_kermany.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/kermany_train}"
OUT="${2:-runs/eval_kermany}"
shift $(( $# > 2 ? 2 : $# ))
uv run python benchmarks/evaluate_kermany.py "$DATA" "$OUT" --config configs/evaluate.yaml "$@"
