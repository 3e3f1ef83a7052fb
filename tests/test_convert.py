"""Converting Hugging Face checkpoints to GGUF, requantizing GGUF, exporting GGUF back.

Tiny random checkpoints of every supported class, with a BPE or a SentencePiece tokenizer trained by the real
libraries: the converted file's logits against a Hugging Face-convention NumPy forward of the checkpoint's
own tensors, and its tokenizer against the library that trained it. Quantized conversions against
`gguf.quants` byte for byte. The real models go out and back in."""

from __future__ import annotations

import errno
import json
import warnings

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType

from llamba.cli import main
from llamba.convert import convert, export, requantize
from llamba.convert.vocab import identify_pre
from llamba.errors import LlambaError, UnsupportedError
from llamba.formats.ggml_types import ggml_type
from llamba.formats.gguf import open_gguf
from llamba.formats.hf import HFCheckpoint
from llamba.formats.quants import dequantize
from llamba.models import load_transformer
from llamba.memory.kv_cache import KVCache
from llamba.text.tokenizer import Tokenizer
from tests.hf_checkpoints import CORPUS, MODELS, hf_forward, write_checkpoint

IDS = [5, 17, 99, 0, 42, 42, 7, 123, 250, 3, 88]  # longer than the tiny Gemma's window of 4
TEXTS = CORPUS[:4] + ["  leading spaces, 99 bottles\n\nand a new line", "emoji 🦙 and <|im_end|> inside"]


def _logits(path, ids):
    model = load_transformer(path)
    return model.forward_tokens(ids, 0, KVCache.for_model(model.hp, 64, kv_type="f32"), all_logits=True)


def _checkpoint_tensors(folder):
    checkpoint = HFCheckpoint(folder)
    return {name: checkpoint.read(entry) for name, entry in checkpoint.tensors.items()}, checkpoint.text_config()


@pytest.mark.parametrize("model_class", list(MODELS))
@pytest.mark.parametrize("tokenizer", ["bpe", "spm"])
def test_converted_model_matches_the_checkpoint(tmp_path, model_class, tokenizer):
    folder = write_checkpoint(tmp_path / "hf", model_class, tokenizer)
    out = convert(folder, tmp_path / "model.gguf", "f32")
    tensors, config = _checkpoint_tensors(folder)
    expected = hf_forward(tensors, config, MODELS[model_class][0], IDS)
    ours = _logits(out, IDS)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4


def test_partial_rotary_phi3(tmp_path):
    """Phi-4-mini's layout: RoPE over the first three quarters of each head, the output tied."""
    folder = write_checkpoint(tmp_path / "hf", "Phi3ForCausalLM", partial_rotary_factor=0.75, tie_word_embeddings=True)
    out = convert(folder, tmp_path / "model.gguf", "f32")
    assert open_gguf(out).get("phi3.rope.dimension_count") == 12
    tensors, config = _checkpoint_tensors(folder)
    expected = hf_forward(tensors, config, "phi3", IDS)
    assert np.abs(_logits(out, IDS) - expected).max() / np.abs(expected).max() < 1e-4


