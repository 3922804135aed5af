"""Checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically.

Layout: ``OUTPUT_DIR/checkpoints/step-000100/`` holding ``trainable.safetensors`` (every parameter
with ``requires_grad``, whatever the method), ``optim.pt`` (optimizer, scheduler, RNG; read back with
``weights_only=True``, so nothing but tensors and plain containers is unpickled),
``trainer_state.json`` and the model export (``adapter/``). A checkpoint folder appears only once
complete (it is written as a hidden temporary folder and renamed), so a run killed at any moment,
even in the middle of a write, leaves the previous checkpoint loadable. Old checkpoints are renamed
away before they are deleted, so a half-deleted one never looks complete.

In a distributed run every rank calls :func:`save_checkpoint` (gathering sharded state is collective);
only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from peftkit.core.files import atomic_dir
from peftkit.errors import PeftkitError
from peftkit.train.distributed import (
    SINGLE,
    Dist,
    full_trainable_params,
    load_optimizer_state,
    load_trainable,
    optimizer_state,
    rng_states,
)

_STEP_RE = re.compile(r"^step-(\d+)$")
_STALE_RE = re.compile(r"^\.(step-\d+)\.(tmp-|old-|deleting)")


class CheckpointError(PeftkitError):
    """A checkpoint cannot be written or read (disk full, unwritable folder, damaged files)."""


@dataclass
class TrainState:
    """Where training is: enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    skipped_batches: int = 0
    world_size: int = 1


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_stale(output_dir: Path) -> int:
    """Delete temporary folders a killed run left in ``checkpoints/``; returns how many."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if _STALE_RE.match(p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def save_checkpoint(
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    export: Callable[[Path], None] | None = None,
    keep: int = 2,
    dist: Dist = SINGLE,
) -> Path:
    """Write ``checkpoints/step-N`` (rank 0), then delete all but the ``keep`` newest.

    Raises:
        CheckpointError: the folder cannot be written (disk full, permissions); the previous
            checkpoints are untouched.
    """
    path = checkpoint_dir(output_dir) / f"step-{state.step:06d}"
    optim = optimizer_state(model, optimizer, dist)  # collective under FSDP
    rngs = rng_states(dist)  # collective in any distributed run
    with full_trainable_params(model):  # collective under FSDP
        def write() -> None:
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            try:
                with atomic_dir(path) as tmp:
                    save_file(trainable, str(tmp / "trainable.safetensors"))
                    torch.save(
                        {
                            "optimizer": optim,
                            "scheduler": scheduler.state_dict(),
                            "torch_rng": rngs[0],
                            "rank_rng": rngs,
                            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                        },
                        tmp / "optim.pt",
                    )
                    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
                    if export is not None:
                        export(tmp / "adapter")
            except OSError as e:
                raise CheckpointError(write_error_message(f"checkpoint {path}", e, output_dir)) from None
            for old in list_checkpoints(output_dir)[:-keep]:
                _delete(old)

        dist.run_on_main(write)
    return path


def write_error_message(what: str, e: OSError, output_dir: Path) -> str:
    """``cannot write WHAT: REASON; last complete checkpoint: ...`` (one line)."""
    reason = e.strerror or str(e)
    last = list_checkpoints(output_dir)
    kept = f"; the last complete checkpoint {last[-1]} is intact" if last else ""
    return f"cannot write {what}: {reason}{kept}"


def _delete(folder: Path) -> None:
    """Rename, then delete: a kill halfway leaves a hidden folder, not a damaged ``step-N``."""
    doomed = folder.parent / f".{folder.name}.deleting"
    try:
        os.replace(folder, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dist: Dist = SINGLE,
) -> TrainState:
    """Restore a checkpoint into the (already built) model, optimizer and scheduler.

    Raises:
        CheckpointError: a damaged or foreign checkpoint (files unreadable, tensors of another
            model/method, or anything in ``optim.pt`` that is not plain tensors and containers).
    """
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        extra = torch.load(path / "optim.pt", weights_only=True, map_location="cpu")
        raw_state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:  # safetensors, unpickler (weights_only refuses code) and json raise many types
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {reason})") from None
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(params - set(tensors))
    if missing or set(tensors) - params:
        example = (missing or sorted(tensors))[0]
        raise CheckpointError(f"{path}: checkpoint does not match this model/method (e.g. {example!r})")
    load_trainable(model, tensors, dist)
    known = {f.name for f in fields(TrainState)}
    state = TrainState(**{k: v for k, v in raw_state.items() if k in known})
    opt = extra["optimizer"]
    if "format" not in opt:  # written before distributed support: a plain optimizer.state_dict()
        opt = {"format": "torch", "state": opt}
    try:
        load_optimizer_state(model, optimizer, opt, dist, str(path))
        scheduler.load_state_dict(extra["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        if isinstance(e, PeftkitError):
            raise
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({type(e).__name__}: {e})") from None
    rank_rng = extra.get("rank_rng") or [extra["torch_rng"]]
    if dist.rank < len(rank_rng):
        torch.set_rng_state(rank_rng[dist.rank])
    if extra["cuda_rng"] and torch.cuda.is_available() and not dist.active:
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state
