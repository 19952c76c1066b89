#!/usr/bin/env bash
# A CLIP from two pretrained unimodal towers (LiT, Zhai et al. 2022; what transformers' run_clip.py builds): a timm
# image model locked while a BERT-style text model learns to meet it, then (--unlock_image_step) both train.
# See docs/towers.md.
# Usage: bash examples/dual_encoder.sh [hub|tiny] [extra train.py arguments...]
#   hub : vit_tiny_patch16_224.augreg_in21k_ft_in1k + google/bert_uncased_L-4_H-256_A-4 (downloaded once, then
#         HF_HUB_OFFLINE=1 works), model config model_configs/timm-ViT-Tiny-BERT-mini.json.
#   tiny (default): the same command offline, with tiny randomly initialised towers saved as local folders.
#   Data: Flickr8k when $MINICLIP_DATA/flickr8k/en_train.json exists, else the English captions of the shapes.
set -euo pipefail
KIND=${1:-tiny}
shift $(( $# < 1 ? $# : 1 ))
if [ "$KIND" = hub ]; then
  CONFIG=timm-ViT-Tiny-BERT-mini
else
  [ -f output/examples/towers/model.json ] || python examples/prepare.py --task towers --output_dir output/examples/towers
  CONFIG=output/examples/towers/model.json
fi
DATA=${MINICLIP_DATA:-../shared/data}/flickr8k
if [ -f "$DATA/en_train.json" ]; then
  FILES=(--train_file "$DATA/en_train.json" --validation_file "$DATA/en_val.json" --max_eval_samples 200)
else
  python examples/prepare.py --task captions --language en --output_dir output/examples/shapes_en
  FILES=(--train_file output/examples/shapes_en/train.json --validation_file output/examples/shapes_en/val.json
         --image_root "$(cat output/examples/shapes_en/image_root.txt)")
fi
python train.py --model_config "$CONFIG" "${FILES[@]}" --lock_image true --unlock_image_step 100 \
  --output_dir "output/examples/dual_encoder_$KIND" --max_steps 300 --per_device_train_batch_size 32 \
  --learning_rate 5e-4 --warmup_steps 20 --lr_scheduler_type cosine --weight_decay 0.1 --logging_steps 10 \
  --eval_strategy steps --eval_steps 100 --save_strategy no --report_to none --use_cpu true "$@"
# The result is a miniclip folder; as a transformers VisionTextDualEncoderModel folder (run_clip's format):
python - "output/examples/dual_encoder_$KIND" <<'PY'
import sys
from miniclip.model import MiniClip
MiniClip.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1] + "_hf", format="hf")
print("VisionTextDualEncoderModel.from_pretrained(%r) loads it" % (sys.argv[1] + "_hf"))
PY
