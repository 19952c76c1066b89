"""The summary at the top of bench/gpu_check.sh's file: issue 18's targets against what the stages measured, and
peak GPU memory per configuration, read from the JSON files the stages wrote into the output folder. A stage that
did not run (failed, timed out) shows as "-". Leaves out on purpose: the stages' own tables (the script appends
them below).

    python bench/gpu_report.py bench/gpu_check_out
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fmt, markdown_table  # noqa: E402


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _row(rows, impl: str) -> dict:
    return next((r for r in rows or [] if r["impl"] == impl and r["precision"] == "bf16"), {})


def _verdict(value, target: float) -> str:
    return "-" if value is None else ("met" if value >= target else "missed")


def report(folder: Path) -> str:
    vit, tiny, busy = (_load(folder, n) for n in ("train_vit_b_16.json", "train_tinyclip.json", "gpu_busy.json"))
    ours_vit, theirs_vit = _row(vit, "miniclip"), _row(vit, "open_clip")
    mfu = ours_vit.get("mfu_measured")
    speedup_oc = theirs_vit.get("speedup")  # miniclip / open_clip, in the open_clip row
    sheet = ours_vit.get("mfu_datasheet")
    busy_pct = (busy or {}).get("gpu_busy_pct")
    targets = [
        ["ViT-B/16 bf16 training MFU (measured matmul peak)", ">= 45 %", fmt(mfu, 1) + (
            f" (datasheet peak: {fmt(sheet, 1)})" if sheet is not None else ""), _verdict(mfu, 45)],
        ["ViT-B/16 bf16 samples/s, miniclip / open_clip", ">= 1.20x", fmt(speedup_oc), _verdict(speedup_oc, 1.2)],
        [f"TinyCLIP-40M train.py, GPU busy ({(busy or {}).get('workers', '-')} workers)", ">= 90 %",
         fmt(busy_pct, 1), _verdict(busy_pct, 90)],
    ]
    memory = []
    for r in (vit or []) + (tiny or []):
        memory.append([r["config"], r["impl"], r["batch"], fmt(r["peak_mb"], 0)])
    if busy:
        memory.append([busy["config"] + " (train.py run)", "miniclip, ClipTrainer + data", busy["batch"],
                       fmt(busy["peak_mb"], 0)])
    return ("Targets (issue 18):\n\n" + markdown_table(["target", "wanted", "measured", "verdict"], targets) +
            "\n\nPeak GPU memory (torch.cuda.max_memory_allocated over the timed steps):\n\n" +
            markdown_table(["config", "implementation", "batch", "peak MB"], memory))


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/gpu_check_out")))
