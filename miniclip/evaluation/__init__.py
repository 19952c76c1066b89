"""Evaluation: batched encoding (encode.py: `Encoder`), retrieval and zero-shot metrics (metrics.py,
zeroshot.py), the feature cache (feature_cache.py) and the PNGs (plots.py).
"""
