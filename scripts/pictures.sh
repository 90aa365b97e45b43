#!/usr/bin/env bash
# Every picture for ../shared/data/busi and mednist_12k under data_visualization/ (frozen
# EfficientNet-Lite0 features, embedded Redis): dataset overviews, t-SNE of the databases,
# retrieval galleries (PNG + HTML), leave-one-out confusion matrices.
# Charts without dataset images are committed (see .gitignore); image grids are regenerated.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CBIR_DATA:-../shared/data}
export CBIR_HOME=${CBIR_HOME:-$PWD/.cbir}
OUT=data_visualization

python -m cbir dataset --path "$DATA/busi" --out-dir $OUT --quiet
python -m cbir dataset --path "$DATA/mednist_12k.npz" --split train --name mednist_12k --out-dir $OUT --quiet

python add_images.py --db-name busi_pictures --path "$DATA/busi" --rewrite --quiet
python add_images.py --db-name mednist_pictures --path "$DATA/mednist_12k.npz" --split train --input-size 64 --rewrite --quiet
for db in busi_pictures mednist_pictures; do
    python tsne.py --db-name $db --out $OUT/tsne_${db%_pictures}.png
    python test_accuracy.py --db-name $db --measure loo --exact --excel-path $OUT/accuracy_${db%_pictures}.xlsx --quiet
done
python retrieve_images.py --db-name busi_pictures --path "$DATA/busi" --nrt-neigh 6 --results-dir $OUT \
    --html $OUT/gallery_busi.html
python retrieve_images.py --db-name mednist_pictures --path "$DATA/mednist_12k.npz" --split test --nrt-neigh 6 \
    --results-dir $OUT --html $OUT/gallery_mednist.html
