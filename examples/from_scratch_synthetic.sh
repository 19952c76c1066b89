#!/usr/bin/env bash
# Train a tiny CLIP from scratch on the built-in synthetic shapes (generated once, cached; no download), then
# evaluate retrieval on its test split. Extra arguments go to train.py, e.g. a quick look:
#   bash examples/from_scratch_synthetic.sh --max_steps 30
set -euo pipefail
OUT=${OUT:-output/examples/scratch}
# No --train_file: train.py's embedded default run (tiny-vit, synthetic shapes, 12 epochs, batch 64, bf16 on CPU).
python train.py --output_dir "$OUT" --logging_steps 10 "$@"
echo "model, loss_curve.png and eval/test results in $OUT; try: bash examples/zero_shot.sh $OUT"
