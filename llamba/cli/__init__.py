"""The `llamba` command: a click group whose subcommands live one per file in this package.

The top room: it wires and prints. It may import anything below (the API, session, server, store, text,
generation for the sampling options); commands import their heavy parts lazily to keep start-up light.
"""

from __future__ import annotations

import sys

import click

from ..errors import LlambaError


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlambaError as e:
            click.echo(f"llamba: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\nllamba: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamba")
def main() -> None:
    """llamba: run GGUF language models on the CPU, from Python."""


def _register() -> None:
    from . import bench, chat, convert_cmd, generate, info, perplexity_cmd, serve, store_commands, tokenize_cmd

    for module in (chat, generate, serve, info, store_commands, tokenize_cmd, perplexity_cmd, bench, convert_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
