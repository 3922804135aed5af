"""What the PEFT interop tests share: the saved tiny bases, loaded the way users load models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch.nn as nn
from transformers import AutoModelForCausalLM


@pytest.fixture
def load_base(hf_base_dir: Callable[[str], Path]) -> Callable[[str], nn.Module]:
    """``load_base(kind)``: a fresh copy of the saved base (``from_pretrained`` of its folder), in eval mode."""
    return lambda kind: AutoModelForCausalLM.from_pretrained(hf_base_dir(kind)).eval()
