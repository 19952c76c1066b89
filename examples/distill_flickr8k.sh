#!/usr/bin/env bash
# Distillation on Flickr8k (English): train a 4-layer tiny ViT teacher, then a 2-layer student three ways at the
# same budget (examples/grids/distill_flickr8k.yaml): from scratch, distilled (affinity mimicking + contrastive),
# inherited from the teacher's layers + distilled; 3 seeds each. Writes distill.md (test recall, mean +- std over
# seeds, with the teacher's row) and distill.png into OUTPUT_DIR.
#
#   examples/distill_flickr8k.sh [DATA_DIR] [OUTPUT_DIR]     # DATA_DIR holds flickr8k/en_*.json
#   TEACHER_STEPS=2000 STUDENT_STEPS=1000 examples/distill_flickr8k.sh /data   # a longer run (GPU: add EXTRA_ARGS)
#
# Environment: TEACHER_STEPS (400), STUDENT_STEPS (200; overrides the grid's max_steps), OMP_NUM_THREADS (1).
# Finished runs are reused (the ablation runner keys them by their arguments); the teacher folder is named by its
# step count, so a different TEACHER_STEPS trains (and distils from) a new teacher.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-$HERE/../shared/data}"
OUTPUT_DIR="${2:-$HERE/output/distill_flickr8k}"
TEACHER_STEPS="${TEACHER_STEPS:-400}"
STUDENT_STEPS="${STUDENT_STEPS:-200}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MINICLIP_DATA="$DATA_DIR" PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

if [[ ! -f "$DATA_DIR/flickr8k/en_train.json" ]]; then
    echo "error: $DATA_DIR/flickr8k/en_train.json not found. Pass the folder holding flickr8k/ as the first" \
         "argument." >&2
    exit 2
fi

export TEACHER="$OUTPUT_DIR/teacher-${TEACHER_STEPS}steps"
if [[ ! -f "$TEACHER/test_results.json" ]]; then
    python -m miniclip.apps.train --model_config "$HERE/examples/configs/tiny-vit-4layer.json" \
        --train_file "$DATA_DIR/flickr8k/en_train.json" --test_file "$DATA_DIR/flickr8k/en_test.json" \
        --output_dir "$TEACHER" --max_steps "$TEACHER_STEPS" --per_device_train_batch_size 64 \
        --per_device_eval_batch_size 250 --learning_rate 2e-3 --warmup_steps 20 --lr_scheduler_type cosine \
        --weight_decay 0.1 --logging_steps 20 --save_strategy no --eval_strategy no --report_to none \
        --use_cpu true --bf16 true --dataloader_num_workers 1 --disable_tqdm true --seed 0
fi

grid="$OUTPUT_DIR/grid.yaml"  # the example grid with this run's step budget
python - "$HERE/examples/grids/distill_flickr8k.yaml" "$grid" "$STUDENT_STEPS" "$OUTPUT_DIR/students" <<'PY'
import sys, yaml
grid = yaml.safe_load(open(sys.argv[1]))
grid["base"]["max_steps"], grid["output_dir"] = int(sys.argv[3]), sys.argv[4]
yaml.safe_dump(grid, open(sys.argv[2], "w"), sort_keys=False)
PY
python -m miniclip.apps.ablate "$grid"
python "$HERE/examples/distill_report.py" "$OUTPUT_DIR/students" "$TEACHER" "$OUTPUT_DIR"
