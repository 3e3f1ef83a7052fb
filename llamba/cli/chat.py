"""`llamba chat`: the streaming chat REPL."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import LlambaError
from ..store import llamba_home
from .common import (decoding_option, format_options, model_options, open_llama, pop_sampling, read_constraint,
                     sampling_options)

HELP = """commands:
  /help                 this list
  /exit                 leave (Ctrl-D too)
  /reset                forget the conversation
  /system TEXT          set the system prompt (and reset)
  /set KEY VALUE        change a setting (keys below)
  /show                 the model and the settings
  /save FILE [--kv]     save the conversation (and the KV cache with --kv)
  /load FILE            load a saved conversation
  /regen                answer the last message again
  /stats                show or hide the line of statistics after each answer
  /format [KIND ARG]    constrain the answers: json (any object), json-schema FILE|JSON, grammar FILE (GBNF),
                        regex PATTERN; /format off for free text again; /format alone shows the current one
input: type and press Enter (a pasted block of lines is one message); a line of three double quotes starts
and ends a multi-line block;
a line ending in a backslash continues on the next; Ctrl-C stops an answer.
settings (/set KEY VALUE):
{settings}"""


class Repl:
    def __init__(self, session, show_stats: bool = True):
        self.session = session
        self.show_stats = show_stats
        self.color = sys.stdout.isatty()

    # ------------------------------------------------------------------------------- output

    def style(self, text: str, **kw) -> str:
        return click.style(text, **kw) if self.color else text

    def info(self, text: str) -> None:
        click.echo(self.style(text, dim=True))

    def error(self, text: str) -> None:
        click.echo(self.style(f"error: {text}", fg="red"))

    # ------------------------------------------------------------------------------- input

    def read_message(self) -> str | None:
        """One message from the user (multi-line aware); None at end of input."""
        prompt = self.style(">>> ", fg="green", bold=True) if self.color else ">>> "
        line = input(prompt)
        if line.strip() == '"""':
            lines = []
            while True:
                more = input("... ")
                if more.strip() == '"""':
                    return "\n".join(lines)
                lines.append(more)
        lines = [line] + self._pasted_lines()
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    def _pasted_lines(self) -> list[str]:
        """Lines already waiting on a terminal right after Enter: a paste of several lines is one message."""
        if not sys.stdin.isatty():
            return []
        import select

        lines = []
        while select.select([sys.stdin], [], [], 0.05)[0]:
            try:
                lines.append(input(""))
            except EOFError:
                break
        return lines

    def run(self) -> None:
        self.info(f"llamba chat with {self.session.llm.model_path.name}: /help for commands, Ctrl-D to leave")
        interrupts = 0
        while True:
            try:
                text = self.read_message()
                interrupts = 0
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    click.echo()
                    return
                click.echo()
                self.info("(Ctrl-C again or Ctrl-D to leave)")
                continue
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if self.command(text) == "exit":
                        return
                else:
                    self.stream(self.session.send(text))
            except LlambaError as e:
                self.error(str(e))

    # ------------------------------------------------------------------------------- answers

    def stream(self, steps) -> None:
        try:
            for step in steps:
                if step.text:
                    click.echo(step.text, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            steps.close()
            click.echo()
            self.info("[interrupted]")
            return
        click.echo()
        s = self.session.llm.last_stats
        if self.show_stats:
            per_step = f", {s.tokens_per_step:.2f} tokens per step" if s.speculation is not None else ""
            self.info(f"[{s.generated_tokens} tokens, {s.gen_tok_per_s:.1f} tok/s{per_step}, first token after "
                      f"{s.time_to_first_token:.2f} s, {s.evaluated_prompt_tokens} prompt tokens evaluated]")

    # ------------------------------------------------------------------------------- commands

    def command(self, text: str) -> str | None:
        name, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        session = self.session
        if name in ("exit", "quit", "bye"):
            return "exit"
        if name == "help":
            from ..session import settings_help

            click.echo(HELP.replace("{settings}", settings_help()))
        elif name == "reset":
            session.reset()
            self.info("conversation forgotten")
        elif name == "system":
            session.system = arg or None
            session.reset()
            self.info("system prompt set; conversation reset" if arg else "system prompt cleared; conversation reset")
        elif name == "set":
            key, _, value = arg.partition(" ")
            if not key or not value.strip():
                raise LlambaError("usage: /set KEY VALUE (for example /set temp 0.2)")
            session.settings.set(key, value.strip())
            self.info(f"{key} = {value.strip()}")
        elif name == "show":
            self.show()
        elif name == "save":
            parts = arg.split()
            if not parts:
                raise LlambaError("usage: /save FILE [--kv]")
            path = session.save(parts[0], with_kv="--kv" in parts[1:])
            self.info(f"saved to {path}")
        elif name == "load":
            if not arg:
                raise LlambaError("usage: /load FILE")
            session.load(arg)
            self.info(f"loaded {len(session.messages)} messages from {arg}")
        elif name == "regen":
            self.stream(session.regenerate())
        elif name == "format":
            self.set_format(arg)
        elif name == "stats":
            self.show_stats = not self.show_stats
            self.info(f"statistics {'on' if self.show_stats else 'off'}")
        else:
            raise LlambaError(f"unknown command /{name}: /help lists the commands")
        return None

    def set_format(self, arg: str) -> None:
        """/format: switch the answers' constraint (checked against the vocabulary now, not at the next answer)."""
        settings = self.session.settings
        kind, _, value = arg.partition(" ")
        value = value.strip()
        if not kind:
            current = settings.format
            self.info(f"format: {current.label if current else 'free text'}")
            return
        if kind == "off":
            settings.format = None
            self.info("format off: free text")
            return
        if kind == "json":
            constraint = read_constraint('{"type": "object"}', None, None)
        elif kind in ("json-schema", "grammar", "regex") and value:
            constraint = read_constraint(value if kind == "json-schema" else None,
                                         value if kind == "grammar" else None, value if kind == "regex" else None)
        else:
            raise LlambaError("usage: /format json | json-schema FILE|JSON | grammar FILE | regex PATTERN | off")
        self.session.llm.sampler(constraint)  # an invalid schema or grammar fails here
        settings.format = constraint
        self.info(f"format: {constraint.label}")

    def show(self) -> None:
        llm, s = self.session.llm, self.session.settings
        hp = llm.model.hp
        click.echo(f"model      {llm.model_path}")
        click.echo(f"family     {hp.arch}, {hp.n_layer} layers, context {llm.n_ctx}, {llm.n_threads} threads")
        click.echo(f"template   {llm.template.name}")
        click.echo(f"system     {self.session.system or '(none)'}")
        sampling = ", ".join(f"{k}={v}" for k, v in asdict(s.sampling).items() if k != "logit_bias")
        click.echo(f"sampling   {sampling}, max_tokens={s.max_tokens}")
        click.echo(f"format     {s.format.label if s.format else 'free text'}")
        click.echo(f"history    {len(self.session.messages)} messages, {llm.cache.n_past} tokens in the cache")


def _history_file() -> Path:
    return llamba_home() / "chat_history"


def _setup_readline() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        return
    path = _history_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(2000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


@click.command()
@model_options
@click.option("-s", "--system", default=None, help="System prompt.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Longest answer in tokens.")
@click.option("--overflow", type=click.Choice(["shift", "stop"]), default="shift", show_default=True,
              help="When the context fills: drop the oldest exchanges (shift) or refuse (stop).")
@click.option("--no-stats", is_flag=True, help="Hide the statistics line after each answer.")
@format_options
@decoding_option()
@sampling_options
def chat(model, ctx_size, threads, chat_template, kv_type, system, max_tokens, overflow, no_stats, json_schema,
         grammar_file, regex, decoding, draft, **kwargs) -> None:
    """Chat with MODEL (default: smollm2-135m) in the terminal, answers streaming as they come."""
    from ..generation.sampling import SamplingParams
    from ..session import ChatSession, ChatSettings

    sampling = SamplingParams(**pop_sampling(kwargs)).validate()
    constraint = read_constraint(json_schema, grammar_file, regex)
    llm = open_llama(model, ctx_size, threads, chat_template, kv_type=kv_type, decoding=decoding, draft=draft)
    if constraint is not None:
        llm.sampler(constraint)  # an invalid schema or grammar fails before the first message
    repl = Repl(None, show_stats=not no_stats)
    settings = ChatSettings(sampling=sampling, max_tokens=max_tokens, overflow=overflow, format=constraint)
    repl.session = ChatSession(llm, system=system, settings=settings, notify=repl.info)
    if sys.stdin.isatty():
        _setup_readline()
    repl.run()


COMMANDS = [chat]
