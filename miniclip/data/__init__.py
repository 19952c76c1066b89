"""Data: caption files -> `CaptionRecord`s (captions.py), the training `ClipDataset` and `ClipCollator`
(dataset.py), and the embedded synthetic caption set of the default run (synthetic.py).
"""
