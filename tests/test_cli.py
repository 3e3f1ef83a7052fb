"""The command line: outputs, JSON for scripts, and one-line errors with exit status 1 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import load_reference


def llamba(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "llamba", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


def assert_one_line_error(result, fragment: str):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llamba: error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_info_json(smollm2_path):
    out = json.loads(llamba("info", smollm2_path, "--json").stdout)
    assert out["architecture"] == "llama" and out["vocab_size"] == 49152 and out["chat_template"] is True
    assert out["file_type"] == "Q4_1" and len(out["tensors"]) == 272


def test_info_errors(tmp_path):
    assert_one_line_error(llamba("info", tmp_path / "missing.gguf"), "no such file")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    assert_one_line_error(llamba("info", junk), "not a GGUF file")


def test_truncated_model_is_a_clear_error(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    assert_one_line_error(llamba("generate", cut, "-p", "hi"), "past the end of the file")


def test_tokenize_json_matches_reference(smollm2_path, reference_dir):
    case = load_reference(reference_dir, "smollm2-135m")["tokenize"][3]
    out = llamba("tokenize", smollm2_path, "-p", case["text"], "--json", "--no-bos")
    assert json.loads(out.stdout) == case["plain"]


def test_generate_json(smollm2_path):
    out = llamba("generate", smollm2_path, "-p", "The capital of France is", "-n", "8", "--temp", "0", "--json")
    data = json.loads(out.stdout)
    assert data["prompt_ids"] == [504, 3575, 282, 4649, 314]
    assert len(data["ids"]) == 8 and data["text"].startswith(" Paris")
    assert data["gen_tok_per_s"] > 0 and data["prompt_tok_per_s"] > 0


def test_a_draft_model_of_another_vocabulary(smollm2_path, gemma3_path, monkeypatch):
    """--draft of another vocabulary is a one-line error; the same model set once in LLAMBA_DRAFT (a default for
    every model) is left out with a note, and the answer is the same."""
    args = ("generate", smollm2_path, "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert_one_line_error(llamba(*args, "--draft", gemma3_path), "must share the vocabulary")
    plain = llamba(*args, "--draft", "none")
    monkeypatch.setenv("LLAMBA_DRAFT", str(gemma3_path))
    configured = llamba(*args)
    assert configured.returncode == 0 and configured.stdout == plain.stdout and "Paris" in plain.stdout
    assert "LLAMBA_DRAFT" in configured.stderr and "copying only" in configured.stderr


def test_generate_reads_stdin(smollm2_path):
    out = llamba("generate", smollm2_path, "-n", "4", "--temp", "0", stdin="The capital of France is")
    assert out.returncode == 0 and "Paris" in out.stdout


@pytest.mark.parametrize("flag,value,fragment", [
    ("--temp", "-1", "temperature"), ("--top-p", "2", "top_p"), ("--min-p", "1.5", "min_p"),
])
def test_bad_sampling_values(smollm2_path, flag, value, fragment):
    assert_one_line_error(llamba("generate", smollm2_path, "-p", "hi", flag, value), fragment)


def test_unknown_model_name():
    assert_one_line_error(llamba("info", "no-such-model"), "not a known model name")
    assert_one_line_error(llamba("pull", "no-such-model"), "unknown model")


def test_perplexity_json(smollm2_path, reference_dir):
    out = llamba("perplexity", smollm2_path, "-f", reference_dir / "gpl-3.txt", "--chunks", "1", "--json")
    data = json.loads(out.stdout)
    assert data["chunks"] == 1 and 5 < data["ppl"] < 40


def test_bench_json(smollm2_path):
    data = json.loads(llamba("bench", smollm2_path, "-p", "16", "-n", "4", "-r", "1", "--json").stdout)
    tests = {r["test"] for r in data["results"]}
    assert tests == {"pp16", "tg4"} and all(r["mean"] > 0 for r in data["results"])


def test_list_shows_the_store():
    out = llamba("list")
    assert out.returncode == 0 and "smollm2-135m" in out.stdout


def test_tokenize_works_on_a_vocabulary_only_file(tmp_path):
    from tests.tiny_vocab import write_spm_vocab

    path = write_spm_vocab(tmp_path / "vocab.gguf")
    out = llamba("tokenize", path, "-p", "hello wörld", "--json")
    assert json.loads(out.stdout) == [1, 271, 259, 264, 3 + 0xC3, 3 + 0xB6, 265, 262, 266]
    assert json.loads(llamba("tokenize", path, "-p", "hello", "--json", "--no-bos").stdout) == [271]
