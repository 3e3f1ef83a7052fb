"""Chat templates: the model's own (rendered byte for byte as llama.cpp did), built-in styles, overrides,
errors that name the template line, and end-of-turn tokens taken from the template."""

from __future__ import annotations

import pytest

from llamba.errors import LlambaError
from llamba.formats.gguf import open_gguf
from llamba.text.chat_template import BUILTIN_TEMPLATES, ChatTemplate, load_chat_template, turn_terminator
from llamba.text.tokenizer import Tokenizer
from tests.conftest import load_reference

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _template(path, override=None):
    g = open_gguf(path)
    tok = Tokenizer(g.metadata)
    return tok, load_chat_template(g.metadata, tok.tokens, tok.token_to_id, tok.bos_id, tok.eos_id, override)


def test_smollm2_template_matches_llama_cpp(smollm2_path, reference_dir):
    ref = load_reference(reference_dir, "smollm2-135m")["chat"]
    _, template = _template(smollm2_path)
    assert template.name == "model"
    assert template.render(ref["messages"]) == ref["rendered"]


def test_gemma_without_template_gets_the_gemma_style(gemma3_path):
    tok, template = _template(gemma3_path)
    assert template.name == "gemma"
    text = template.render(MESSAGES)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    tok.add_end_of_generation(turn_terminator(template))
    assert tok.token_to_id["<end_of_turn>"] in tok.eog_ids


def test_turn_terminator_comes_from_the_template():
    assert turn_terminator(ChatTemplate(BUILTIN_TEMPLATES["chatml"])).startswith("<|im_end|>")
    assert turn_terminator(ChatTemplate(BUILTIN_TEMPLATES["llama3"])) == "<|eot_id|>"


def test_override_by_style_and_by_file(smollm2_path, tmp_path):
    _, llama3 = _template(smollm2_path, "llama3")
    assert llama3.render(MESSAGES).startswith("<|im_start|><|start_header_id|>system")  # bos is <|im_start|> here
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    _, from_file = _template(smollm2_path, str(custom))
    assert from_file.render(MESSAGES) == "[system] Be brief.\n[user] Hi\n"
    with pytest.raises(LlambaError, match="no such file, and not a built-in style"):
        _template(smollm2_path, "no-such-style")


def test_template_errors_name_the_line():
    with pytest.raises(LlambaError, match="line 2"):
        ChatTemplate("ok\n{% for x in %}")
    failing = ChatTemplate("line one\n{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(LlambaError, match="line 2.*only user and assistant roles"):
        failing.render(MESSAGES)


def test_helpers_real_templates_use():
    t = ChatTemplate("{{ messages | tojson }}{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                     "{{ m.content }}{% endfor %}{{ strftime_now('%Y') | length }}")
    out = t.render([{"role": "user", "content": "é"}, {"role": "user", "content": "x"}])
    assert out == '[{"role": "user", "content": "é"}, {"role": "user", "content": "x"}]x4'


def test_sandbox_blocks_python_internals():
    with pytest.raises(LlambaError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)
