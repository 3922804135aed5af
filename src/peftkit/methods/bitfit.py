"""BitFit: train only the bias terms (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199).

    h = W·x + b     W frozen, b trained

Models whose layers have no biases (the Llama family) have nothing to train: that is an error saying
what to use instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from peftkit.core.registry import register
from peftkit.methods.selective import InPlaceConfig, _base_parameters, attach_in_place


@dataclass
class BitFitConfig(InPlaceConfig):
    """BitFit has no settings: every bias of the model trains."""

    default_lr = 1e-3

    peft_type: ClassVar[str] = "PEFTKIT_BITFIT"

    def trainable_base_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in _base_parameters(model) if n.endswith("bias"))

    def empty_selection_message(self, model: nn.Module) -> str:
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        return (f"BitFit trains bias terms, but this model ({family}) has none (Llama-family layers are bias-free); "
                "use lora, ia3, or selective with kinds: [norm] instead")


@register("bitfit", BitFitConfig, "BitFit: train only the bias terms of the frozen model")
def attach_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> list[str]:
    return attach_in_place(model, config, adapter_name)
