"""Entry points: the training run (train.py), evaluation (evaluate.py), the search demo (demo.py,
search_index.py), ablation grids (ablate.py, ablation_report.py), and what they share (cli.py).
"""
