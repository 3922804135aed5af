"""Linear probing: train only the task head on a frozen model (the classic transfer-learning baseline).

    y = head(f(x))     f frozen, head trained

The head is the model's classification head when it has one (``classifier``/``score``: the same modules a
``task: seq_cls`` run trains and saves as PEFT's ``modules_to_save``), else its output layer (the LM head);
name others with ``head``. A causal LM whose head is tied to the input embeddings trains that shared matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from peftkit.core.registry import register
from peftkit.core.targeting import classification_head_names, output_head_names
from peftkit.methods.selective import InPlaceConfig, _base_parameters, attach_in_place


@dataclass
class LinearProbeConfig(InPlaceConfig):
    """Attributes:
        head: module names (or suffixes) of the head; None: the classification head, else the output layer.
    """

    default_lr = 1e-4

    peft_type: ClassVar[str] = "PEFTKIT_LINEAR_PROBE"

    head: list[str] | None = None

    def trainable_base_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        heads = set(self.head or classification_head_names(model) or output_head_names(model))
        # by identity: a head tied to the input embeddings is listed once, under the embedding's name
        head_params = {id(p) for name, mod in model.named_modules()
                       if any(name == h or name.endswith("." + h) for h in heads) for p in mod.parameters()}
        return ((n, p) for n, p in _base_parameters(model) if id(p) in head_params)

    def empty_selection_message(self, model: nn.Module) -> str:
        return f"no head parameters found (head={self.head!r}); name the head module, e.g. method.head=[classifier]"


@register("linear_probe", LinearProbeConfig, "linear probing: train only the task head on a frozen model")
def attach_linear_probe(model: nn.Module, config: LinearProbeConfig, adapter_name: str) -> list[str]:
    return attach_in_place(model, config, adapter_name)
