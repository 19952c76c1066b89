"""Training: the command-line arguments (arguments.py), `ClipTrainer` (trainer.py), its callbacks
(callbacks.py) and tower locking with the two-stage schedule (locking.py).
"""
