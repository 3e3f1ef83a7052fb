"""Turning logits into tokens: SamplingParams (the one schema of sampling options) and the sampler chain
(sampling.py), the grammar mask stage on llguidance (constraints.py), the decoders that guess ahead and check
their guesses in one batch (decoding/), the token loop (generate.py), perplexity
(perplexity.py) and embeddings (embedding.py: final hidden states pooled).

Above models/ and memory/: it builds batches, calls `model.forward`, reads logits, and may import memory and
errors. It knows no file format and no text (a grammar sees the vocabulary as the bytes text/ hands it): the token loop hands its tokens to a text sink its caller gives
it (text/'s TextStream), as mlx-lm keeps generate_step apart from stream_generate.
"""
