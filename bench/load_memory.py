"""Peak memory of `load_pretrained`, in copies of the checkpoint's weights (issue 3: stay under about two).

Run: python bench/load_memory.py [--width 512 --layers 6]
Each case runs in a fresh process: save a random model in a layout, then load it and report the peak resident set
(VmHWM) above the process's baseline after imports, divided by the weights' size in bytes, and how that splits into
process memory (RssAnon: the model) and memory-mapped file pages (RssFile: page cache, reclaimable) after loading.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
from miniclip.checkpoints import load_pretrained

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
path, weight_bytes = sys.argv[1], int(sys.argv[2])
torch.zeros(1)
base, base_anon, base_file = rss("VmRSS:"), rss("RssAnon:"), rss("RssFile:")
model = load_pretrained(path)
peak = rss("VmHWM:")
anon, mapped = rss("RssAnon:"), rss("RssFile:")
print(json.dumps({"peak_over_base_bytes": peak - base, "copies": (peak - base) / weight_bytes,
                  "anon_copies_after": (anon - base_anon) / weight_bytes, "file_copies_after": (mapped - base_file) / weight_bytes}))
"""


def config(width: int, layers: int) -> dict:
    return {"embed_dim": 512, "quick_gelu": False,
            "vision_cfg": {"image_size": 224, "layers": layers, "width": width, "patch_size": 32, "head_width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": width // 64,
                         "layers": layers}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512, help="tower width")
    parser.add_argument("--layers", type=int, default=6, help="layers per tower")
    args = parser.parse_args()
    import open_clip
    import torch
    from safetensors.torch import save_file
    from miniclip.checkpoints import save_pretrained
    from miniclip.model import MiniClip
    cfg = config(args.width, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = MiniClip(cfg)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        save_pretrained(model, tmp / "miniclip")
        save_pretrained(model, tmp / "hf", format="hf")
        reference = open_clip.model.CLIP(**model.config.open_clip_cfg())
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
                   tmp / "tinyclip.pt")
        save_file(reference.state_dict(), str(tmp / "open_clip.safetensors"))
        torch.save(reference.state_dict(), tmp / "legacy.pt", _use_new_zipfile_serialization=False)  # no mmap
        del model, reference
        print(f"weights: {weight_bytes / 2**20:.0f} MiB")
        for case in ("miniclip", "hf", "tinyclip.pt", "open_clip.safetensors", "legacy.pt"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / case), str(weight_bytes)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            print(f"{case:24s} peak above baseline: {result['peak_over_base_bytes'] / 2**20:7.0f} MiB = "
                  f"{result['copies']:.2f} copies of the weights (after: {result['anon_copies_after']:.2f} in "
                  f"process memory, {result['file_copies_after']:.2f} file pages)")


if __name__ == "__main__":
    main()
