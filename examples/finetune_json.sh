#!/usr/bin/env bash
# Finetune a checkpoint on a JSON caption set ([{"image": "images/x.jpg", "caption": ["...", ...]}]).
# Usage: bash examples/finetune_json.sh [CHECKPOINT] [TRAIN_JSON] [VAL_JSON] [extra train.py arguments...]
#   defaults: an untrained tiny-vit saved with save_pretrained (stand-in for e.g. a TinyCLIP checkpoint in
#   model_hub/), and the English captions of the synthetic shapes. With Flickr8k:
#   bash examples/finetune_json.sh model_hub/TinyCLIP-ViT-40M-32-Text-19M-LAION400M.pt \
#        $MINICLIP_DATA/flickr8k/en_train.json $MINICLIP_DATA/flickr8k/en_val.json --max_steps 500
set -euo pipefail
CKPT=${1:-output/examples/start_en}
TRAIN=${2:-}
VAL=${3:-}
shift $(( $# < 3 ? $# : 3 ))
EXTRA=()
if [ ! -e "$CKPT" ]; then
  python examples/prepare.py --task checkpoint --model_config tiny-vit --output_dir "$CKPT"
fi
if [ -z "$TRAIN" ]; then
  python examples/prepare.py --task captions --language en --output_dir output/examples/shapes_en
  TRAIN=output/examples/shapes_en/train.json VAL=output/examples/shapes_en/val.json
  EXTRA=(--image_root "$(cat output/examples/shapes_en/image_root.txt)")
fi
python train.py --pretrained "$CKPT" --train_file "$TRAIN" ${VAL:+--validation_file "$VAL"} "${EXTRA[@]}" \
  --output_dir output/examples/finetune --per_device_train_batch_size 64 --learning_rate 5e-4 --warmup_steps 20 \
  --lr_scheduler_type cosine --weight_decay 0.1 --num_train_epochs 3 --logging_steps 10 --eval_strategy epoch \
  --save_strategy no --report_to none --use_cpu true --bf16 true "$@"
