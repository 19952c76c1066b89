#!/usr/bin/env bash
# The CUDA path, run for real, in one command (bench/GPU.md says what each stage proves and how to read the file).
# On a GPU machine with PyTorch installed and no package registry: install the missing pure-Python dependencies
# from a local wheel folder, then run, each under a time cap (about 8 minutes in all): the CUDA tests; train_speed
# for OpenAI-ViT-B-16 at batch 256 and TinyCLIP-ViT-40M-32-Text-19M at the largest batch that fits (bf16, against
# open_clip and transformers, MFU); encode_speed; a 300-step train.py run with the GPU busy fraction. Writes one
# markdown file, OUT/RESULTS_GPU.md (logs in OUT/logs).
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [WHEEL_DIR]
#   bash bench/gpu_check.sh --download-wheels WHEEL_DIR [--python-version 3.12]   # where a registry is reachable
#
# --dry-run prints the plan (every command and its cap) without running it. Without a CUDA GPU the script says so
# in one line and runs nothing.
# Exit status: 0 = every stage passed, or no CUDA GPU here (the one line says so); 1 = a stage failed or hit its
# cap (the file says which; later stages still ran); 2 = usage error, or dependencies missing after the install.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python}
DRY=0 OUT=bench/gpu_check_out WHEELS="" DOWNLOAD="" PYVER=3.12

# Distributions an image with torch, torchvision and transformers (and their own dependencies: numpy, pillow,
# safetensors, regex, tokenizers, huggingface_hub, pyyaml, tqdm, packaging) may lack: what miniclip, its oracles
# and the tests import. Binary ones (psutil, pyarrow, xxhash, pandas, matplotlib, kiwisolver...) need wheels for
# the GPU machine's Python, hence --python-version. All of them: about 90 MB, 55 of it pyarrow; GPU_CHECK_PACKAGES
# overrides the list (download only what the image lacks: `missing` below names it by import name).
NEEDED=${GPU_CHECK_PACKAGES:-"open_clip_torch ftfy wcwidth timm accelerate psutil datasets pyarrow dill multiprocess
xxhash pandas python-dateutil six pytz tzdata matplotlib cycler fonttools kiwisolver pyparsing contourpy pytest pluggy
iniconfig pygments"}

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --download-wheels) DOWNLOAD=${2:?--download-wheels needs a folder}; shift ;;
    --python-version) PYVER=${2:?--python-version needs a version}; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) WHEELS=$1 ;;
  esac
  shift
done

if [[ -n $DOWNLOAD ]]; then  # fill the wheel folder (no dependencies: torch and its CUDA wheels stay out)
  # pip matches each --platform tag literally: list the older manylinux tags too (matplotlib ships 2014 / 2_17).
  mkdir -p "$DOWNLOAD"
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --implementation cp -d "$DOWNLOAD" $NEEDED || exit 2
  # miniclip itself as a wheel (pure Python): installed there without a build backend. The stages still import
  # the checkout (PYTHONPATH comes first), so a stale wheel changes nothing but the console scripts.
  SRC=$(mktemp -d) && cp -r pyproject.toml README.md miniclip "$SRC" && DEST=$(cd "$DOWNLOAD" && pwd) &&
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "$SRC" >/dev/null || exit 2
  rm -rf "$SRC"  # built in a copy: no build/ or egg-info left in the checkout
  echo "gpu_check: $(ls "$DOWNLOAD"/*.whl | wc -l) wheels in $DOWNLOAD ($(du -sh "$DOWNLOAD" | cut -f1))"
  exit 0
fi

# --- 1. is there a GPU? ------------------------------------------------------------------------------------------
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
if [[ $? -ne 0 ]]; then
  echo "gpu_check: no CUDA GPU: PyTorch is not importable with $PY; nothing run"
  exit 0
elif [[ -z $GPU ]]; then
  echo "gpu_check: no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)') sees none); nothing run"
  exit 0
fi

((DRY)) || mkdir -p "$OUT/logs"
LOGS=$OUT/logs RESULT=$OUT/RESULTS_GPU.md FAILED=0 STATUS=()
CORES=$(nproc)
WORKERS=$((CORES > 3 ? CORES - 2 : 1))
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false

