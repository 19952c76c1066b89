r"""Search demo speed: index build time for a caption set (cold, no cache), the restart time (index loaded from the
cache), and median text / image query latency through `Searcher` (tokenize + encode + exact top-k), per model config
with random weights (speed does not depend on the weights).

    python bench/demo_search.py --data ../shared/data/flickr8k/en_val.json \
        --configs tiny-vit TinyCLIP-ViT-40M-32-Text-19M
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from miniclip.apps.demo import Searcher  # noqa: E402
from miniclip.model import MiniClip  # noqa: E402
from miniclip.apps.search_index import build_index, read_image_set  # noqa: E402
from miniclip.evaluation.encode import Encoder  # noqa: E402
from miniclip.tokenizer import get_tokenizer  # noqa: E402
from miniclip.transforms import image_transform  # noqa: E402

QUERIES = ["a dog runs across the grass", "two children playing on a skateboard", "a man climbing a snowy mountain",
           "a group of people outside a building", "a black and white dog jumps over a hurdle", "a cat on a sofa"]


def median_ms(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_config(name: str, data: str, batch_size: int, repeats: int, k: int) -> dict:
    torch.manual_seed(0)
    model = MiniClip(name).eval()
    image_set = read_image_set(data)
    with tempfile.TemporaryDirectory() as cache:
        encoder = Encoder(model, image_transform(model.config), get_tokenizer(model.config), image_batch_size=batch_size)
        built = build_index(encoder, image_set, cache)
        encoder.progress = False
        loaded = build_index(encoder, image_set, cache)
    assert not built.from_cache and loaded.from_cache
    searcher = Searcher(encoder, loaded)
    searcher.text_search(QUERIES[0], k)  # warm-up
    text_ms = median_ms(lambda i: searcher.text_search(QUERIES[i % len(QUERIES)], k), repeats)
    images = [str(p) for p in loaded.images]
    image_ms = median_ms(lambda i: searcher.image_search(images[i * 37 % len(images)], k), repeats)
    return {"config": name, "images": len(loaded), "build_s": built.seconds, "restart_s": loaded.seconds,
            "text_query_ms": text_ms, "image_query_ms": image_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="caption file or image folder")
    parser.add_argument("--configs", nargs="+", default=["tiny-vit"], help="model config names")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="queries timed per kind")
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    rows = [bench_config(name, args.data, args.batch_size, args.repeats, args.k) for name in args.configs]
    print(f"\ntorch threads {torch.get_num_threads()}, k={args.k}, {args.repeats} queries each (median)")
    print("| config | images | index build (s) | restart, cached (s) | text query (ms) | image query (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['images']} | {r['build_s']:.1f} | {r['restart_s']:.2f} | "
              f"{r['text_query_ms']:.1f} | {r['image_query_ms']:.1f} |")


if __name__ == "__main__":
    main()
