"""Small helpers the commands share."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LlambaError


def read_text_option(text: str | None, path: str | None) -> str:
    """The text from -p, or from -f FILE, or from standard input when neither is given (and it is piped)."""
    if text is not None and path is not None:
        raise LlambaError("give the text with -p or -f, not both")
    if text is not None:
        return text
    if path is not None:
        return _read_file(path, "text")
    if sys.stdin is None or sys.stdin.isatty():
        raise LlambaError("no text: give -p TEXT, -f FILE, or pipe text to standard input")
    return sys.stdin.read()


def status_line():
    """One line on a terminal, rewritten in place (None when standard error is not a terminal)."""
    import click

    if sys.stderr is None or not sys.stderr.isatty():
        return None
    return lambda line: click.echo(f"\r{line}\033[K", nl=False, err=True)


def sampling_options(fn):
    """The sampling flags `generate` and `chat` share, one per field of SamplingParams (llama.cpp's names and
    defaults). Whole numbers are range-checked by click (a usage error, as for -t, -c, -n); decimals by
    SamplingParams.validate, which also refuses NaN."""
    import click

    from ..generation.sampling import OPTIONS, cli_flag, option_type

    for option in reversed(OPTIONS):
        kind = option_type(option)
        if kind is int:
            kind = _int_range(option.metadata["bounds"])
        fn = click.option(cli_flag(option), option.name, type=kind, default=option.default,
                          show_default=option.default is not None, help=option.metadata["help"])(fn)
    return fn


def format_options(fn):
    """--json-schema, --grammar, --regex: what the output must follow (llama.cpp's flags)."""
    import click

    fn = click.option("--regex", default=None, metavar="PATTERN",
                      help="The output matches this regular expression.")(fn)
    fn = click.option("--grammar", "grammar_file", default=None, metavar="FILE",
                      help="The output follows this GBNF grammar (llama.cpp's format).")(fn)
    return click.option("--json-schema", default=None, metavar="FILE|JSON",
                        help="The output is JSON that follows this schema (a file, or the schema itself).")(fn)


def read_constraint(json_schema: str | None, grammar_file: str | None, regex: str | None):
    """The Constraint the format flags ask for (None without any); files are read here."""
    from ..generation.constraints import constraint_from

    if json_schema is not None and not json_schema.lstrip().startswith("{"):
        json_schema = _read_file(json_schema, "JSON schema")
    grammar = _read_file(grammar_file, "grammar") if grammar_file is not None else None
    return constraint_from(json_schema=json_schema, grammar=grammar, regex=regex)


def _read_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise LlambaError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError:
        raise LlambaError(f"{path}: the {what} is not UTF-8 text") from None


def _int_range(bounds: dict):
    import click

    low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else None)
    high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else None)
    return click.IntRange(low, high)


def pop_sampling(kwargs: dict) -> dict:
    """Take the sampling options out of a command's keyword arguments."""
    from ..generation.sampling import OPTIONS

    return {option.name: kwargs.pop(option.name) for option in OPTIONS}


def decoding_option(default: str | None = None, note: str = "draft:MODEL takes a smaller GGUF with the same vocabulary",
                    with_draft: bool = True):
    """--decoding: how generation guesses ahead (the output is the same; only the speed changes); --draft: the
    draft model auto asks where nothing can be copied (set it once in LLAMBA_DRAFT)."""
    import click

    from ..api import DRAFT_ENV
    from ..generation.decoding import DECODERS, DEFAULT_DECODING

    decoding = click.option("--decoding", default=default or DEFAULT_DECODING, show_default=True, metavar="NAME",
                            help=f"Guess ahead and verify in one batch: {' | '.join(DECODERS)} ({note}).")
    draft = click.option("--draft", metavar="MODEL",
                         help="A smaller model with the same vocabulary that auto asks for guesses where nothing "
                              f"can be copied (qwen2.5-coder-0.5b for the 1.5B); 'none': copying only. Default: "
                              f"${DRAFT_ENV}, where it shares the model's vocabulary.")
    return (lambda fn: decoding(draft(fn))) if with_draft else decoding


def speed_line(s) -> str:
    """The statistics after a generation: tokens, speeds, and tokens per step when guessing ahead."""
    line = f"{s.generated_tokens} tokens, prompt {s.prompt_tok_per_s:.1f} tok/s, generation {s.gen_tok_per_s:.1f} tok/s"
    if s.speculation is not None and s.speculation.steps:
        line += f", {s.tokens_per_step:.2f} tokens per step"
    return line


def model_options(fn):
    """MODEL argument (optional: the default model) with --ctx-size, --threads and --chat-template."""
    import click

    from ..memory.kv_cache import KV_TYPES

    fn = click.option("--kv-type", type=click.Choice(KV_TYPES), default="f32", show_default=True,
                      help="KV cache type: f16 halves its memory, q8_0 and q4_0 store blocks of 8 or 4 bits.")(fn)
    fn = click.option("--chat-template", default=None,
                      help="A template file or a built-in style (chatml, llama2, llama3, mistral, gemma).")(fn)
    fn = click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="Threads (default: every core).")(fn)
    fn = click.option("-c", "--ctx-size", type=click.IntRange(min=0), default=None,
                      help="Context length (default: the model's, at most 4096; 0: the model's whole context).")(fn)
    return click.argument("model", required=False)(fn)


def open_llama(model, ctx_size, threads, chat_template, quiet: bool = False, kv_type: str = "f32",
               decoding: str | None = None, draft: str | None = None):
    """Load a model for a command, telling the user about downloads and first-run kernel compilation."""
    import click

    from ..api import Llama
    from ..compiling import kernels_compiled

    say = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    fresh = not kernels_compiled()
    with _Progress("compiling kernels, first run only", enabled=fresh and not quiet) as progress:
        llm = Llama(model, n_ctx=ctx_size, n_threads=threads, chat_template=chat_template, kv_type=kv_type,
                    on_status=say, decoding=decoding, draft_model=draft)  # compiles the kernels on the first run
    if fresh:
        say(f"kernels compiled in {progress.elapsed:.1f} s")
    return llm


class _Progress:
    """A ticking 'doing X... N s' line on a terminal while something slow runs (nothing when piped)."""

    def __init__(self, label: str, enabled: bool):
        import threading

        self.label = label
        self.enabled = enabled
        self.elapsed = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> "_Progress":
        import time

        self._started = time.perf_counter()
        if self.enabled:
            if sys.stderr.isatty():
                self._thread.start()
            else:
                print(f"{self.label}...", file=sys.stderr, flush=True)
        return self

    def _tick(self) -> None:
        import time

        while not self._done.wait(0.5):
            print(f"\r{self.label}... {time.perf_counter() - self._started:.0f} s", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        import time

        self.elapsed = time.perf_counter() - self._started
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
            print("\r\033[K", end="", file=sys.stderr, flush=True)
