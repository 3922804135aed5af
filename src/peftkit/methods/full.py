"""Full fine-tuning: every parameter trains — the baseline the parameter-efficient methods are measured
against (memory: weights + gradients + two AdamW states, 16 bytes per fp32 parameter before activations).

The same loop trains it; what it delivers is a whole model folder (``save_pretrained``), not an adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from peftkit.core.registry import register
from peftkit.methods.selective import InPlaceConfig, _base_parameters, attach_in_place


@dataclass
class FullConfig(InPlaceConfig):
    """Full fine-tuning has no settings."""

    default_lr = 5e-5

    peft_type: ClassVar[str] = "PEFTKIT_FULL"
    writes_full_model: ClassVar[bool] = True  # the run writes a complete model folder

    def trainable_base_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return _base_parameters(model)

    def empty_selection_message(self, model: nn.Module) -> str:
        return "the model has no parameters"


@register("full", FullConfig, "full fine-tuning: every parameter trains (the baseline); writes a whole model")
def attach_full(model: nn.Module, config: FullConfig, adapter_name: str) -> list[str]:
    return attach_in_place(model, config, adapter_name)