# --- 2. dependencies from the wheel folder ----------------------------------------------------------------------
missing() {  # the import names of what the stages need that this interpreter cannot find
  "$PY" - <<'EOF'
import importlib.util
mods = ["torch", "torchvision", "transformers", "accelerate", "datasets", "pyarrow", "pandas", "safetensors",
        "open_clip", "ftfy", "regex", "timm", "huggingface_hub", "PIL", "numpy", "yaml", "tqdm", "matplotlib",
        "pytest", "psutil", "dill", "multiprocess", "xxhash", "dateutil", "kiwisolver", "pyparsing", "cycler",
        "fontTools"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
}
if ((DRY)); then
  MISSING=$(missing)
  echo "dry run: would install from ${WHEELS:-<no wheel folder>} what is missing now: ${MISSING:-nothing}"
elif [[ -n $(missing) ]]; then
  if [[ -z $WHEELS || ! -d $WHEELS ]]; then
    echo "gpu_check: missing Python packages ($(missing)) and no wheel folder given. Fix: on a machine with a" \
         "registry run: bash bench/gpu_check.sh --download-wheels wheels --python-version" \
         "$("$PY" -c 'import sys; print(*sys.version_info[:2], sep=".")'), copy wheels/ here, pass it" >&2
    exit 2
  fi
  # Only the wheels whose distribution is not installed: never downgrade what the image ships.
  TO_INSTALL=$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  # shellcheck disable=SC2086
  [[ -n $TO_INSTALL ]] && "$PY" -m pip install --no-index --no-deps $TO_INSTALL >"$LOGS/install.log" 2>&1 \
    || { [[ -n $TO_INSTALL ]] && echo "gpu_check: pip install from $WHEELS failed, see $LOGS/install.log" >&2; }
  if [[ -n $(missing) ]]; then
    echo "gpu_check: still missing after installing from $WHEELS: $(missing) (log: $LOGS/install.log). Fix: add" \
         "their wheels, built for this Python ($("$PY" -c 'import sys; print(*sys.version_info[:2], sep=".")'))" >&2
    exit 2
  fi
fi

if ((!DRY)) && ! "$PY" -c 'import miniclip.apps.train, open_clip, pytest' >"$LOGS/imports.log" 2>&1; then
  echo "gpu_check: the project does not import: $(tail -1 "$LOGS/imports.log") (log: $LOGS/imports.log)" >&2
  exit 2
fi

# --- 3. the stages, each under a cap -----------------------------------------------------------------------------
run_stage() {  # NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2 start=$SECONDS rc state
  shift 2
  echo "== $name (cap ${cap}s): $*"
  if ((DRY)); then STATUS+=("| $name | planned | - | $cap |"); return; fi
  timeout --kill-after=10 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) state=passed ;;
    124|137) state="timed out"; FAILED=1 ;;
    *) state="failed (exit $rc)"; FAILED=1 ;;
  esac
  tail -n 2 "$LOGS/$name.log"
  STATUS+=("| $name | $state | $((SECONDS - start)) | $cap |")
}

((DRY)) || rm -f "$RESULT" "$OUT"/{train_vit_b_16,train_tinyclip,encode,gpu_busy}.{md,json}  # no stale numbers
TS="$PY bench/train_speed.py --device cuda --precisions bf16 --threads 4 --no-wait"
run_stage cuda-tests 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
run_stage train-vit-b-16 130 $TS --config OpenAI-ViT-B-16 --batch 256 --reps 2 --steps 10 --warmup 3 \
  --impls miniclip open_clip transformers --out "$OUT/train_vit_b_16.md" --json "$OUT/train_vit_b_16.json"
run_stage train-tinyclip-40m 110 $TS --config TinyCLIP-ViT-40M-32-Text-19M --batch max --max-batch 8192 --reps 1 \
  --steps 10 --warmup 3 --impls miniclip open_clip transformers miniclip+trainer \
  --out "$OUT/train_tinyclip.md" --json "$OUT/train_tinyclip.json"
run_stage encode 45 "$PY" bench/encode_speed.py --device cuda --precisions bf16 --reps 1 --batches 10 \
  --image-batch 256 --config OpenAI-ViT-B-16 --threads 4 --no-wait --out "$OUT/encode.md"
run_stage train-py-300-steps 90 "$PY" bench/gpu_busy.py --config TinyCLIP-ViT-40M-32-Text-19M --batch 256 \
  --steps 300 --skip 50 --images 1024 --workers "$WORKERS" --out "$OUT/gpu_busy.md" --json "$OUT/gpu_busy.json"
if ((DRY)); then
  echo "dry run: $GPU found; the stages above would write $RESULT"
  exit 0
fi

# --- 4. one markdown file ----------------------------------------------------------------------------------------
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  VERSIONS=$("$PY" -c 'import sys, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda},", end=" ")
print("Python", sys.version.split()[0])')
  echo "GPU: $GPU; driver ${DRIVER:-unknown (no nvidia-smi)}; $VERSIONS; $CORES CPU cores;" \
       "miniclip $(git describe --always --dirty 2>/dev/null || echo '?')."
  echo
  echo "| stage | result | seconds | cap |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  SUMMARY=$(grep -E '[0-9]+ (passed|failed|error)' "$LOGS/cuda-tests.log" | tail -1)
  echo "CUDA tests: ${SUMMARY:-no pytest summary line (see logs/cuda-tests.log)}"
  grep -E '^(FAILED|ERROR) ' "$LOGS/cuda-tests.log" | sed 's/^/    /'
  echo
  "$PY" bench/gpu_report.py "$OUT"
  for part in train_vit_b_16 train_tinyclip encode gpu_busy; do
    [[ -f $OUT/$part.md ]] && { echo; cat "$OUT/$part.md"; }
  done
} >"$RESULT" 2>>"$LOGS/report.log"
echo "gpu_check: wrote $RESULT$( ((FAILED)) && echo ' (some stages failed: see the table and logs)')"
exit $FAILED
