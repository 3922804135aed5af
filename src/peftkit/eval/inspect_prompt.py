"""What did a soft prompt learn? Each virtual token's nearest vocabulary tokens by cosine similarity.

Works on prompt tuning and P-tuning adapters (peftkit's or PEFT's files), whose virtual tokens live in the
model's input-embedding space: ``prompt_embeddings`` (N, d) is compared with the embedding matrix (V, d).
Prefix tuning's virtual tokens are per-layer keys and values, which no word embedding corresponds to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.core.io import WEIGHTS_NAME, read_adapter_config
from peftkit.errors import AdapterFileError, ConfigError
from peftkit.models.builtin import adapter_base

EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING")


def inspect_prompt(adapter_dir: str | os.PathLike, model: str | None = None, top_k: int = 5) -> list[dict[str, Any]]:
    """For each virtual token, the ``top_k`` vocabulary tokens whose input embeddings are closest in cosine.

    Args:
        adapter_dir: a prompt tuning or P-tuning adapter folder.
        model: base model alias or folder; default: the adapter's ``base_model_name_or_path``.
        top_k: how many tokens per virtual token.

    Returns:
        One dict per virtual token: ``index``, ``norm`` (its L2 norm) and ``nearest``, a list of
        ``{"id", "token", "similarity"}`` from most to least similar.

    Raises:
        ConfigError: bad ``top_k``, or no model given and none named by the adapter.
        AdapterFileError: the base the adapter names is gone (no model given).
        AdapterFileError: not a prompt tuning / P-tuning adapter, or its width does not fit the model.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be a positive integer, got {top_k}")
    config = read_adapter_config(adapter_dir)
    if config["peft_type"] not in EMBEDDING_TYPES:
        raise AdapterFileError(f"{adapter_dir}: a {config['peft_type']} adapter has no virtual tokens in the word "
                               "embedding space; inspect-prompt reads prompt tuning and P-tuning adapters")
    prompt = _read_prompt(Path(adapter_dir) / WEIGHTS_NAME)  # (N, d)
    name = model or adapter_base(adapter_dir)
    vocab, tokenizer = _vocabulary(name, config.get("task_type"))  # (V, d)
    if vocab.shape[1] != prompt.shape[1]:
        raise AdapterFileError(f"{adapter_dir}: virtual tokens are {prompt.shape[1]} wide but {name}'s embeddings are "
                               f"{vocab.shape[1]} wide (adapter made for another model?)")
    return nearest_tokens(prompt, vocab, tokenizer, top_k)


def nearest_tokens(prompt: torch.Tensor, vocab: torch.Tensor, tokenizer: Any, top_k: int) -> list[dict[str, Any]]:
    """Cosine nearest neighbours of each row of ``prompt`` (N, d) among the rows of ``vocab`` (V, d)."""
    sims = F.normalize(prompt.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T  # (N, V)
    values, ids = sims.topk(min(top_k, vocab.shape[0]), dim=-1)  # (N, k)
    rows = []
    for i in range(prompt.shape[0]):
        nearest = [{"id": int(t), "token": tokenizer.decode([int(t)]), "similarity": round(float(s), 4)}
                   for s, t in zip(values[i], ids[i])]
        rows.append({"index": i, "norm": round(float(prompt[i].float().norm()), 4), "nearest": nearest})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: one line per virtual token, its nearest tokens with their similarity."""
    lines = [f"{'#':>3}  {'norm':>7}  nearest vocabulary tokens (cosine similarity)"]
    for row in rows:
        tokens = ", ".join(f"{t['token']!r} {t['similarity']:.2f}" for t in row["nearest"])
        lines.append(f"{row['index']:>3}  {row['norm']:>7.3f}  {tokens}")
    return "\n".join(lines)


def _read_prompt(file: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise AdapterFileError(f"{file}: missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{file}: unreadable safetensors file ({e})") from None
    prompt = tensors.get("prompt_embeddings")
    if prompt is None or prompt.ndim != 2:
        raise AdapterFileError(f"{file}: no 2D tensor 'prompt_embeddings'")
    return prompt


def _vocabulary(name: str, task_type: str | None) -> tuple[torch.Tensor, Any]:
    from peftkit.models import load_model

    model, tokenizer = load_model(name, task="seq2seq" if task_type == "SEQ_2_SEQ_LM" else "causal_lm")
    return model.get_input_embeddings().weight.detach(), tokenizer


__all__ = ["format_table", "inspect_prompt", "nearest_tokens"]
