"""What the model remembers between forward passes: the Batch (tokens, positions, sequences, which rows want
logits), the KV cache of cells behind a per-layer view (`cache.layer(i)` gives a LayerKV that attention writes
and attends through), and Sequence (the tokens one sequence of a cache holds: the only record of them).

Below models/: it may import ops/ (the attention kernels a view calls) and errors, and knows no model, sampler
or text.
"""
