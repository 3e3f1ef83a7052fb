"""`llamba generate`: one-shot text generation."""

from __future__ import annotations

import json

import click

from .common import (decoding_option, format_options, model_options, open_llama, pop_sampling, read_constraint,
                     read_text_option, sampling_options, speed_line)


@click.command()
@model_options
@click.option("-p", "--prompt", help="The prompt (default: standard input).")
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "max_tokens", type=click.IntRange(min=-1), default=128, show_default=True,
              help="Tokens to generate at most (0: none; -1: until the end of text or of the context).")
@click.option("--stop", multiple=True, help="Stop when this text appears (not printed); may be repeated.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message with the chat template.")
@click.option("--special/--no-special", default=True, show_default=True,
              help="Read special tokens written in the prompt (<|im_start|>, <bos>...) as those tokens, as llama-cli "
                   "does; --no-special treats them as plain text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and speeds.")
@format_options
@decoding_option()
@sampling_options
def generate(model, ctx_size, threads, chat_template, kv_type, prompt, path, max_tokens, stop, chat, special, as_json,
             json_schema, grammar_file, regex, decoding, draft, **kwargs) -> None:
    """Continue a prompt and print the text as it is generated."""
    sampling = pop_sampling(kwargs)
    text = read_text_option(prompt, path)
    constraint = read_constraint(json_schema, grammar_file, regex)
    llm = open_llama(model, ctx_size, threads, chat_template, quiet=as_json, kv_type=kv_type, decoding=decoding,
                     draft=draft)
    ids = llm.chat_prompt_ids([{"role": "user", "content": text}]) if chat else llm.tokenize(text, special=special)
    generated, pieces = [], []
    for step in llm.stream_tokens(ids, max_tokens=max_tokens, stop=list(stop), constraint=constraint,
                                  **sampling):
        if step.token >= 0:
            generated.append(step.token)
        pieces.append(step.text)
        if not as_json and step.text:
            click.echo(step.text, nl=False)
    s = llm.last_stats
    if as_json:
        click.echo(json.dumps({
            "prompt_ids": ids, "ids": generated, "text": "".join(pieces), "finish_reason": s.finish_reason,
            "prompt_tok_per_s": round(s.prompt_tok_per_s, 2), "gen_tok_per_s": round(s.gen_tok_per_s, 2),
            "time_to_first_token_s": round(s.time_to_first_token, 4), "tokens_per_step": round(s.tokens_per_step, 3),
        }, ensure_ascii=False))
    else:
        click.echo()
        click.echo(f"[{speed_line(s)}, {s.finish_reason}]", err=True)


COMMANDS = [generate]
