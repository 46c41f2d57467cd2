#!/usr/bin/env bash
# The anomaly-screening ablation of docs/quality.md: one row per model/preprocessing change, on the same
# patient-grouped split of kermany_train (split_seed 0), anomaly study only (utility=false).
#
#   bash benchmarks/evaluate_ablation.sh [DATA_DIR] [OUT_ROOT] [SEEDS] [ROW_REGEX]
#
# SEEDS defaults to [0] (screening); pass "[0,1,2]" for mean ± sd. Prints one line per row with the
# AUROC of every score and the wall time. Each row writes OUT_ROOT/<row>/metrics.json and report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/kermany_train}"
OUT="${2:-runs/ablation}"
SEEDS="${3:-[0]}"
ONLY="${4:-.}"   # an extended regex: run only the rows whose name matches

row() {
  local name="$1"; shift
  [[ "$name" =~ $ONLY ]] || return 0
  local t0=$SECONDS
  uv run python benchmarks/evaluate_kermany.py "$DATA" "$OUT/$name" --config configs/evaluate.yaml --quiet \
    --set "seeds=$SEEDS" --set utility=false "$@" > "$OUT/$name.log" 2>&1
  uv run python - "$OUT/$name/metrics.json" "$name" $((SECONDS - t0)) <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["anomaly"]["summary"]["scores"]
cells = " | ".join(f"{k} {v['auroc']['mean']:.3f} ± {v['auroc']['sd']:.3f}" for k, v in m.items())
print(f"{sys.argv[2]:>18} | {cells} | {sys.argv[3]} s", flush=True)
PY
}

mkdir -p "$OUT"
# The seed model (latent 32, BCE, β 1, raw intensities), then one change at a time, then the combinations.
row base_L32            --set intensity=none --set anomaly.model.latent_dim=32
row ref_L32_bs128_ep40  --set intensity=none --set anomaly.model.latent_dim=32 --set anomaly.batch_size=128 --set anomaly.epochs=40
row L64                 --set intensity=none --set anomaly.model.latent_dim=64
row L128                --set intensity=none --set anomaly.model.latent_dim=128
row L256                --set intensity=none --set anomaly.model.latent_dim=256
row beta0.5             --set intensity=none --set anomaly.model.latent_dim=32 --set anomaly.loss.beta=0.5
row beta4               --set intensity=none --set anomaly.model.latent_dim=32 --set anomaly.loss.beta=4
row mse                 --set intensity=none --set anomaly.model.latent_dim=32 --set anomaly.loss.reconstruction=mse
row equalize_L32        --set intensity=equalize --set anomaly.model.latent_dim=32
row equalize_L128       --set intensity=equalize --set anomaly.model.latent_dim=128
row clahe_L32           --set intensity=clahe --set anomaly.model.latent_dim=32
row clahe_L128          --set intensity=clahe --set anomaly.model.latent_dim=128
row clahe_L256          --set intensity=clahe --set anomaly.model.latent_dim=256
row clahe_L128_mse      --set intensity=clahe --set anomaly.model.latent_dim=128 --set anomaly.loss.reconstruction=mse
row clahe_L128_beta2    --set intensity=clahe --set anomaly.model.latent_dim=128 --set anomaly.loss.beta=2
row clahe_L128_aug      --set intensity=clahe --set anomaly.model.latent_dim=128 --set anomaly.augment=true
row clahe_L128_split1   --set intensity=clahe --set anomaly.model.latent_dim=128 --set split_seed=1
row clahe_L128_split2   --set intensity=clahe --set anomaly.model.latent_dim=128 --set split_seed=2
