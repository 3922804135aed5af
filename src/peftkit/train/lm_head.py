"""Run a causal LM's output head only at the positions the loss reads.

With response-only loss most positions carry no label (a rotten-tomatoes example: ~3 labelled of ~70), yet a
plain forward multiplies every position's hidden state by the vocabulary matrix (SmolLM2: 576 x 49,152, a
fifth of the model's matmul work) and keeps those fp32 logits, (B, T, V), for the backward pass.

:func:`head_positions` selects, just before the head runs, the hidden states of each row's labelled positions
(a forward pre-hook on ``get_output_embeddings()``), so the model returns logits for those positions only,
(B, K, V) with K the most labels in a row. Whatever the model does after its head (soft-capping, scaling) still applies, and nothing
is re-implemented per architecture. The loss is the same sum over the same terms.

The hook leaves the call alone when it cannot tell what it sees (no output embedding, a head input that is
not (B, >= T, d)); the caller then gets full logits and knows from their shape. A method that prepends
positions (soft prompts) hands the head (B, N + T, d): the caller's tokens are the last T.

The loss can also be taken without the model ever holding the logits (:class:`HeadCapture`, the default of
:func:`peftkit.train.loss.lm_loss_sum`): the hook keeps the selected hidden states and hands the head nothing
(after a first-use check, see :class:`HeadCapture`); :func:`linear_cross_entropy_sum` then runs head and
cross-entropy together, a chunk of positions at a time, and computes their gradients in the same pass (the
loss is the last op, so its gradient is known in forward: backward only scales them). No (N, V) tensor
outlives its chunk, and the log-softmax output, the zero-filled NLL gradient and the log-softmax backward of
the plain loss are never made: at the peak one chunk's head output and its fp32 log-softmax (which becomes
its gradient) exist, :func:`rows_per_chunk` positions each (what ``peftkit memory`` counts). Measured
(bench/levers.py, SmolLM2's head, V 49,152, 1020 positions, head frozen): head + loss 0.81-0.85x the time of
``F.cross_entropy`` on full logits, peak memory 157 MB instead of 584, the same loss and gradients to float rounding.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.data.tokenize import IGNORE


def labelled_positions(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's labelled positions, packed to the left: ``(index, target)``, both (B, K).

    ``target`` is the shifted labels (B, T-1); K is the most labels any row has. Rows with fewer are
    filled with position 0 and target ``IGNORE``, so the loss over the selection is the loss over ``target``.
    """
    labelled = target != IGNORE  # (B, T-1)
    k = int(labelled.sum(dim=1).max()) if labelled.numel() else 0
    index = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :k]  # labelled first, in order
    picked = target.gather(1, index)  # (B, K); fillers are unlabelled positions, so IGNORE already
    return index, picked


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to logits, through DDP/FSDP wrappers; None if unknown."""
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def head_positions(model: nn.Module, index: torch.Tensor, seq_len: int,
                   capture: HeadCapture | None = None) -> Iterator[list[bool]]:
    """Within the block, the model's head sees only the positions ``index`` of the caller's ``seq_len`` tokens.

    Args:
        index: (B, K) positions per row (from :func:`labelled_positions`), or (K,) the same for every row.
        capture: keep the selected hidden states in it and run the head on a one-position probe instead
            (see :class:`HeadCapture`); ignored when K is 0.

    Yields a one-element list that tells, after the forward, whether the selection was applied (False: the
    logits are the full (B, T, V) ones). Only the head's first call is changed.
    """
    applied = [False]
    head = output_head(model)
    if head is None:
        yield applied
        return
    calls = [0]

    def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        calls[0] += 1
        if calls[0] > 1 or not args or not isinstance(args[0], torch.Tensor):
            return None
        hidden = args[0]  # (B, T', d), T' >= T
        if hidden.ndim != 3 or hidden.shape[1] < seq_len or (index.ndim == 2 and index.shape[0] != hidden.shape[0]):
            return None
        offset = hidden.shape[1] - seq_len  # positions a method prepended (soft prompts)
        applied[0] = True
        if index.ndim == 1:
            selected = hidden.index_select(1, index + offset)  # (B, K, d)
        else:
            rows = (index + offset).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, K, d)
            selected = hidden.gather(1, rows)
        if capture is not None and selected.shape[1] > 0:
            return (capture.select(selected), *args[1:])  # the head runs on (B, 1 or 0, d) only
        return (selected, *args[1:])

    handle = head.register_forward_pre_hook(pre)
    try:
        yield applied
    finally:
        handle.remove()


# -- head and cross-entropy in one pass ---------------------------------------------------------------

#: fp32 logits of one chunk of positions, but at least MIN_CHUNK_ROWS positions: a chunk rereads the whole
#: (V, d) weight, and skinny GEMMs are slow (one CPU core, GPT-2 / SmolLM2 heads, time per position: chunks of
#: 128 positions 4-7% slower than 170-256, of 64 ~27% slower). So ~256 positions per chunk from 32k vocabularies up.
CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 256
#: per model: does it return its head's own output as logits (True), or change it (False, e.g. soft-capping)?
_HEAD_IS_LOGITS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def rows_per_chunk(positions: int, vocab: int, rows: int | None = None) -> int:
    """Positions per chunk of :func:`linear_cross_entropy_sum` for ``positions`` rows and a ``vocab``-wide head.

    About ``rows`` (default: as many as fit :data:`CHUNK_BYTES` of fp32 logits, at least :data:`MIN_CHUNK_ROWS`),
    made equal over the chunks (within 1.5x of it: no small last chunk, a slow skinny GEMM); at most ``positions``.
    """
    rows = rows or max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))
    chunks = max(1, round(positions / rows))
    return max(1, math.ceil(positions / chunks))


@dataclass
class HeadCapture:
    """Asks :func:`head_positions` to keep the head's selected input instead of running the head on it.

    On a model's first use the head still runs, so that the logits the model returns tell whether they are the
    head's own output (nothing applied after the head, such as Gemma 2's soft-capping); the answer is
    remembered per model. It runs on the whole (B, K, d) selection when those logits are no bigger than one
    chunk of :func:`linear_cross_entropy_sum` (so the check adds no memory beyond the loss's own peak), and a
    model that fails the check gets its loss from them, with no second forward; a larger selection is checked
    on each row's first position, a (B, 1, d) probe. Later calls hand the head an empty (B, 0, d) input.
    :meth:`loss_sum` takes the loss from the kept hidden states.
    """

    head: nn.Linear
    verify: bool  # first use on this model: run the head on (part of) the selection and compare
    hidden: torch.Tensor | None = None  # (B, K, d), set by the hook
    probe: torch.Tensor | None = None  # (B, K or 1 or 0, d), what the head ran on

    @classmethod
    def for_model(cls, model: nn.Module) -> HeadCapture | None:
        """A capture if ``model``'s head is a plain ``nn.Linear`` (not an adapter, not quantized) whose output
        the model returns, and the run is not distributed (FSDP gathers and frees the head's weight around its
        own forward); else None."""
        head = output_head(model)
        if type(head) is not nn.Linear or _HEAD_IS_LOGITS.get(model) is False:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return None
        return cls(head, verify=model not in _HEAD_IS_LOGITS)

    def select(self, selected: torch.Tensor) -> torch.Tensor:
        """Called by the hook with the head's selected input (B, K, d): keep it, return what the head runs on."""
        self.hidden = selected
        positions = selected.shape[0] * selected.shape[1]
        if not self.verify:
            self.probe = selected[:, :0]
        elif rows_per_chunk(positions, self.head.out_features) == positions:
            self.probe = selected  # the check's logits fit one loss chunk: whole, so a failed check can use them
        else:
            self.probe = selected[:, :1]
        return self.probe

    def loss_sum(self, model: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """Summed cross-entropy of the kept positions against ``target`` (B, K).

        On first use, a model whose ``logits`` are not its head's output (remembered for ``model``, with a
        warning) gets the plain cross-entropy of those logits when the head ran on the whole selection.
        Returns None when the model's logits cannot give the loss (that check failed on a one-position probe,
        or the logits are not what the head was given): the caller then takes the unfused path
        (:func:`peftkit.train.loss.path_loss`).
        """
        if self.hidden is None or self.probe is None:
            return None
        if self.verify:
            with torch.no_grad():
                own = F.linear(self.probe, self.head.weight, self.head.bias)  # (B, K or 1, V): the model's own call
            ok = logits.shape == own.shape and torch.equal(logits.to(own.dtype), own)
            del own
            _HEAD_IS_LOGITS[model] = ok
            if not ok:
                warnings.warn(f"{type(model).__name__} changes its head's output: the loss uses the logits it returns",
                              stacklevel=3)
                if self.probe.shape[1] == target.shape[1] and logits.shape[:2] == target.shape:
                    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                                           reduction="sum")  # (B*K, V) vs (B*K,): the forward's logits, reused
                return None
        elif logits.shape[1] != 0:
            return None  # not what the head was given: the caller takes the unfused path
        keep = target != IGNORE  # (B, K): filler positions of rows with fewer labels need no head at all
        return linear_cross_entropy_sum(self.hidden[keep], self.head.weight, self.head.bias, target[keep])


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             target: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum")`` without the (N, V) logits.

    Args:
        hidden: (N, d) the head's input at the labelled positions.
        weight: (V, d) and bias (V,) or None: the head.
        target: (N,) token ids (no ignored positions).
        chunk_rows: about how many positions per chunk (see :func:`rows_per_chunk`, which makes the chunks
            equal); default: as many as fit :data:`CHUNK_BYTES` of fp32 logits, at least :data:`MIN_CHUNK_ROWS`.

    Returns:
        The summed loss, a scalar. With gradients enabled its gradients (to hidden, weight, bias, as they
        require) are computed in this call, so it costs the head's backward too; backward only scales them
        (once: the graph cannot be run backward twice).
    """
    rows = rows_per_chunk(hidden.shape[0], weight.shape[0], chunk_rows)
    if not torch.is_grad_enabled():
        return _LinearCrossEntropy.loss_only(hidden, weight, bias, target, rows)
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """Head + cross-entropy by chunks of positions; the gradients are made in forward, backward scales them.

    Per chunk of n positions: logp = log_softmax(h·Wᵀ + b) (n, V) in fp32, loss -= logp[target]; its gradient
    g = softmax - onehot overwrites logp; grad_hidden = g·W, grad_W += gᵀ·h, grad_b += Σ g.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, rows: int) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, d)
        grad_w = torch.zeros_like(weight) if need_w else None  # (V, d)
        grad_b = torch.zeros_like(bias) if need_b else None  # (V,)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], target[start:start + rows].unsqueeze(1)  # (n, d), (n, 1)
            out = F.linear(h, weight, bias)  # (n, V), in the autocast dtype if any
            logp = torch.log_softmax(out.float(), dim=1)  # (n, V)
            del out
            loss -= logp.gather(1, t).sum()
            g = logp.exp_().scatter_add_(1, t, torch.full(t.shape, -1.0, device=t.device))  # softmax - onehot
            autocast = torch.is_autocast_enabled(g.device.type)
            g = g.to(torch.get_autocast_dtype(g.device.type) if autocast else weight.dtype)  # the head's GEMM dtype
            plain = g.dtype == h.dtype == weight.dtype and not autocast
            if need_h:
                if plain:  # straight into the result: no (n, d) temporary
                    torch.mm(g, weight, out=grad_h[start:start + rows])
                else:
                    grad_h[start:start + rows] = g @ weight
            if need_w:
                if plain:
                    grad_w.addmm_(g.T, h)  # (V, d)
                else:
                    grad_w += (g.T @ h).to(grad_w.dtype)
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
            del logp, g  # before the next chunk's head output: one chunk's (n, V) buffers at a time
        ctx.grads = [grad_h, grad_w, grad_b]  # not saved tensors: backward scales them in place, once
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy_sum: backward ran twice (its gradients were handed out)")
        return (*[None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads], None, None)

    @staticmethod
    def loss_only(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                  rows: int) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            logp = torch.log_softmax(F.linear(hidden[start:start + rows], weight, bias).float(), dim=1)  # (n, V)
            loss -= logp.gather(1, target[start:start + rows].unsqueeze(1)).sum()
            del logp
        return loss
