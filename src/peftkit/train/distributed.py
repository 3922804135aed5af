"""Data-parallel training with ``torch.distributed``: DDP, or FSDP (fully sharded) for big models.

Started by ``torchrun --nproc_per_node N -m peftkit train CONFIG.yaml``: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address, and every process runs the same command.
NCCL is used on GPUs, gloo on CPU.

How the work is split (so that N ranks x batch b trains exactly like 1 rank x batch N*b):

* every rank builds the same *global* batch order (batch size b*N, seeded), and takes its own contiguous
  slice of each global batch (:func:`shard`);
* the loss is summed over each rank's labelled tokens and divided by the labelled-token count of the
  whole step, all-reduced over ranks; DDP/FSDP average gradients over ranks, so the loss is scaled by N;
* a rank whose slice of a (last, short) global batch is empty runs one example with weight 0, so every
  rank takes part in every collective.

Only rank 0 writes files (checkpoints, adapter, metrics, summary) and logs. A failure on rank 0 while
writing is sent to every rank (:meth:`Dist.run_on_main`), so no rank waits forever on a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from peftkit.errors import ConfigError, PeftkitError

T = TypeVar("T")
MODES = ("auto", "none", "ddp", "fsdp")


class RankError(PeftkitError):
    """Another rank (rank 0 writing files) failed; this one stops with its message."""


@dataclass
class Dist:
    """The process group this process is in; ``Dist()`` is a plain single-process run (every call a no-op).

    Attributes:
        mode: ``none``, ``ddp`` or ``fsdp`` (resolved; never ``auto``).
        rank / world_size / local_rank: from torchrun's environment.
        device: this rank's device (``cuda:LOCAL_RANK`` with GPUs, else CPU).
    """

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Is there a process group (collectives must be called on every rank)?"""
        return self.mode != "none"

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled over the process group, never read from a file)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; if it raises, every rank raises (rank 0 its own error).

        Every rank must call this at the same point: it ends with a broadcast of rank 0's outcome.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
        if self.active:
            outcome = self.broadcast(None if error is None else (type(error).__name__, _one_line(error)))
            if outcome is not None and error is None:
                raise _rank_error(*outcome)
        if error is not None:
            raise error
        return result

    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = Dist()


def _one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _rank_error(kind: str, message: str) -> PeftkitError:
    """The error other ranks raise when rank 0 failed: same class when it is a user error."""
    import peftkit.errors as errors

    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, PeftkitError):
        return cls(message)
    return RankError(f"rank 0 failed: {kind}: {message}")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(mode: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun prepared, per ``train.distributed``.

    ``auto``: DDP when torchrun started more than one process, else a plain run. ``ddp`` / ``fsdp``:
    need torchrun (any number of processes). ``none``: a plain run; refused under torchrun with
    several processes (they would all write the same output_dir).

    Raises:
        ConfigError: a mode that needs torchrun without it, or ``none`` with several processes.
    """
    if mode not in MODES:
        raise ConfigError(f"train.distributed must be one of {', '.join(MODES)}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none":
        if world > 1:
            raise ConfigError(f"train.distributed=none but torchrun started {world} processes; "
                              "use train.distributed=ddp (or fsdp), or run without torchrun")
        return Dist()
    if not launched_by_torchrun():
        raise ConfigError(f"train.distributed={mode} needs a launcher: "
                          f"torchrun --nproc_per_node N -m peftkit train CONFIG.yaml")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(mode, rank, world, local_rank, device)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


# -- data ---------------------------------------------------------------------------------------
def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous slice of a global batch; slice sizes differ by at most one.

    Rank r of N gets ``items[start_r:start_r + size_r]``; a full batch of N*b gives b to each rank.
    """
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


# -- wrapping -----------------------------------------------------------------------------------
def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """The module to call for training forward/backward: DDP around ``model``, or ``model`` sharded in
    place by FSDP (each transformer block, then the root), or ``model`` itself.

    DDP uses ``find_unused_parameters=False``: every trainable parameter must take part in every
    forward (true for methods that wrap modules; a method with conditionally used weights would fail
    loudly at the first backward).
    """
    if d.mode == "none":
        return model
    model.to(d.device)
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_sync(net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step (accumulation)."""
    if not last and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_value(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP's grad norm), as a float."""
    return float(t.full_tensor() if is_sharded(t) else t)


@contextlib.contextmanager
def full_trainable_params(model: nn.Module) -> Iterator[None]:
    """Inside this block every trainable FSDP-sharded parameter of ``model`` is its full tensor, on
    every rank (collective: all ranks must enter). Outside FSDP it does nothing.

    This is how a full adapter is saved from FSDP (not the empty or one-shard adapter other tools
    write): the generic save code reads the module's parameters, which here are whole. Only trainable
    parameters are gathered (the adapter: small), never the frozen base.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and is_sharded(p):
                    full = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                    swapped.append((module, name, p))
                    module._parameters[name] = full
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


# -- checkpoint state -------------------------------------------------------------------------------
def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """The optimizer state to save: ``optimizer.state_dict()``, or under FSDP the full (unsharded)
    state keyed by parameter name (collective)."""
    if d.mode != "fsdp":
        return {"format": "torch", "state": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"format": "fqn", "state": get_optimizer_state_dict(model, optimizer, options=opts)}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], d: Dist,
                         where: str) -> None:
    """Restore what :func:`optimizer_state` saved (every rank reads the same checkpoint file)."""
    fmt = saved.get("format", "torch")
    want = "fqn" if d.mode == "fsdp" else "torch"
    if fmt != want:
        kind = "an FSDP" if fmt == "fqn" else "a non-FSDP"
        raise ConfigError(f"{where} was written by {kind} run; resume it with the same train.distributed setting")
    if fmt == "torch":
        optimizer.load_state_dict(saved["state"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved["state"], options=StateDictOptions(full_state_dict=True))


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], d: Dist) -> None:
    """Copy full trainable tensors into ``model`` (sharding them under FSDP)."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def rng_states(d: Dist) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (dropout), so a resumed run continues each rank's stream."""
    return d.gather(torch.get_rng_state())


__all__ = ["Dist", "MODES", "RankError", "SINGLE", "full_trainable_params", "launched_by_torchrun", "load_optimizer_state",
           "load_trainable", "local_value", "no_sync", "optimizer_state", "rng_states", "setup", "shard", "teardown", "wrap"]


def local_slice(global_batch: Sequence[int], dist: Dist) -> tuple[list[int], float]:
    """This rank's indices of a global batch and their weight; an empty slice (a short last batch)
    becomes one example with weight 0, so the rank still joins the collectives of the step."""
    mine = shard(global_batch, dist.rank, dist.world_size)
    return (mine, 1.0) if mine else (list(global_batch[:1]), 0.0)
