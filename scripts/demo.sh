#!/usr/bin/env bash
# The main job end to end on real breast-ultrasound images (BUSI), with the embedded Redis:
# index -> train a FAISS index -> retrieve for one query per class (printed, picture + JSON saved)
# -> leave-one-out accuracy (Excel workbook + confusion matrices under results/).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CBIR_DATA:-../shared/data}
export CBIR_HOME=${CBIR_HOME:-$PWD/.cbir}   # the embedded Redis keeps the demo database here
DB=busi_demo

echo "== 1. index $DATA/busi (780 images, 3 classes) with the pretrained EfficientNet-Lite0"
python add_images.py --db-name $DB --path "$DATA/busi"
echo
echo "== 2. train an approximate-search index (IVF), tuned to recall@10 >= 0.95 against exact search"
python train_index.py --db-name $DB --index ivf
echo
echo "== 3. what the database holds"
python -m cbir info --db-name $DB
echo
echo "== 4. retrieve the 8 most similar images for one random image of each class"
python retrieve_images.py --db-name $DB --path "$DATA/busi" --nrt-neigh 8 --results-dir results \
    --json results/demo_retrieval.json
echo
echo "== 5. how often is the answer right? leave-one-out over the whole database (exact search)"
python test_accuracy.py --db-name $DB --measure loo --exact --excel-path results/demo_accuracy.xlsx \
    --json results/demo_accuracy.json
