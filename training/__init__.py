"""Pretraining, evaluation and export of SimMIM encoders (needs torch, timm, onnx)."""
