"""A causal LM as one GGUF file (llama.cpp, Ollama, LM Studio), written with the ``gguf`` package: no llama.cpp
checkout, no compiler, no network, no sentencepiece.

What llama.cpp reads, and where each piece comes from:

* **metadata** ``<arch>.*``: from the model's ``config.json`` (block count, widths, heads, RoPE base, norm epsilon);
* **tensors** ``token_embd``, ``blk.N.attn_q``, ...: named by gguf's own ``TensorNameMap`` (the table llama.cpp's
  converter uses), with the rows of q and k reordered for llama.cpp's RoPE layout (:func:`rope_rows`); a tied
  output head is left out (llama.cpp then uses ``token_embd``);
* **tokenizer** ``tokenizer.ggml.*``: the byte-level BPE vocabulary, merges, token types and special ids from the
  Hugging Face tokenizer, the chat template as it is. llama.cpp also wants the name of the pre-tokenizer (its
  regex set, ``tokenizer.ggml.pre``); it is copied from the GGUF a built-in model came from, and is "default" for
  other models (llama.cpp warns then; pass ``pre=`` when the name is known).

Dtypes: f32, f16, bf16, q8_0. Vectors (norms, biases) stay f32 as llama.cpp expects; a matrix whose rows are not a
multiple of q8_0's 32-value block is written f16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from peftkit.errors import ConfigError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")

# Hugging Face model_type -> (llama.cpp architecture, q/k rows reordered for RoPE). Mistral and Llama share
# llama.cpp's "llama" graph; Qwen2 keeps Hugging Face's row order (llama.cpp's converter does not permute it).
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                             "qwen2": ("qwen2", False)}


def rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection (or of LoRA's B for it) in llama.cpp's order.

    Hugging Face rotates the two halves of each head's dimensions (rotate_half); llama.cpp (GGML's NeoX-less RoPE)
    rotates adjacent pairs, so each head's rows [0..d/2) and [d/2..d) are interleaved: (heads, 2, d/2, ...) ->
    (heads, d/2, 2, ...). ``heads``: attention heads for q, key/value heads for k.
    """
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`rope_rows`: llama.cpp's row order back to Hugging Face's."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class Layout:
    """How one model's tensors are named and ordered in GGUF.

    Attributes:
        arch: llama.cpp's architecture name (``general.architecture``).
        permute: reorder q/k rows (:func:`rope_rows`).
        heads, kv_heads: attention and key/value heads.
        blocks: transformer blocks.
    """

    arch: str
    permute: bool
    heads: int
    kv_heads: int
    blocks: int

    @classmethod
    def of(cls, config: Any) -> Layout:
        """The layout of a transformers model ``config``.

        Raises:
            ConfigError: the architecture has no GGUF export here (named), or uses RoPE scaling.
        """
        kind = config.model_type
        if kind not in ARCHITECTURES:
            raise ConfigError(f"GGUF export covers {', '.join(sorted(ARCHITECTURES))} models; this one is {kind!r}")
        rope = _rope_parameters(config)
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"GGUF export does not write RoPE scaling ({rope.get('rope_type')!r}) yet")
        arch, permute = ARCHITECTURES[kind]
        heads = config.num_attention_heads
        return cls(arch, permute, heads, config.num_key_value_heads or heads, config.num_hidden_layers)

    def name(self, hf_name: str) -> str:
        """GGUF tensor name of a Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight`` ->
        ``blk.0.attn_q.weight``).

        Raises:
            ConfigError: no GGUF name is known for it.
        """
        import gguf

        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        found = gguf.get_tensor_name_map(arch, self.blocks).get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ConfigError(f"tensor {hf_name!r} has no name in llama.cpp's {self.arch} layout")
        return found

    def to_gguf_rows(self, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
        """``w``'s rows as llama.cpp keeps them (q and k reordered, everything else as is)."""
        if self.permute and ".attn_q." in gguf_name:
            return rope_rows(w, self.heads)
        if self.permute and ".attn_k." in gguf_name:
            return rope_rows(w, self.kv_heads)
        return w


def add_tensor(writer: Any, name: str, w: torch.Tensor, dtype: str) -> None:
    """Write ``w`` (PyTorch (out, in) order; GGUF stores it as (in, out) = ne[0], ne[1]) in ``dtype``."""
    import gguf
    from gguf.quants import quantize

    data = w.detach().to(torch.float32).cpu().numpy()
    if data.ndim < 2 or dtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data))
    elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, quantize(data, q), raw_dtype=q)
    elif dtype == "bf16":
        q = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, quantize(data, q), raw_dtype=q)
    else:  # f16, and q8_0's fallback for rows that are not whole blocks
        writer.add_tensor(name, data.astype(np.float16))


def file_type(dtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def check_dtype(dtype: str) -> None:
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype for GGUF must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")


# -- the whole model -------------------------------------------------------------------------------------------------
def write_model_gguf(model: nn.Module, tokenizer: Any, path: str | Path, dtype: str = "f16", name: str = "",
                     pre: str | None = None) -> dict[str, Any]:
    """Write ``model`` (a plain transformers causal LM: merged, no adapter layers left) as one GGUF file.

    Args:
        pre: llama.cpp's pre-tokenizer name; None: "default".

    Returns:
        ``{"tensors": count, "arch": ..., "pre": ...}``.

    Raises:
        ConfigError: an architecture, tokenizer or tensor GGUF export does not cover (named).
    """
    import gguf

    check_dtype(dtype)
    config = model.config
    layout = Layout.of(config)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    _add_hparams(writer, config, layout)
    writer.add_file_type(file_type(dtype))
    pre = pre or "default"
    add_tokenizer(writer, tokenizer, config.vocab_size, pre)
    count = 0
    for hf_name, w in _unique_tensors(model):
        gname = layout.name(hf_name)
        add_tensor(writer, gname, layout.to_gguf_rows(gname, w), dtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "arch": layout.arch, "pre": pre}


def _unique_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every persistent tensor, a tied one once (under its first name: the embedding)."""
    seen: set[int] = set()
    for hf_name, w in model.state_dict().items():
        if w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        yield hf_name, w


def _rope_parameters(config: Any) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _add_hparams(writer: Any, config: Any, layout: Layout) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(layout.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# -- the tokenizer -----------------------------------------------------------------------------------------------------
def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    """The ``tokenizer.ggml.*`` keys of a byte-level BPE tokenizer (GPT-2 style: Llama 3, SmolLM, Qwen, ...).

    Token types as llama.cpp's converter assigns them: a special added token is CONTROL (the chat template's
    markers are then matched as one token), another added token USER_DEFINED, ids the tokenizer does not cover
    (an embedding padded past the vocabulary) UNUSED.

    Raises:
        ConfigError: not a byte-level BPE tokenizer.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM, Qwen); "
                          f"this one is {model.get('type') or type(tokenizer).__name__}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []])
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id")
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    adds_bos, adds_eos = special_tokens_added(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    template = tokenizer.chat_template
    if template:
        writer.add_chat_template(template)


def special_tokens_added(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds BOS at the start / EOS at the end (measured, not read from a flag)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return bos, eos
