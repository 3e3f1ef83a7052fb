"""Text in and out: the tokenizer (text <-> ids, streaming detokenization), the chat template (messages ->
prompt text) and TextStream (tokens -> text: stop strings, held-back tails, finish reasons).

Used by the CLI, the API, the session and the server alike. It may import formats/ (the GGUF metadata it reads)
and errors; it knows no model, cache or sampler.
"""
