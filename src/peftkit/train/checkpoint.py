"""Checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Layout: ``OUTPUT_DIR/checkpoints/step-000100/`` holding ``trainable.safetensors`` (every parameter
with ``requires_grad``, whatever the method), ``optim.pt`` (optimizer, scheduler, RNG; read back with
``weights_only=True``, so nothing but tensors and plain containers is unpickled),
``trainer_state.json`` and the model export (``adapter/``). A checkpoint folder appears only once
complete, so a run killed at any moment leaves the previous one loadable.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from peftkit.core.files import atomic_dir

_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where training is: enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    export: Callable[[Path], None] | None = None,
    keep: int = 2,
) -> Path:
    path = checkpoint_dir(output_dir) / f"step-{state.step:06d}"
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(path) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "optim.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        if export is not None:
            export(tmp / "adapter")
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore a checkpoint into the (already built) model, optimizer and scheduler."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing or any(n not in params for n in tensors):
        raise ValueError(f"{path}: checkpoint does not match this model/method (e.g. {(missing or list(tensors))[0]!r})")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    extra = torch.load(path / "optim.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))
