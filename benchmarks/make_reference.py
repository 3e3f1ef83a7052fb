"""llama.cpp's reference outputs for a model, through llama-cpp-python, in the shape of tests/reference_data.

    python benchmarks/make_reference.py MODEL.gguf NAME [--ppl-chunks N]

writes tests/reference_data/NAME.json and NAME.logits.npz:

- `NAME.json`: `model`, `sha256`; `tokenize` (per line of tokenizer_corpus.txt: `plain` ids, without BOS or
  special parsing, and `bos_special`, with both); `tokenize_whole` (`plain`: the whole corpus); `greedy` (per
  prompt of prompts.json: `prompt_ids`, `top20_ids` / `top20_logits` at the last position, the 64-token greedy
  continuation `greedy64` / `greedy64_text` (ending early with the end-of-text token, kept), and `steps_top8_ids` / `steps_top8_logits`: the top 8 at each of
  the greedy steps, [steps][8], so that no full vocabulary-wide row is kept but the last one);
  `chat` (the chat template rendered for a small conversation); `perplexity` (`n_ctx`, `chunks`, `value`:
  llama-perplexity's rule, the second half of each chunk scored, on gpl-3.txt).
- `NAME.logits.npz`: the full last-position logits for each prompt (`p0`..`p3`), float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference_data"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
STEPS, TOP_LAST, TOP_STEP = 64, 20, 8


def top(row: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    ids = np.argsort(-row, kind="stable")[:k]
    return ids.tolist(), row[ids].astype(float).tolist()


def greedy_case(llm, prompt: str) -> tuple[dict, np.ndarray]:
    """The prompt's last logits, then 64 greedy steps, each step's logits read before its token is fed."""
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    row, tokens, step_ids, step_logits = last, [], [], []
    for _ in range(STEPS):
        i, v = top(row, TOP_STEP)
        step_ids.append(i)
        step_logits.append(v)
        token = int(row.argmax())
        tokens.append(token)
        if token == llm.token_eos():
            break
        llm.eval([token])
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    top_ids, top_logits = top(last, TOP_LAST)
    case = {"prompt": prompt, "prompt_ids": ids, "top20_ids": top_ids, "top20_logits": top_logits,
            "greedy64": tokens, "greedy64_text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
            "steps_top8_ids": step_ids, "steps_top8_logits": step_logits}
    return case, last


def perplexity(llm, text: str, n_ctx: int, max_chunks: int) -> dict:
    """llama-perplexity's rule: chunks of n_ctx tokens (the first set to BOS where the model adds one), each
    scored on its second half."""
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    adds_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    chunks = min(len(tokens) // n_ctx, max_chunks)
    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        batch = [llm.token_bos(), *chunk[1:]] if adds_bos else chunk
        llm.reset()
        llm.eval(batch)
        logits = np.array(llm.scores[:n_ctx], dtype=np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j]
            m = row.max()
            nll += m + math.log(np.exp(row - m).sum()) - row[chunk[j + 1]]
            count += 1
        print(f"  perplexity chunk {c + 1}/{chunks}: {math.exp(nll / count):.4f}", file=sys.stderr)
    return {"n_ctx": n_ctx, "chunks": chunks, "value": round(math.exp(nll / count), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("name", help="file stem under tests/reference_data, e.g. qwen2.5-coder-1.5b-q4_k_m")
    parser.add_argument("--ppl-chunks", type=int, default=4, help="chunks of 512 tokens of gpl-3.txt (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        sys.exit("make_reference.py: needs llama-cpp-python (pip install llama-cpp-python)")
    if not args.model.is_file():
        sys.exit(f"make_reference.py: {args.model}: no such file")

    digest = hashlib.sha256()
    with open(args.model, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    llm = Llama(str(args.model), n_ctx=512, n_batch=512, n_threads=args.threads, logits_all=True, verbose=False)
    corpus = (REFERENCE / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    out = {"model": args.model.name, "sha256": digest.hexdigest(), "tokenize": [
        {"text": line, "plain": llm.tokenize(line.encode(), add_bos=False, special=False),
         "bos_special": llm.tokenize(line.encode(), add_bos=True, special=True)}
        for line in corpus.split("\n")
    ], "tokenize_whole": {"plain": llm.tokenize(corpus.encode(), add_bos=False, special=False)}}

    cases, logits = [], {}
    for i, prompt in enumerate(json.loads((REFERENCE / "prompts.json").read_text())):
        case, last = greedy_case(llm, prompt)
        cases.append(case)
        logits[f"p{i}"] = last
        print(f"  prompt {i}: {case['greedy64_text'][:60]!r}", file=sys.stderr)
    out["greedy"] = cases
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        formatter = Jinja2ChatFormatter(template, eos_token=llm.detokenize([llm.token_eos()]).decode(),
                                        bos_token=llm.detokenize([llm.token_bos()]).decode() if llm.token_bos() >= 0 else "")
        out["chat"] = {"messages": CHAT, "rendered": formatter(messages=CHAT).prompt}
    if args.ppl_chunks:
        out["perplexity"] = perplexity(llm, (REFERENCE / "gpl-3.txt").read_text(encoding="utf-8"), 512, args.ppl_chunks)
    (REFERENCE / f"{args.name}.json").write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE / f"{args.name}.logits.npz", **logits)
    print(f"wrote {REFERENCE / args.name}.json and .logits.npz", file=sys.stderr)


if __name__ == "__main__":
    main()
