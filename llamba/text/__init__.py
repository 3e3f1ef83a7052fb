"""Text in and out: the tokenizer (text <-> ids, streaming detokenization), the chat template (messages ->
prompt text), TextStream (tokens -> text: stop strings, held-back tails, finish reasons), OpenAI's shapes
(openai.py) and tool calls (tools.py).

Used by the CLI, the API, the session and the server alike. It may import formats/ (the GGUF metadata it reads),
errors, and generation/constraints.py's Constraint (what response_format and tool calls ask the output to
follow); it knows no model, cache or sampler.
"""
