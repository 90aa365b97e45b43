#!/usr/bin/env bash
# Every accuracy protocol on the shared data with the frozen ImageNet EfficientNet-Lite0 (224 px),
# exact cosine kNN, into one workbook: results/protocols_frozen_lite0.xlsx (+ pictures, JSON); then
# with the trained extractors of scripts/train_table.sh into results/protocols_trained.xlsx.
# The issue's reference numbers for the same settings: busi loo top-1 0.780, top-5 0.962,
# majority@5 0.686; breastmnist test k=1 0.808, k=11 0.833; retinamnist test k=1 0.460, k=11 0.503.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CBIR_DATA:-../shared/data}
export CBIR_HOME=${CBIR_HOME:-$PWD/.cbir}
OUT=results/protocols_frozen_lite0.xlsx
ALL="all weighted random stat separated loo incremental removal interpolate"

python add_images.py --db-name busi_frozen --path "$DATA/busi" --rewrite --quiet
python test_accuracy.py --db-name busi_frozen --measure loo incremental removal interpolate --exact \
    --excel-path $OUT --name busi --json results/protocols_busi.json --quiet
for set in breastmnist retinamnist; do
    python add_images.py --db-name ${set}_frozen --path "$DATA/$set.npz" --split train --rewrite --quiet
    python test_accuracy.py --db-name ${set}_frozen --path "$DATA/$set.npz" --split test --measure $ALL \
        --exact --excel-path $OUT --name $set --json results/protocols_$set.json --quiet
done
python test_accuracy.py --db-name breastmnist_frozen --path "$DATA/breastmnist.npz" --split test \
    --measure remove --exclude-classes "normal, benign" --exact --excel-path $OUT --name breastmnist --quiet

# The same protocols with the trained extractors of scripts/train_table.sh, where they exist.
for set in breastmnist retinamnist; do
    weights=results/trained/$set/best.safetensors
    [ -f $weights ] || continue
    python add_images.py --db-name ${set}_trained --path "$DATA/$set.npz" --split train --weights $weights --quiet
    python test_accuracy.py --db-name ${set}_trained --path "$DATA/$set.npz" --split test --measure $ALL \
        --exact --excel-path results/protocols_trained.xlsx --name $set --json results/protocols_${set}_trained.json --quiet
done
