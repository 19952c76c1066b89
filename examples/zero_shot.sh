#!/usr/bin/env bash
# Zero-shot classification with a checkpoint: "a photo of a {shape}." prompts against the synthetic test images
# sorted into one folder per shape. Usage: bash examples/zero_shot.sh [CHECKPOINT] [IMAGE_FOLDER]
#   CHECKPOINT: any folder / file the loader takes (default: the from-scratch example's output; if it is missing an
#               UNTRAINED tiny-vit is saved there, so expect chance accuracy, 20%, until you train it).
#   IMAGE_FOLDER: <folder>/<class name>/<images> (default: the synthetic shapes), e.g. $MINICLIP_DATA/cifar10-test
set -euo pipefail
CKPT=${1:-output/examples/scratch}
IMAGES=${2:-output/examples/shapes_by_class}
if [ ! -e "$CKPT" ]; then
  python examples/prepare.py --task checkpoint --model_config tiny-vit --output_dir "$CKPT"
fi
if [ ! -d "$IMAGES" ]; then
  python examples/prepare.py --task classes --output_dir "$IMAGES"
fi
python test.py --checkpoint "$CKPT" --zeroshot_dir "$IMAGES" --templates simple --output_dir output/examples/zero_shot
