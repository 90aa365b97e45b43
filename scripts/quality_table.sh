#!/usr/bin/env bash
# Issue 43's table: retrieval quality on every shared set, three extractors each.
#   frozen  - the default: ImageNet EfficientNet-Lite0 at its 224 px, average pooling;
#   option  - the best frozen option by mean validation top-1 of BreastMNIST and RetinaMNIST: the set's
#             input size, GeM pooling, mirror-image test-time augmentation;
#   trained - `cbir train` with its defaults (last 4 stages + head from cached activations, cross-entropy
#             through a cosine classifier, 20 epochs, the epoch chosen on the validation split).
# MedMNIST sets: index = train split, queries = test split. BUSI has no split: frozen rows are
# leave-one-out; every BUSI row is also cross-validated in $FOLDS folds (index = the other folds, queries =
# one fold, the trained model trained on the other folds only), which the trained row needs.
# Exact search, kNN majority vote; wall time = add + train + evaluate of that row.
# Prints the table and writes it into docs/QUALITY.md between its table markers.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CBIR_DATA:-../shared/data}
export CBIR_HOME=${CBIR_HOME:-$PWD/.cbir}
OUT=results/quality
FOLDS=${FOLDS:-3}
mkdir -p $OUT
: > $OUT/rows.tsv

evaluate() {  # db, json, evaluate args...
    local db=$1 json=$2; shift 2
    python -m cbir evaluate --db-name "$db" --k 1 11 --exact --quiet --excel-path $OUT/quality.xlsx --name "$db" \
        --json "$json" --no-picture "$@" > /dev/null
}

row() {  # set, extractor, protocol, seconds, json files...
    python - "$@" >> $OUT/rows.tsv <<'PY'
import json, sys
name, extractor, protocol, seconds, *files = sys.argv[1:]
key = "loo" if protocol == "leave-one-out" else "all"
results = [json.load(open(f))["results"][key] for f in files]
weights = [r["queries"] for r in results]
mean = lambda k: sum(r[k] * w for r, w in zip(results, weights)) / sum(weights)
print("\t".join([name, extractor, protocol, f"{mean('top1'):.3f}", f"{mean('knn11_accuracy'):.3f}",
                 f"{mean('map_at_r'):.3f}", f"{float(seconds):.0f}"]))
PY
    tail -1 $OUT/rows.tsv
}

medmnist() {  # set, input size of the option and of training
    local set=$1 size=$2 npz="$DATA/$1.npz" start
    start=$SECONDS
    python -m cbir add --db-name q_${set}_frozen --path "$npz" --rewrite --quiet > /dev/null
    evaluate q_${set}_frozen $OUT/${set}_frozen.json --path "$npz" --split test
    row $set "frozen Lite0 224 px" test $((SECONDS - start)) $OUT/${set}_frozen.json
    start=$SECONDS
    python -m cbir add --db-name q_${set}_option --path "$npz" --input-size $size --pooling gem --flip --rewrite \
        --quiet > /dev/null
    evaluate q_${set}_option $OUT/${set}_option.json --path "$npz" --split test
    row $set "frozen, $size px, GeM, flip" test $((SECONDS - start)) $OUT/${set}_option.json
    start=$SECONDS
    python -m cbir train --training-data "$npz" --input-size $size --weights $OUT/trained/$set --overwrite --quiet \
        | tee $OUT/${set}_train.txt
    python -m cbir add --db-name q_${set}_trained --path "$npz" --weights $OUT/trained/$set/best.safetensors \
        --rewrite --quiet > /dev/null
    evaluate q_${set}_trained $OUT/${set}_trained.json --path "$npz" --split test
    row $set "trained, $size px" test $((SECONDS - start)) $OUT/${set}_trained.json
}

busi() {
    local folds=$OUT/busi_folds start fold
    python - "$DATA/busi" $folds $FOLDS <<'PY'
import random, shutil, sys
from pathlib import Path
source, target, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shutil.rmtree(target, ignore_errors=True)
for folder in sorted(p for p in source.iterdir() if p.is_dir()):
    files = sorted(folder.glob("*.png"))
    random.Random(0).shuffle(files)  # stratified: each class dealt round the folds
    for position, file in enumerate(files):
        for fold in range(count):
            role = "test" if position % count == fold else "train"
            link = target / str(fold) / role / folder.name / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())
PY
    start=$SECONDS
    python -m cbir add --db-name q_busi_frozen --path "$DATA/busi" --rewrite --quiet > /dev/null
    evaluate q_busi_frozen $OUT/busi_frozen.json --measure loo
    row busi "frozen Lite0 224 px" leave-one-out $((SECONDS - start)) $OUT/busi_frozen.json
    start=$SECONDS
    python -m cbir add --db-name q_busi_option --path "$DATA/busi" --pooling gem --flip --rewrite --quiet > /dev/null
    evaluate q_busi_option $OUT/busi_option.json --measure loo
    row busi "frozen, 224 px, GeM, flip" leave-one-out $((SECONDS - start)) $OUT/busi_option.json
    for kind in frozen option trained; do
        start=$SECONDS
        for ((fold = 0; fold < FOLDS; fold++)); do
            local db=q_busi_${kind}_$fold flags=()
            if [ $kind = option ]; then flags=(--pooling gem --flip); fi
            if [ $kind = trained ]; then
                python -m cbir train --training-data $folds/$fold/train --weights $OUT/trained/busi_$fold --overwrite \
                    --quiet | tee $OUT/busi_${fold}_train.txt
                flags=(--weights $OUT/trained/busi_$fold/best.safetensors)
            fi
            python -m cbir add --db-name $db --path $folds/$fold/train "${flags[@]}" --rewrite --quiet > /dev/null
            evaluate $db $OUT/busi_${kind}_cv$fold.json --path $folds/$fold/test
        done
        local label="frozen Lite0 224 px"
        [ $kind = option ] && label="frozen, 224 px, GeM, flip"
        [ $kind = trained ] && label="trained, 224 px"
        row busi "$label" "$FOLDS-fold" $((SECONDS - start)) $OUT/busi_${kind}_cv*.json
    done
}

SETS=${SETS:-"breastmnist retinamnist pneumoniamnist_subset mednist_12k busi"}
for set in $SETS; do
    case $set in
        busi) busi ;;
        mednist_12k) medmnist $set 64 ;;
        *) medmnist $set 128 ;;
    esac
done

python - $OUT/rows.tsv docs/QUALITY.md <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
header = ["set", "extractor", "queries", "top-1", "kNN@11", "mAP@R", "mAP@R / frozen", "wall s"]
frozen = {}
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for name, extractor, protocol, top1, knn, map_r, seconds in rows:
    if extractor.startswith("frozen Lite0"):
        frozen[(name, protocol)] = float(map_r)
    ratio = float(map_r) / frozen.get((name, protocol), float("nan"))
    lines.append(f"| {name} | {extractor} | {protocol} | {top1} | {knn} | {map_r} | {ratio:.2f} × | {seconds} |")
table = "\n".join(lines)
print(table)
doc = open(sys.argv[2]).read()
start, end = "<!-- quality-table -->", "<!-- /quality-table -->"
if start in doc and end in doc:
    doc = doc[:doc.index(start) + len(start)] + "\n" + table + "\n" + doc[doc.index(end):]
    open(sys.argv[2], "w").write(doc)
PY
