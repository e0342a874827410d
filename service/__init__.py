"""simmim-service's HTTP server: FastAPI + onnxruntime, dynamic batching, no torch.

Layers, one way: routes (app) -> engine (readiness, batchers, thread pools) -> backend
(onnxruntime). The model directory and preprocessing come from simmim_core.
"""
