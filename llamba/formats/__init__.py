"""File formats: the GGUF reader (mmapped, zero-copy tensor views) and writer's types, typed metadata reads, the
GGML type table, NumPy block formats (quantize / dequantize) and Hugging Face checkpoints.

The bottom room: it imports errors only, and knows no model, kernel or text.
"""
