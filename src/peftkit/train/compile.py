"""Optional ``torch.compile`` of a model's repeated blocks (``train.compile: true``).

Regional compilation: each block of the model's layer stack (the decoder layers) is compiled, not the whole
model. Blocks of one class share their compiled code, so a 30-layer model costs about one layer's compile
time; the embedding, the head and the loss stay eager, so the loss's hooks (:mod:`peftkit.train.lm_head`)
and the shared-prefix cache need no tracing. The first steps are slow while it compiles (on CPU a C++
compiler builds the kernels).
"""

from __future__ import annotations

import torch.nn as nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the longest ``nn.ModuleList`` whose items all share one class (the layer stack)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if len(module) > len(best):
                best = list(module)
    return best


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every block of the layer stack in place (``nn.Module.compile``); returns how many."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=None)
    return len(blocks)
