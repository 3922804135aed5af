"""Generation with the same template as training: batched, left-padded, KV-cached (transformers' generate)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from peftkit.core.mixed import mixed_batch
from peftkit.data.collate import pad_batch
from peftkit.data.template import Template
from peftkit.errors import ConfigError
from peftkit.train.precision import model_device


@torch.no_grad()
def generate(
    model: nn.Module,
    template: Template,
    examples: Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """The model's response to each example's prompt (greedy unless ``do_sample``).

    Args:
        adapter_names: one adapter name per example (``"__base__"``: the base model): each example is answered
            by its own adapter, several adapters in one batch (:func:`peftkit.core.mixed.mixed_batch`).
            None: the active adapters answer every example.

    Raises:
        ConfigError: ``max_new_tokens`` < 1; with ``do_sample``, ``temperature`` <= 0 or ``top_p`` outside (0, 1];
            ``adapter_names`` does not have one name per example, or names an unknown or unmixable adapter.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if do_sample and not (0 < temperature < float("inf") and 0 < top_p <= 1):
        raise ConfigError(f"sampling needs temperature > 0 and top_p in (0, 1], got temperature {temperature!r}, "
                          f"top_p {top_p!r}")
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(examples)):
        raise ConfigError(f"adapter_names must give one adapter name per example ({len(examples)}), got "
                          f"{adapter_names!r}")
    tok = template.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = model_device(model)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    outputs: list[str] = []
    for s in range(0, len(examples), batch_size):
        prompts = [{"input_ids": template.prompt_ids(ex)} for ex in examples[s:s + batch_size]]
        batch = pad_batch(prompts, pad_id, side="left")
        sample_args = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        rows = adapter_names[s:s + batch_size] if adapter_names is not None else None
        with mixed_batch(model, rows) if rows is not None else contextlib.nullcontext():
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                eos_token_id=template.stop_token_ids(),
                pad_token_id=pad_id,
                **sample_args,
            )
        # a decoder-only model returns prompt + continuation; an encoder-decoder (T5) only the decoder's tokens
        new = out if getattr(model.config, "is_encoder_decoder", False) else out[:, batch["input_ids"].shape[1]:]
        outputs += [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    model.train(was_training)
    return outputs
