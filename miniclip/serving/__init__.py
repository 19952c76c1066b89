"""Serving a trained model without PyTorch: ONNX graphs of the two towers (onnx.py) and the runtime that runs them."""
