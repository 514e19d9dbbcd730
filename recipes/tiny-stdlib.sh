#!/usr/bin/env bash
# The recipe of the model dsv2 ships (src/dsv2/assets/dsv2-tiny-stdlib; MODEL_CARD.md has the results).
#   bash recipes/tiny-stdlib.sh [WORK_DIR]      (default: runs/tiny-stdlib; ~75 minutes on 2 CPU cores)
# Corpus: the CPython standard library source (*.py) of the Python running dsv2, site-packages excluded.
# 3% of the files are held out (by a hash of the path), from the tokenizer and from training.
set -euo pipefail
WORK=${1:-runs/tiny-stdlib}
DSV2=${DSV2:-dsv2}
STDLIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
mkdir -p "$WORK"
$DSV2 tokenizer train "$STDLIB" --include '*.py' --exclude 'site-packages/*' --val-fraction 0.03 \
    --vocab-size 8192 --out "$WORK/tokenizer"
$DSV2 data prepare "$STDLIB" --include '*.py' --exclude 'site-packages/*' --val-fraction 0.03 \
    --tokenizer "$WORK/tokenizer" --out "$WORK/data" --overwrite
$DSV2 train --data "$WORK/data" --out "$WORK/run" --model tiny-stdlib --seq-len 512 --batch-size 8 --grad-accum 2 \
    --steps 1400 --lr 2e-3 --warmup-steps 80 --bf16 --paper-balance --capacity-factor 1.0 \
    --eval-every 100 --save-every 100 --seed 0
$DSV2 export "$WORK/run" "$WORK/model" --dtype bfloat16
$DSV2 plot "$WORK/run"
