#!/usr/bin/env bash
# Finetuning that keeps what the model knew (docs/finetuning.md): a tiny CLIP "pretrained" on Flickr8k English is
# finetuned on another domain (the synthetic shapes, English captions) four ways, with what it knew tracked at every
# evaluation (Flickr8k test recall as --heldout_file, CIFAR-10 zero-shot as --zeroshot_dir):
#   plain       every weight trains at the full lr
#   lit         LiT: the image tower is locked (--lock_image), the text tower adapts
#   layerdecay  layer-wise lr decay 0.5 on both towers (--image_layer_decay / --text_layer_decay)
#   wise_ft     WiSE-FT: the plain finetune's weights interpolated with the pretrained ones (python -m
#               miniclip.apps.wise_ft), one model per alpha
# then writes the table (report.md) and PNGs (forgetting curves, WiSE-FT trade-off) into OUTPUT_DIR.
#
#   examples/finetune_without_forgetting.sh [DATA_DIR] [OUTPUT_DIR]   # DATA_DIR holds flickr8k/ and cifar10-test/
#
# Environment: PRETRAIN_STEPS (3000), FT_STEPS (200), FT_LR (1e-3), EVAL_STEPS (100), HELDOUT_IMAGES (300 Flickr8k
# test images), ZS_PER_CLASS (30 CIFAR-10 images a class), OMP_NUM_THREADS (1). Sized for a shared 2-core CPU:
# about 40 minutes with the pretraining, 25 without (it is reused when OUTPUT_DIR/pretrained exists).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$HERE/../shared/data}"
OUT="${2:-$HERE/output/finetune_without_forgetting}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-3000}"
FT_STEPS="${FT_STEPS:-200}"
FT_LR="${FT_LR:-1e-3}"
EVAL_STEPS="${EVAL_STEPS:-100}"
HELDOUT_IMAGES="${HELDOUT_IMAGES:-300}"
ZS_PER_CLASS="${ZS_PER_CLASS:-30}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

for need in flickr8k/en_train.json cifar10-test/airplane; do
    if [[ ! -e "$DATA_DIR/$need" ]]; then
        echo "error: $DATA_DIR/$need not found. Pass the folder holding flickr8k/ and cifar10-test/ as the first" \
             "argument." >&2
        exit 2
    fi
done
COMMON=(--per_device_eval_batch_size 256 --logging_steps 50 --save_strategy no --report_to none --use_cpu true
        --dataloader_num_workers 1 --dataloader_persistent_workers true --disable_tqdm true --seed 0)

# 1. The "pretrained" model: tiny-vit (64 px) from scratch on Flickr8k English (as examples/flickr8k_from_scratch.sh).
if [[ ! -f "$OUT/pretrained/model.safetensors" ]]; then
    python "$HERE/train.py" --model_config tiny-vit --train_file "$DATA_DIR/flickr8k/en_train.json" \
        --output_dir "$OUT/pretrained" --max_steps "$PRETRAIN_STEPS" --per_device_train_batch_size 64 \
        --learning_rate 2e-3 --warmup_steps 50 --lr_scheduler_type cosine --weight_decay 0.1 "${COMMON[@]}"
fi

# 2. The target domain: the synthetic shapes with their English captions, in a folder of their own.
python - "$OUT/shapes" <<'EOF'
import json, re, sys
from miniclip.data.synthetic import ensure_synthetic
data = ensure_synthetic(sys.argv[1])
for split, source in (("train", data.train_file), ("val", data.validation_file)):
    entries = json.loads(source.read_text(encoding="utf-8"))
    keep = [{"image": e["image"], "caption": [c for c in e["caption"] if not re.search(r"[\u4e00-\u9fff]", c)]}
            for e in entries]
    (data.root / f"en_{split}.json").write_text(json.dumps(keep, indent=0) + "\n", encoding="utf-8")
EOF

# 3. Three finetunes, each evaluated every EVAL_STEPS (plain also before the first step) on the target validation split,
#    the held-out Flickr8k test images and CIFAR-10 zero-shot.
finetune() {
    local name=$1; shift
    [[ -f "$OUT/$name/eval_results.json" ]] && return
    python "$HERE/train.py" --pretrained "$OUT/pretrained" --train_file "$OUT/shapes/en_train.json" \
        --validation_file "$OUT/shapes/en_val.json" --heldout_file "$DATA_DIR/flickr8k/en_test.json" \
        --max_eval_samples "$HELDOUT_IMAGES" --zeroshot_dir "$DATA_DIR/cifar10-test" --zeroshot_per_class "$ZS_PER_CLASS" \
        --output_dir "$OUT/$name" --max_steps "$FT_STEPS" --per_device_train_batch_size 64 --learning_rate "$FT_LR" \
        --warmup_steps 20 --lr_scheduler_type cosine --weight_decay 0.1 --eval_strategy steps \
        --eval_steps "$EVAL_STEPS" --bf16 true "${COMMON[@]}" "$@"
}
finetune plain --eval_on_start true  # step 0 = the pretrained model, the same start for all three
finetune lit --lock_image true
finetune layerdecay --image_layer_decay 0.5 --text_layer_decay 0.5

# 4. WiSE-FT between the pretrained model and the plain finetune.
if [[ ! -f "$OUT/wise_ft/results.json" ]]; then
    python -m miniclip.apps.wise_ft --zeroshot "$OUT/pretrained" --finetuned "$OUT/plain" \
        --alphas 0 0.25 0.5 0.75 1 --eval_files "$OUT/shapes/en_val.json" "$DATA_DIR/flickr8k/en_test.json" \
        --max_eval_samples "$HELDOUT_IMAGES" --zeroshot_dir "$DATA_DIR/cifar10-test" --zeroshot_per_class "$ZS_PER_CLASS" \
        --output_dir "$OUT/wise_ft" --save_models false --bf16 true --no_progress
fi

# 5. The table and the curves.
python "$HERE/examples/finetune_report.py" "$OUT"
