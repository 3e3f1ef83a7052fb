"""Text in and out: the tokenizer (text <-> ids, streaming detokenization) and the chat template (messages ->
prompt text).

Used by the CLI, the API, the session and the server alike. It may import formats/ (the GGUF metadata it reads)
and errors; it knows no model, cache or sampler.
"""
