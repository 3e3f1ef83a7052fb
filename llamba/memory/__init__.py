"""What the model remembers between forward passes: the Batch (tokens, positions, sequences, which rows want
logits) and the KV cache of cells behind a per-layer view (kv_cache.LayerKV).

Below models/: it may import ops/ (the attention kernels a view calls) and errors, and knows no model, sampler
or text.
"""
