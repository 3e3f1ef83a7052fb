"""Turning logits into tokens: the sampler (sampling.py), the decoders that guess ahead and check their guesses
in one batch (decoding/), the token loop (generate.py) and perplexity (perplexity.py).

Above models/ and memory/: it builds batches, calls `model.forward`, reads logits. It knows no file format, and
no text beyond what the tokenizer it is handed says.
"""