def test_gemma3_inside_its_multimodal_wrapper(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", "Gemma3ForCausalLM", "spm", wrapped=True)
    out = convert(folder, tmp_path / "model.gguf", "f32")
    assert "vision" not in " ".join(open_gguf(out).tensors)
    tensors, config = _checkpoint_tensors(folder)
    plain = {k.removeprefix("language_model."): v for k, v in tensors.items() if k.startswith("language_model.")}
    expected = hf_forward(plain, config, "gemma3", IDS)
    assert np.abs(_logits(out, IDS) - expected).max() / np.abs(expected).max() < 1e-4


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # short, so the tiny model's dimensions span all three bands
    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM", rope_scaling=scaling, rope_theta=500000.0)
    out = convert(folder, tmp_path / "model.gguf", "f32")
    assert open_gguf(out).tensors["rope_freqs.weight"].shape == (8,)
    ids = list(range(3, 60))  # positions far enough for the slow dimensions to matter
    tensors, config = _checkpoint_tensors(folder)
    expected = hf_forward(tensors, config, "llama", ids)
    assert np.abs(_logits(out, ids) - expected).max() / np.abs(expected).max() < 1e-4
    code, output = _cli("export", out, tmp_path / "back")
    assert code == 1 and "rope_freqs" in output


def test_bf16_and_f16_checkpoints_convert(tmp_path):
    import ml_dtypes

    for dtype in (np.float16, ml_dtypes.bfloat16):
        folder = write_checkpoint(tmp_path / np.dtype(dtype).name, "LlamaForCausalLM", dtype=dtype)
        tensors, config = _checkpoint_tensors(folder)  # the values as stored, widened
        expected = hf_forward(tensors, config, "llama", IDS)
        out = convert(folder, tmp_path / f"{np.dtype(dtype).name}.gguf", "f32")
        assert np.abs(_logits(out, IDS) - expected).max() / np.abs(expected).max() < 1e-4


def test_bpe_vocabulary_tokenizes_as_the_tokenizers_package(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    folder = write_checkpoint(tmp_path / "hf", "Qwen2ForCausalLM", "bpe")
    g = open_gguf(convert(folder, tmp_path / "model.gguf", "f16"))
    assert g.metadata["tokenizer.ggml.pre"] == "smollm"  # named by its definition: a tiny vocabulary has no known hash
    ours, theirs = Tokenizer(g.metadata), HFTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_special=False, parse_special=True) == theirs.encode(text).ids, text
    assert g.metadata["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert ours.token_type[ours.token_to_id["<|im_end|>"]] == 3  # control
    assert g.metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{len(ours.tokens) - 1}]"


def test_spm_vocabulary_tokenizes_as_sentencepiece(tmp_path):
    import sentencepiece as spm

    folder = write_checkpoint(tmp_path / "hf", "Gemma3ForCausalLM", "spm")
    g = open_gguf(convert(folder, tmp_path / "model.gguf", "f16"))
    ours = Tokenizer(g.metadata)
    theirs = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in TEXTS:
        assert ours.encode(text, add_special=False) == theirs.encode(text), text
    assert ours.bos_id == theirs.bos_id() and ours.add_bos
    assert ours.token_type[ours.token_to_id["<start_of_turn>"]] == 4  # user-defined


@pytest.mark.parametrize("output_type", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_conversion_is_byte_identical_to_gguf_quants(tmp_path, output_type):
    folder = write_checkpoint(tmp_path / "hf", "Qwen3ForCausalLM")
    out = open_gguf(convert(folder, tmp_path / "model.gguf", output_type))
    f32 = open_gguf(convert(folder, tmp_path / "f32.gguf", "f32"))  # the weights as GGUF lays them out
    qtype = GGMLQuantizationType[output_type.upper()]
    checked = 0
    for name, info in out.tensors.items():
        if len(info.shape) == 1:
            assert info.type.name == "F32"
            continue
        assert info.type.name == output_type.upper(), name
        expected = gguf.quants.quantize(np.asarray(f32.tensors[name].data), qtype)
        assert np.array_equal(np.asarray(info.data).reshape(-1), expected.reshape(-1)), name
        checked += 1
    assert checked > 10


def test_k_quant_types_and_the_q4_k_m_plan(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM")
    tensors, config = _checkpoint_tensors(folder)
    expected = hf_forward(tensors, config, "llama", IDS)
    for output_type in ("q4_k", "q5_k", "q6_k", "q4_k_m"):
        out = convert(folder, tmp_path / f"{output_type}.gguf", output_type)
        types = {n: t.type.name for n, t in open_gguf(out).tensors.items()}
        # rows of 64 are not whole 256-element super-blocks: llama.cpp's fallbacks
        fallback = {"q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0"}.get(output_type)
        if fallback:
            assert types["blk.0.attn_q.weight"] == fallback and types["blk.0.ffn_down.weight"] == output_type.upper()
        logits = _logits(out, IDS)
        assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.97, output_type
    assert types["output.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q6_K"  # q4_k_m: Q6_K, then fallback


def test_q4_k_m_plan_matches_llama_cpp_on_gemma(gemma3_path, tmp_path):
    exported = export(gemma3_path, tmp_path / "hf")
    ours = open_gguf(convert(exported, tmp_path / "q4_k_m.gguf", "q4_k_m"))
    theirs = open_gguf(gemma3_path)  # made by llama.cpp's llama-quantize Q4_K_M
    assert {n: t.type.name for n, t in ours.tensors.items()} == {n: t.type.name for n, t in theirs.tensors.items()}


# ------------------------------------------------------------------------------------- real round trips

def _tokenizer_view(metadata):
    t = Tokenizer(metadata)
    return (t.tokens, t.token_type.tolist(), t.scores.tolist(), t.bos_id, t.eos_id, t.eot_id, t.unk_id,
            t.add_bos, t.add_eos, t.pre, t.add_space_prefix if t.model == "llama" else None,
            metadata.get("tokenizer.ggml.merges"), metadata.get("tokenizer.chat_template"))


def _arch_keys(metadata, arch):
    keys = {k: v for k, v in metadata.items() if k.startswith(arch + ".")}
    keys.pop(f"{arch}.rope.dimension_count", None)  # written by the converter as the head size, llamba's default
    return keys


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def round_trip(request, tmp_path_factory):
    original = request.getfixturevalue(f"{request.param.split('-')[0]}_path")
    folder = tmp_path_factory.mktemp(request.param)
    exported = export(original, folder / "hf")
    return request.param, original, exported, convert(exported, folder / "f32.gguf", "f32")


def test_round_trip_keeps_weights_metadata_and_tokenizer(round_trip):
    _, original, exported, f32 = round_trip
    a, b = open_gguf(original), open_gguf(f32)
    assert _arch_keys(a.metadata, a.architecture) == _arch_keys(b.metadata, b.architecture)
    assert _tokenizer_view(a.metadata) == _tokenizer_view(b.metadata)
    assert set(a.tensors) == set(b.tensors)
    for name, info in a.tensors.items():  # the F32 file holds exactly the dequantized weights
        assert np.array_equal(dequantize(info.data, info.type), np.asarray(b.tensors[name].data)), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gguf.GGUFReader(f32)


def test_round_trip_tokenizes_the_reference_corpus(round_trip, reference_dir):
    name, _, _, f32 = round_trip
    from tests.conftest import load_reference

    reference = load_reference(reference_dir, name)
    tokenizer = Tokenizer(open_gguf(f32).metadata)
    corpus = (reference_dir / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    assert tokenizer.encode(corpus, add_special=False) == reference["tokenize_whole"]["plain"]
    for case in reference["tokenize"]:
        assert tokenizer.encode(case["text"], add_special=True, parse_special=True) == case["bos_special"]


def test_round_trip_logits(round_trip, tmp_path):
    name, original, exported, f32 = round_trip
    ids = Tokenizer(open_gguf(original).metadata).encode("The capital of France is Paris, and the capital of")
    theirs, ours = _logits(original, ids), _logits(f32, ids)
    # the original runs the 8-bit integer kernels, the F32 file the float ones: the same weights, the
    # activations rounded differently
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.995
    f16 = convert(exported, tmp_path / "f16.gguf", "f16")
    halves = _logits(f16, ids)
    assert np.abs(halves - ours).max() < 0.02 * np.abs(ours).max()


def test_exported_tokenizer_loads_in_its_library(round_trip, reference_dir):
    name, _, exported, _ = round_trip
    from tests.conftest import load_reference

    reference = load_reference(reference_dir, name)
    if name.startswith("smollm2"):
        from tokenizers import Tokenizer as HFTokenizer

        # named by llama.cpp's own hash of SmolLM's ids, not only by the definition it was written with
        assert identify_pre(exported / "tokenizer.json") == ("smollm", "hash")

        library = HFTokenizer.from_file(str(exported / "tokenizer.json"))
        encode = lambda text: library.encode(text).ids  # noqa: E731
        expected = "bos_special"  # the tokenizers package always reads special tokens; SmolLM2 adds no BOS
    else:
        import sentencepiece as spm

        library = spm.SentencePieceProcessor(model_file=str(exported / "tokenizer.model"))
        encode, expected = library.encode, "plain"
    for case in reference["tokenize"]:
        assert encode(case["text"]) == case[expected], case["text"]
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) == ("tokenizer.chat_template" in open_gguf(round_trip[1]).metadata)


def test_requantize_matches_gguf_quants(smollm2_path, tmp_path):
    out = open_gguf(requantize(smollm2_path, tmp_path / "q8.gguf", "q8_0"))
    source = open_gguf(smollm2_path)
    for name, info in source.tensors.items():
        ours = out.tensors[name]
        if len(info.shape) == 1:
            assert ours.type.name == "F32"
            continue
        values = dequantize(info.data, info.type)
        expected = gguf.quants.quantize(values, GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(ours.data).reshape(-1), expected.reshape(-1)), name
    assert out.metadata["general.file_type"] == 7
    assert out.metadata["tokenizer.chat_template"] == source.metadata["tokenizer.chat_template"]


# ------------------------------------------------------------------------------------------------ errors

def _cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def test_unsupported_architecture_is_one_line(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    code, output = _cli("convert", folder, "-o", tmp_path / "out.gguf")
    assert code == 1 and "GPTNeoXForCausalLM" in output and "not supported" in output
    assert "Traceback" not in output and not (tmp_path / "out.gguf").exists()


def test_missing_shard_and_missing_config(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LlambaError, match="model-00002-of-00002.safetensors is missing"):
        convert(folder, tmp_path / "out.gguf")
    (folder / "config.json").unlink()
    code, output = _cli("convert", folder, "-o", tmp_path / "out.gguf")
    assert code == 1 and "config.json: not found" in output


def test_unsupported_dtype(tmp_path):
    from safetensors.numpy import save_file

    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM")
    shard = folder / "model-00001-of-00002.safetensors"
    from safetensors import safe_open

    with safe_open(shard, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].astype(np.float64)
    save_file(tensors, shard)
    with pytest.raises(UnsupportedError, match=f"{first} is F64"):
        convert(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*out.gguf*"))


def test_full_disk_leaves_no_file(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "hf", "LlamaForCausalLM")
    calls = []

    def full(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    code, output = _cli("convert", folder, "-o", tmp_path / "out.gguf")
    assert code == 1 and "disk is full" in output and output.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_refuses_a_folder_with_files(smollm2_path, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, output = _cli("export", smollm2_path, tmp_path)
    assert code == 1 and "not an empty folder" in output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_output_type_is_a_usage_error(smollm2_path, tmp_path):
    code, output = _cli("quantize", smollm2_path, tmp_path / "x.gguf", "q3_k_xl")
    assert code == 2 and "q3_k_xl" in output


def test_cli_convert_round_trip(tmp_path):
    folder = write_checkpoint(tmp_path / "hf", "Qwen2ForCausalLM")
    code, output = _cli("convert", folder, "-o", tmp_path / "m.gguf", "--type", "q8_0")
    assert code == 0 and "wrote" in output
    assert ggml_type("Q8_0") == open_gguf(tmp_path / "m.gguf").tensors["blk.0.attn_q.weight"].type
