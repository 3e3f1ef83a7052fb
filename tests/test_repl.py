"""The chat REPL driven as a person would, in a real pseudo-terminal."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

PROMPT = ">>> "


@pytest.fixture()
def repl(smollm2_path, tmp_path):
    env = {"LLAMBA_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    if "PYTHONPATH" in os.environ:  # the llamba under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    child = pexpect.spawn(sys.executable, ["-m", "llamba", "chat", str(smollm2_path), "--temp", "0", "-n", "24"],
                          env=env, encoding="utf-8", timeout=120, cwd=str(tmp_path), dimensions=(40, 200))
    child.expect_exact(PROMPT)
    yield child, tmp_path
    child.close(force=True)


def test_chat_streams_answers_with_stats(repl):
    child, _ = repl
    child.sendline("Tell me the capital of France.")
    child.expect(r"Paris")
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s, [\d.]+ tokens per step, first token after [\d.]+ s")  # auto guesses
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect("statistics off")


def test_ctrl_c_stops_an_answer_and_ctrl_d_leaves(repl):
    child, _ = repl
    child.sendline("/set max_tokens 400")
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("dragon.")  # the echo of the input
    child.expect(r"\n.*\w+ \w+ \w+")  # the answer has started streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    child.sendline("/show")
    child.expect(r"history\s+2 messages")  # the partial answer is kept
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_commands_multiline_save_load(repl):
    child, tmp = repl
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.sendline("/set temp hot")
    child.expect("temp needs a number")
    child.sendline("/system You answer in one word.")
    child.expect("system prompt set")
    child.sendline('"""')
    child.sendline("Name a colour")
    child.sendline("of the sky.")
    child.sendline('"""')
    child.expect(r"\[\d+ tokens")
    child.sendline("/save saved.json")
    child.expect("saved to")
    assert (tmp / "saved.json").is_file()
    child.sendline("/reset")
    child.expect("forgotten")
    child.sendline("/load saved.json")
    child.expect("loaded 2 messages")
    child.sendline("/load missing.json")
    child.expect("error: .*missing.json: cannot read")
    child.sendline("/regen")
    child.expect(r"\[\d+ tokens")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_double_ctrl_c_at_the_prompt_exits_and_history_is_kept(repl):
    child, tmp = repl
    child.sendline("/help")
    child.expect("/regen")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect("Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    assert (tmp / "home" / "chat_history").read_text().strip().endswith("/help")


def test_pasted_lines_are_one_message(repl):
    child, _ = repl
    child.send("Summarise this list:\napples\npears\n")  # one write, as a paste arrives
    child.expect(r"\[\d+ tokens")
    child.expect_exact(PROMPT)
    child.sendline("/show")
    child.expect(r"history\s+2 messages")


def test_format_switches_constrained_answers_on_and_off(repl):
    """/format regex constrains the next answers (checked against the vocabulary when set), /format off frees
    them again; a bad pattern is an error line, not a crash."""
    child, _ = repl
    child.sendline("/format regex [a-")
    child.expect(r"invalid regular expression")
    child.expect_exact(PROMPT)
    child.sendline("/format regex (yes|no), [0-9]{3}")
    child.expect("format: regular expression")
    child.expect_exact(PROMPT)
    child.sendline("Is the sky blue?")
    child.expect(r"\r\n(yes|no), [0-9]{3}\r\n")
    child.expect_exact(PROMPT)
    child.sendline("/show")
    child.expect(r"format\s+regular expression")
    child.expect_exact(PROMPT)
    child.sendline("/format off")
    child.expect("free text")
    child.expect_exact(PROMPT)
    child.sendline("/format json")
    child.expect("format: JSON schema")
