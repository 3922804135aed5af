"""The Modelfile: its TEMPLATE, run by a Go-template interpreter as Ollama runs it (with SYSTEM inserted as
Ollama inserts it), renders conversations exactly as the tokenizer's own Jinja template does; templates of other
shapes are measured too, and one the pieces cannot reproduce is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from peftkit import LoraConfig
from peftkit.errors import ConfigError
from peftkit.runs.export.gguf import export_gguf
from peftkit.runs.export.ollama import chat_parts, modelfile, parse_modelfile
from tests.runs.export import gotemplate

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and {{ 3+3 }}?\nShow work."}],
]

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Mistral-style: the system prompt is glued into the first user message, so a message's wrapping depends on position
GLUED = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.index0 == 1 and messages[0]['role'] "
         "== 'system' %}{{ messages[0]['content'] }}\n{% endif %}{{ m['content'] }} [/INST]{% elif m['role'] == "
         "'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


def _ollama_render(text: str, messages: list[dict[str, str]]) -> str:
    parsed = parse_modelfile(text)
    system = parsed.get("SYSTEM", "")
    if system and messages[0]["role"] != "system":  # Ollama puts the Modelfile's SYSTEM first when none is given
        messages = [{"role": "system", "content": system}, *messages]
    return gotemplate.render(parsed["TEMPLATE"], messages, system)


@pytest.mark.parametrize("template", [None, LLAMA3], ids=["smollm2", "llama3-style"])
def test_template_runs_like_the_tokenizers(tokenizer, template: str | None) -> None:
    tok = copy.deepcopy(tokenizer)
    if template:
        tok.chat_template = template
    text = modelfile("model.gguf", tok)
    for messages in CONVERSATIONS:
        assert _ollama_render(text, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)


def test_smollm2_parts_and_modelfile(tokenizer) -> None:
    parts = chat_parts(tokenizer)
    assert parts.before["user"] == "<|im_start|>user\n" and parts.after["assistant"] == "<|im_end|>\n"
    assert parts.generation == "<|im_start|>assistant\n"
    assert parts.default_system.startswith("You are a helpful AI assistant named SmolLM")
    parsed = parse_modelfile(modelfile("base.gguf", tokenizer, "adapter.gguf", context=2048))
    assert parsed["FROM"] == "./base.gguf" and parsed["ADAPTER"] == "./adapter.gguf"
    assert parsed["SYSTEM"] == parts.default_system
    assert ("stop", "<|im_end|>") in parsed["PARAMETER"] and ("num_ctx", "2048") in parsed["PARAMETER"]


def test_llama3_style_head_is_kept_outside_the_messages(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAMA3
    parts = chat_parts(tok)
    assert parts.head == tok.bos_token and parts.default_system == ""
    assert parts.before["assistant"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_a_template_that_wraps_by_position_is_refused(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GLUED
    with pytest.raises(ConfigError, match="cannot be translated for Ollama"):
        chat_parts(tok)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        chat_parts(tok)


def test_modelfile_parser_names_lines() -> None:
    with pytest.raises(ConfigError, match="line 2: unknown instruction 'FORM'"):
        parse_modelfile("FROM ./a.gguf\nFORM x\n")
    with pytest.raises(ConfigError, match='line 1: """ is never closed'):
        parse_modelfile('TEMPLATE """abc\n')


def test_export_writes_a_modelfile_naming_the_files_written(make_adapter, tiny_lm_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(LoraConfig(r=4, target_modules=["q_proj"]))
    result = export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "lora", ollama=True)
    parsed = parse_modelfile((tmp_path / "lora" / "Modelfile").read_text())
    assert result.files == ["adapter.gguf", "base.gguf", "Modelfile"]
    for key in ("FROM", "ADAPTER"):
        assert (tmp_path / "lora" / parsed[key]).is_file()
    result = export_gguf(str(tiny_lm_dir), str(adapter), tmp_path / "merged", ollama=True, merge=True)
    parsed = parse_modelfile((tmp_path / "merged" / "Modelfile").read_text())
    assert parsed["FROM"] == "./model.gguf" and "ADAPTER" not in parsed and result.files[-1] == "Modelfile"
