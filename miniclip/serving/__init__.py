"""Serving: the towers exported to ONNX (onnx.py) so a service needs only onnxruntime, a tokenizer and PIL;
the embedding command and the search page live in apps/.
"""
