"""simmim-service: the HTTP service (FastAPI + onnxruntime) and the torch-free pieces shared with
training: image preprocessing (`service.preprocess`) and the model directory (`service.model_dir`).
Importing this package imports nothing heavy."""
