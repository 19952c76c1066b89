#!/usr/bin/env bash
# Chinese-CLIP's two-stage recipe on a tiny Chinese model (ViT + BERT): stage 1 trains the text tower against the
# locked image tower (LiT), stage 2 (from --unlock_image_step) trains both. See docs/lit_two_stage.md.
# Usage: bash examples/two_stage_chinese.sh [CHECKPOINT] [extra train.py arguments...]
#   CHECKPOINT default: an untrained tiny-chinese-vit saved with save_pretrained (stand-in for a Chinese-CLIP .pt).
#   Data: Flickr8k-CN when $MINICLIP_DATA/flickr8k/zh_train.json exists, else the Chinese captions of the shapes.
set -euo pipefail
CKPT=${1:-output/examples/start_zh}
shift $(( $# < 1 ? $# : 1 ))
if [ ! -e "$CKPT" ]; then
  python examples/prepare.py --task checkpoint --model_config tiny-chinese-vit --output_dir "$CKPT"
fi
DATA=${MINICLIP_DATA:-../shared/data}/flickr8k
if [ -f "$DATA/zh_train.json" ]; then
  FILES=(--train_file "$DATA/zh_train.json" --validation_file "$DATA/zh_val.json" --max_eval_samples 200)
else
  python examples/prepare.py --task captions --language zh --output_dir output/examples/shapes_zh
  FILES=(--train_file output/examples/shapes_zh/train.json --validation_file output/examples/shapes_zh/val.json
         --image_root "$(cat output/examples/shapes_zh/image_root.txt)")
fi
python train.py --pretrained "$CKPT" "${FILES[@]}" --unlock_image_step 100 \
  --output_dir output/examples/two_stage_zh --max_steps 300 --per_device_train_batch_size 32 --learning_rate 5e-4 \
  --warmup_steps 20 --lr_scheduler_type cosine --weight_decay 0.1 --logging_steps 10 --eval_strategy steps \
  --eval_steps 100 --save_strategy no --report_to none --use_cpu true --bf16 true "$@"
