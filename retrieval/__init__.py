"""Bulk embedding, a vector database and search: the service's model as a retrieval backend.

    image files ──► simmim embed (Ray Data, onnxruntime) ──► vectors.parquet
    vectors.parquet ──► simmim index ──► Milvus (Lite: a local .db; or a server / cluster)
    query images ──► service or local model ──► simmim search ──► Milvus ──► neighbours

Torch-free: it uses simmim_core's preprocessing and model directory, the service's onnxruntime
backend (service.backend, nothing else of the service) and simmim_client for a running service.
"""
