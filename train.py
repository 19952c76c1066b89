#!/usr/bin/env python
"""Train or finetune a MiniClip on image-caption files with the Hugging Face Trainer (one or many processes).

    python train.py                                   # the embedded default run: synthetic shapes, tiny model, CPU
    python train.py --model_config tiny-vit --train_file data/train.json --validation_file data/val.json \\
        --output_dir output/run --per_device_train_batch_size 64 --num_train_epochs 5 --learning_rate 5e-4
    accelerate launch --num_processes 4 train.py --pretrained TinyCLIP-ViT-8M-16-Text-3M-YFCC15M ... --bf16 true
    python train.py args.yaml                         # the same flags as a JSON / YAML file

`python train.py --help` lists every argument (miniclip/training/arguments.py); the run itself is
miniclip/apps/train.py.
"""
from miniclip.apps.train import cli

if __name__ == "__main__":
    cli()
