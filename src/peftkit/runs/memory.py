"""Predict a training run's peak memory without loading the weights (``peftkit memory``).

The model is built on the meta device from its ``AutoConfig`` and the method is attached, so every
parameter's count, dtype and ``requires_grad`` are exact; only activations are estimated::

    total = runtime + weights + gradients + optimizer + activations + allocator
    weights     = sum(numel x element size)          over all (unique) parameters and buffers
    gradients   = sum(numel x element size)          over trainable parameters (fp32 adapters over any base)
    optimizer   = sum(2 x numel x element size)      AdamW's exp_avg and exp_avg_sq, in the parameter's dtype
    activations = layers_with_backward x B x T x per_token_layer + logits (+ one layer in flight)
    allocator   = ALLOCATOR_SLACK x activations (+ DEQUANT_SLACK x dequantized copies)   what glibc's heap keeps

``per_token_layer`` counts the tensors a decoder layer saves for backward (fp32; bf16 autocast halves the
matmul outputs), measured per method with ``torch.autograd.graph.saved_tensors_hooks``: a frozen layer keeps
6 hidden + 3 intermediate values per token (norm inputs, q, keys and values expanded to every head, the
attention output, the MLP's gate/activation/up), and each trained or adapted part adds its input (LoRA on q/v:
7h + 3i; on every linear layer: 8h + 4i; full fine-tuning: 10h + 4i; see :func:`_trained_inputs`). Layers below
the first trainable parameter keep nothing for backward when nothing below them trains (LoRA on the
upper layers, linear probe); anything trained at the input side (soft prompts, embeddings, prefixes,
a method in layer 0) needs every layer. Gradient checkpointing keeps only each layer's input plus one
layer recomputed during backward. The head and the loss add, with K the positions the head runs at
(:mod:`peftkit.train.lm_head`: only the labelled ones): with the fused loss (``train.fused_loss``, where it
applies: :func:`fused_loss_applies`) one chunk of :func:`~peftkit.train.lm_head.rows_per_chunk` positions of
the (B x K, V) logits and its fp32 log-softmax, plus on a run's first batch the logits the first-use check
makes; with the plain loss (B, K, V) three times: the logits, the fp32 copy passed to cross-entropy and its
log-softmax (in backward: the log-softmax and two gradients). See :func:`head_loss_bytes`.

What B, T and K are comes from the data (:class:`BatchShape`): the loop pads each batch to its longest row,
not to ``data.max_length``, runs the leading tokens every row shares once per batch
(:mod:`peftkit.train.shared_prefix`: a chat template's system prompt and the instruction, ~39 of a
rotten-tomatoes row's ~73 tokens) and the head only at labelled positions (~3 per row there). With a shared
prefix of P tokens a layer keeps ``(B x (T - P) + P) x per_token_layer`` (keys and values: B x T); an embedding
soft prompt's virtual tokens are part of P. ``peftkit train`` replays its own micro-batches on its encoded
training examples (:func:`measure_shapes`: the loop's seeded, length-grouped order, each batch split as
:func:`peftkit.data.collate.split_padded` splits it, so a long row among short ones is a sub-batch of its own):
B, T, K and P of each, and the prediction is that of the micro-batch that takes the most. ``peftkit memory``
does the same on the same examples (the first ``SAMPLE_EXAMPLES`` of the training order; one epoch of them when
the training set is larger) when the tokenizer and data can be read, and otherwise (or with ``--no-data``) assumes rows of
``data.max_length`` tokens, a quarter of them labelled (all with ``data.train_on_prompt`` or plain text) and no
shared prefix: an upper bound for short-answer data (figures in BENCHMARKS.md, "Where the memory predictor's
constants come from").

``runtime`` is the resident size of the Python + torch + transformers + peftkit stack before any model
is loaded (measured: :func:`measure_runtime_mb`).
"""

from __future__ import annotations

import dataclasses
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit.allocator import glibc_heap_keeps_freed_memory
from peftkit.core.labels import IGNORE
from peftkit.runs.config import RunConfig

MB = 2**20
# Each constant below is a measurement; the figures and how they were taken are in BENCHMARKS.md, "Where the
# memory predictor's constants come from".
#: RSS of ``import torch, transformers, datasets`` + peftkit's training modules (:func:`measure_runtime_mb`)
RUNTIME_MB = 420.0
#: what bitsandbytes adds to the process of a quantized base (QLoRA)
BITSANDBYTES_MB = 60.0
#: bitsandbytes' CPU quantization temporaries of one block of rows, with the fp32 block itself, in block sizes
QUANTIZE_TRANSIENT = 6
#: what glibc's heap holds beyond the live tensors, as a share of the activations (freed out of order, kept)
ALLOCATOR_SLACK = 0.5
#: the same for a quantized base's dequantized fp32 copies (each quantized weight twice a step), as a share of
#: their total size; copies above glibc's largest mmap threshold (32 MB) are mmapped and handed back at once
DEQUANT_SLACK = 0.25
_MMAP_THRESHOLD_MAX = 32 * MB  # glibc on 64-bit
#: training examples ``peftkit memory`` encodes to measure the batch shape (~1 s with a fast tokenizer)
SAMPLE_EXAMPLES = 2000

_LAYER_RE = re.compile(r"\.(?:layers|h|layer|block)\.(\d+)\.")
_PROBE = "import torch, transformers, datasets, peftkit.runs.run, peftkit.cli.commands; " \
         "from peftkit.train.tracking import peak_memory_mb; print(peak_memory_mb())"


@dataclass
class MemoryBreakdown:
    """Predicted peak memory of one training process, in MB (2**20 bytes).

    Attributes:
        weights: all parameters and buffers (frozen + trainable) at their stored dtype.
        gradients: one fp32 gradient per trainable parameter.
        optimizer: AdamW's two fp32 states per trainable parameter.
        activations: tensors saved for backward, plus the logits and their gradient.
        allocator: freed memory glibc's heap keeps (:data:`ALLOCATOR_SLACK` x activations, + :data:`DEQUANT_SLACK`
            x a quantized base's dequantized copies; 0 when the process runs with ``MALLOC_MMAP_THRESHOLD_``,
            which hands freed blocks back to the OS, or under another allocator such as jemalloc
            (:func:`glibc_heap_keeps_freed_memory`)).
        runtime: the Python/torch/transformers process before the model is loaded (+ bitsandbytes for a
            quantized base).
        loading: the peak while loading: runtime + the fp32 checkpoint; for a quantized base (QLoRA),
            which is quantized layer by layer with each layer's file pages released once it is done,
            runtime + the quantized weights + the largest layer's quantization temporaries.
        total: the larger of loading and runtime + weights + gradients + optimizer + activations + allocator.
        trainable_params / frozen_params: parameter counts.
        layers_with_backward: decoder layers whose activations are kept for backward.
        tokens: rows x width (+ virtual tokens) of the largest micro-batch.
        rows / width / labelled / shared_prefix / data: the :class:`BatchShape` the activations were computed for
            (the largest micro-batch).
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    allocator: float
    runtime: float
    loading: float
    total: float
    trainable_params: int
    frozen_params: int
    layers_with_backward: int
    tokens: int
    rows: int = 0
    width: int = 0
    labelled: int = 0
    shared_prefix: int = 0
    data: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("allocator (glibc heap)", self.allocator),
                ("runtime (python/torch)", self.runtime), ("peak while loading", self.loading),
                ("total (peak)", self.total)]
        lines = [f"  {name:24s} {value:10,.1f} MB" for name, value in rows]
        lines.append(f"  trainable {self.trainable_params:,} / frozen {self.frozen_params:,} params; "
                     f"{self.layers_with_backward} layer(s) keep activations; {self.tokens} tokens per micro-batch")
        if self.data:
            lines.append(f"  largest micro-batch: {self.rows} rows of up to {self.width} tokens, "
                         f"{self.labelled} labelled per row, {self.shared_prefix}-token shared prefix ({self.data})")
        return "\n".join(lines)


@dataclass(frozen=True)
class BatchShape:
    """The largest micro-batch of a run, as its activations see it (see the module docstring).

    Attributes:
        rows: examples per micro-batch (B).
        width: tokens per row of the widest micro-batch (T): batches are padded to their longest row.
        labelled: labelled positions per row (K: the micro-batch's total over its rows, rounded up): where the LM
            head runs.
        shared_prefix: leading tokens every row shares, run once per batch (P; 0 when not shared).
        source: where the figures come from (``assumed ...`` or ``measured on N examples``).
    """

    rows: int
    width: int
    labelled: int
    shared_prefix: int = 0
    source: str = "assumed"
    pairs: bool = False  # a preference batch: the head's full logits are kept (train/preference.py)


def assumed_shape(cfg: RunConfig, why: str = "") -> BatchShape:
    """The shape without looking at the data: rows of ``data.max_length``, a quarter labelled (all of them
    when every token is), nothing shared."""
    t = cfg.data.max_length
    every = cfg.data.train_on_prompt or cfg.data.format == "text"
    note = f"assumed: rows of {t} tokens, {'all' if every else 'a quarter'} labelled, no shared prefix"
    return BatchShape(cfg.train.batch_size, t, t if every else max(1, t // 4), 0, note + (f" ({why})" if why else ""))


def measure_shapes(examples: Sequence[dict[str, list[int]]], batch_size: int, shared: bool,
                   source: str | None = None, *, seed: int = 0, steps: int | None = None, grad_accum: int = 1,
                   group_by_length: bool = True, split_padding: bool = True) -> tuple[BatchShape, ...]:
    """The micro-batches a run of ``examples`` (tokenized, as the loop gets them) meets, as the few shapes that
    can be its largest: the loop's own batch order is replayed and no other shape is at least as large in every
    respect (positions, keys, attention, labels, rows). :func:`predict_memory` takes the largest prediction.

    Args:
        examples: ``input_ids`` and ``labels`` (IGNORE where unlabelled; no labels: every token is one).
        batch_size: examples per micro-batch.
        shared: whether the run shares batch prefixes (:func:`peftkit.train.shared_prefix.was_shared`).
        source: the description stored in the shapes (default: ``measured on N examples``).
        seed / grad_accum / group_by_length: the run's (``train.seed``, ``train.grad_accum``,
            ``data.group_by_length``): the same batches as :meth:`peftkit.train.loop.Trainer._epoch_batches`.
        steps: optimizer steps the run takes (``train.max_steps``): the batches of those steps only; None (a
            sample of a larger training set) replays at least one epoch of ``examples``.
        split_padding: the loop runs a batch as sub-batches of similar-length rows
            (:func:`peftkit.data.collate.split_padded`); each sub-batch is a micro-batch here too.
    """
    from peftkit.data.collate import accumulated_batches, padding_groups

    source = source or f"measured on {len(examples)} examples"
    ids = [e["input_ids"] for e in examples]
    lengths = [len(x) for x in ids]
    labels = [e.get("labels", e["input_ids"]) for e in examples]
    batches: list[list[int]] = []
    for epoch in range(1 if steps is None else MAX_REPLAYED_EPOCHS):
        if steps is not None and len(batches) >= steps * grad_accum:
            break
        batches += accumulated_batches(lengths, batch_size, grad_accum, seed, epoch, group_by_length)
    shapes = set()
    pairs = "rejected_input_ids" in examples[0]  # preference pairs: one batch of 2B rows, never split
    for batch in batches if steps is None else batches[:steps * grad_accum]:
        if pairs and batch:
            shapes.add(_pair_shape([examples[i] for i in batch], shared))
        if not batch or pairs:
            continue  # (an epoch's short last step is padded with empty micro-batches)
        groups = padding_groups([lengths[i] for i in batch], _common_prefix([ids[i] for i in batch])) \
            if split_padding and len(batch) > 1 else [list(range(len(batch)))]
        for group in groups:
            rows = [batch[g] for g in group]
            width = max(lengths[i] for i in rows)
            labelled = sum(sum(1 for x in labels[i][1:] if x != IGNORE) for i in rows)  # label t read from t-1
            prefix = _shared_prefix([ids[i] for i in rows], [labels[i] for i in rows], width) if shared else 0
            shapes.add((len(rows), width, max(-(-labelled // len(rows)), 1), prefix))
    keys = {s: _size_key(*s) for s in shapes}
    largest = [s for s in shapes if not any(o != s and _covers(keys[o], keys[s]) for o in shapes)]
    return tuple(BatchShape(*s, source=source, pairs=pairs) for s in sorted(largest, key=lambda s: keys[s],
                                                                            reverse=True))


def _pair_shape(batch: Sequence[dict[str, list[int]]], shared: bool) -> tuple[int, int, int, int]:
    """A preference micro-batch (train/preference.py): the chosen and the rejected sequences padded together; with
    ``shared``, the prompt every pair runs once (:mod:`peftkit.train.pair_prompt`: the shortest pair's, when it is
    at least ``MIN_PREFIX`` tokens) as the prefix."""
    from peftkit.train.shared_prefix import MIN_PREFIX

    rows = [(e["input_ids"], e["labels"]) for e in batch] + [(e["rejected_input_ids"], e["rejected_labels"])
                                                              for e in batch]
    labelled = sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in rows)
    width = max(len(ids) for ids, _ in rows)
    prompt = min(_shared_prefix([e["input_ids"], e["rejected_input_ids"]], [e["labels"], e["rejected_labels"]],
                                width) for e in batch) if shared else 0
    return len(rows), width, max(-(-labelled // len(rows)), 1), prompt if prompt >= MIN_PREFIX else 0


def measure_shape(examples: Sequence[dict[str, list[int]]], batch_size: int, shared: bool,
                  source: str | None = None, **run: Any) -> BatchShape:
    """The one shape of :func:`measure_shapes` with the most positions (for a report; the prediction takes
    them all)."""
    return measure_shapes(examples, batch_size, shared, source, **run)[0]


#: epochs :func:`measure_shapes` replays at most (a long run on a small data set meets the same batches again)
MAX_REPLAYED_EPOCHS = 50


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Leading tokens every row has alike (within the shortest row)."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for r in rows[1:]:
        n = next((j for j in range(n) if r[j] != first[j]), n)
    return n


def _shared_prefix(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], width: int) -> int:
    """What :func:`peftkit.train.shared_prefix.shared_prefix_len` finds for these rows padded to ``width``."""
    from peftkit.train.shared_prefix import MIN_PREFIX

    if len(rows) < 2:
        return 0
    n = _common_prefix(rows)
    first_label = min(next((j for j, x in enumerate(lab) if x != IGNORE), width) for lab in labels)
    n = min(n, first_label - 1, width - 1)  # no logit is needed inside the prefix
    return n if n >= MIN_PREFIX else 0


def _size_key(rows: int, width: int, labelled: int, prefix: int) -> tuple[int, ...]:
    """What a micro-batch's activations grow with (:func:`_activation_bytes`): positions run, keys and values,
    the attention mask, labelled positions, rows."""
    return rows * (width - prefix) + prefix, rows * width + prefix, rows * width * width, rows * labelled, rows


def _covers(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True))


def expects_shared_prefix(cfg: RunConfig, model: nn.Module) -> bool:
    """Whether a run of ``cfg`` would share batch prefixes: what :func:`peftkit.train.shared_prefix.can_share`
    decides in training mode (every registered method passed the first-use check on a tiny Llama, soft prompts
    included)."""
    from peftkit.train.shared_prefix import can_share

    if cfg.train.gradient_checkpointing or cfg.train.distributed in ("ddp", "fsdp") or cfg.data.packing:
        return False
    was_training = model.training
    model.train()
    try:
        return can_share(model)
    finally:
        model.train(was_training)


def data_shape(cfg: RunConfig, model: nn.Module, limit: int = SAMPLE_EXAMPLES) -> BatchShape | tuple[BatchShape, ...]:
    """The batch shapes measured on (a sample of) the run's training data, for ``peftkit memory``.

    The examples are the run's own (``data.max_train_examples`` drawn as ``peftkit train`` draws them), encoded
    with the model's tokenizer and the run's template; of a set larger than ``limit``, a seeded sample of ``limit``.
    When that is the whole training set, the run's own micro-batches of its ``train.max_steps`` steps are
    replayed (:func:`measure_shapes`); otherwise one epoch of the sample, batched the same way (an estimate: a
    longer run over more data may meet a wider batch).
    Falls back to :func:`assumed_shape` (saying why) for what it does not read: task types other than
    ``causal_lm``, packing, ``data.tasks``, or a tokenizer or data that cannot be loaded.
    """
    if cfg.task != "causal_lm" or cfg.data.packing or cfg.data.tasks:
        return assumed_shape(cfg, f"task {cfg.task}" if cfg.task != "causal_lm" else
                             "packing" if cfg.data.packing else "data.tasks")
    from transformers import AutoTokenizer

    from peftkit.data.template import Template
    from peftkit.errors import PeftkitError
    from peftkit.models import resolve_model
    from peftkit.runs.task_types import get_task

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model), local_files_only=True,
                                                  trust_remote_code=cfg.trust_remote_code)  # first: fails fast
        task = get_task(cfg.task)
        splits = task.load_splits(cfg)
        rows = list(splits.train)
        if cfg.data.max_train_examples:  # as runs/run.py draws them
            random.Random(cfg.train.seed).shuffle(rows)
            rows = rows[: cfg.data.max_train_examples]
        whole = len(rows) <= limit  # the run's own examples, in its order: its batches are replayed exactly
        if not whole:  # a seeded sample of a larger set
            random.Random(cfg.train.seed).shuffle(rows)
            rows = rows[:limit]
        examples = task.encode(Template.create(tokenizer, cfg.data.template, splits.format), tokenizer, rows,
                               cfg, splits).examples
    except (PeftkitError, OSError, ValueError) as e:
        return assumed_shape(cfg, f"data not read: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}")
    if not examples:
        return assumed_shape(cfg, "no training example")
    t = cfg.train
    return measure_shapes(examples, t.batch_size, expects_shared_prefix(cfg, model),
                          f"measured on {len(examples)} of {len(splits.train)} training examples", seed=t.seed,
                          steps=t.max_steps if whole else None, grad_accum=t.grad_accum,
                          group_by_length=cfg.data.group_by_length)


def build_meta_model(cfg: RunConfig) -> nn.Module:
    """The config's model with its method attached, on the meta device (no weights allocated).

    A method whose initialisation reads weight values (prompt tuning initialised from text) cannot run
    on meta tensors; for those the model is built on the CPU with random weights, once.
    """
    from transformers import AutoConfig

    from peftkit.errors import PeftkitError
    from peftkit.models import resolve_model

    hf_config = AutoConfig.from_pretrained(resolve_model(cfg.model), local_files_only=True,
                                           trust_remote_code=cfg.trust_remote_code)
    from peftkit.runs.task_types import model_from_config

    try:
        with torch.device("meta"):
            return model_from_config(cfg, hf_config)  # the run's task class (a seq_cls head trains too)
    except PeftkitError:
        raise
    except (RuntimeError, NotImplementedError):  # e.g. Tensor.item() on a meta tensor
        return model_from_config(cfg, hf_config)


def predict_memory(cfg: RunConfig, model: nn.Module | None = None,
                   shape: BatchShape | Sequence[BatchShape] | None = None) -> MemoryBreakdown:
    """Predict the peak memory of ``peftkit train`` for ``cfg`` (one process, CPU RSS).

    Args:
        cfg: the run config (model, method, data.max_length, train.batch_size/precision/gradient_checkpointing).
        model: the model with the method attached (any device, meta included); built from ``cfg`` if None.
        shape: the largest micro-batch, or the micro-batches that can be the largest (:func:`measure_shapes`,
            :func:`data_shape`: the prediction is that of the one that takes the most); default
            :func:`assumed_shape` (the config alone).

    Returns:
        The breakdown in MB.
    """
    model = build_meta_model(cfg) if model is None else model
    weights, trainable, frozen, grad_bytes = _parameter_bytes(model)
    checkpoint = 4 * (trainable + frozen)  # load_model reads fp32
    hf = model.config
    n_layers = int(getattr(hf, "num_hidden_layers", 1))
    first = _first_trainable_layer(model, n_layers)
    keep = n_layers - first
    shapes = [assumed_shape(cfg)] if shape is None else [shape] if isinstance(shape, BatchShape) else list(shape)
    act, shape, tokens = max((_shape_activations(cfg, model, first, s) for s in shapes), key=lambda a: a[0])
    parts = {
        "weights": weights / MB,
        "gradients": grad_bytes / MB,
        "optimizer": _optimizer_bytes(model) / MB,
        "activations": act / MB,
        "runtime": RUNTIME_MB,
    }
    if cfg.train.precision == "bf16":  # autocast caches a bf16 copy of every trainable weight it casts
        parts["activations"] += 2 * _trainable_numel(model, torch.float32) / MB
    quantized = _quantized_sizes(model)
    largest = max((n for n, _ in quantized), default=0)
    if largest:
        parts["runtime"] += BITSANDBYTES_MB
    transient, churned = _dequantized_copies(quantized)
    parts["activations"] += transient / MB
    slack = ALLOCATOR_SLACK * parts["activations"] + DEQUANT_SLACK * churned / MB
    parts["allocator"] = 0.0 if not glibc_heap_keeps_freed_memory() else slack
    train = sum(parts.values())
    if largest:  # quantized one layer at a time as its pages are read (methods/qlora.py): never the whole fp32 file
        # the fp32 layer, and bitsandbytes' temporaries for one block of its rows (methods/_nf4.py)
        temporaries = (QUANTIZE_TRANSIENT - 1) * min(4 * largest, _nf4_block_bytes())
        loading = parts["runtime"] + (weights + 4 * largest + temporaries) / MB
    else:
        loading = parts["runtime"] + checkpoint / MB
    return MemoryBreakdown(**parts, loading=loading, total=max(train, loading), trainable_params=trainable,
                           frozen_params=frozen, layers_with_backward=keep, tokens=tokens, rows=shape.rows, width=shape.width,
                           labelled=shape.labelled, shared_prefix=shape.shared_prefix, data=shape.source)


def _shape_activations(cfg: RunConfig, model: nn.Module, first: int, s: BatchShape) -> tuple[float, BatchShape, int]:
    """(activation bytes, the shape with a soft prompt's tokens counted in, tokens) of one micro-batch."""
    method = cfg.method
    virtual = method.virtual_tokens
    prefix_kind = method.virtual_token_kind if virtual else None  # soft prompts: "embeddings" or "prefix"
    t = s.width + (virtual if virtual and prefix_kind != "prefix" else 0)
    if s.shared_prefix and t > s.width:  # an embedding soft prompt is part of the shared prefix
        s = dataclasses.replace(s, shared_prefix=s.shared_prefix + t - s.width)
    kv_len = t + (virtual if prefix_kind == "prefix" else 0)
    return _activation_bytes(model.config, cfg, model, first, s, t, kv_len), s, s.rows * t


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _optimizer_bytes(model: nn.Module) -> int:
    """AdamW's exp_avg and exp_avg_sq: torch keeps them in each parameter's dtype (fp32 adapters: 8 bytes
    per parameter; full fine-tuning of a bf16 model: 4)."""
    return sum(2 * p.numel() * p.element_size() for p in _unique_parameters(model) if p.requires_grad)


def _trainable_numel(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in _unique_parameters(model) if p.requires_grad and p.dtype == dtype)


def _quantized_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """(values, bits) of each weight stored quantized (bitsandbytes, or marked so on the meta device)."""
    sizes = []
    for p in _unique_parameters(model):
        if getattr(p, "quant_state", None) is not None:
            sizes.append((_logical_numel(p), 4))
        elif isinstance(getattr(p, "SCB", None), torch.Tensor):
            sizes.append((_logical_numel(p), 8))
        elif (marked := marked_storage(p)) is not None:
            sizes.append((_logical_numel(p), marked[1]))
    return sizes


def marked_storage(p: torch.Tensor | None) -> tuple[int, int] | None:
    """``(bytes, bits)`` a meta weight is marked to take once stored quantized (QLoRA's ``quantize_base`` tags it
    with ``peftkit_stored_bytes`` and ``peftkit_quant_bits``); None for a tensor without the tag. The one reader
    of the tag."""
    stored = getattr(p, "peftkit_stored_bytes", None)
    return None if stored is None else (int(stored), int(getattr(p, "peftkit_quant_bits", 4)))


def _dequantized_copies(quantized: list[tuple[int, int]]) -> tuple[int, int]:
    """(largest transient, bytes whose churn glibc's heap keeps a share of) for the fp32 copies a quantized
    base computes with, in forward and again in backward.

    A 4-bit layer dequantizes a block of rows at a time (methods/_nf4.py): its transient is one block and the
    fp32 scales of the whole weight (values / 64). An 8-bit layer dequantizes its whole weight (bitsandbytes;
    measured: forward + backward of a 32000 x 2048 layer on a (2, 128) batch peaked ~330 MB above its start).
    The churn term is the fit of :data:`DEQUANT_SLACK` (whole weights up to glibc's largest mmap threshold,
    measured on smollm2-135m, where every weight fits one block): it still held after blocks came in (QLoRA's
    peak there did not move), so it is kept as measured.
    """
    from peftkit.methods.quantize import BLOCK

    block_bytes = _nf4_block_bytes()
    transient = churned = 0
    for n, bits in quantized:
        whole = 4 * n
        transient = max(transient, min(whole, block_bytes) + 4 * -(-n // BLOCK) if bits == 4 else whole)
        churned += whole if whole <= _MMAP_THRESHOLD_MAX else 0
    return transient, churned


def _nf4_block_bytes() -> int:
    from peftkit.methods._row_blocks import BLOCK_BYTES  # no bitsandbytes needed: predicted for a machine with it

    return BLOCK_BYTES


def _parameter_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """(weight bytes incl. buffers, trainable count, frozen count, gradient bytes); tied tensors once."""
    weights = trainable = frozen = grads = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += _stored_bytes(p)
        if p.requires_grad:
            trainable += p.numel()
            grads += p.numel() * p.element_size()
        else:
            frozen += _logical_numel(p)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    return weights, trainable, frozen, grads


def _stored_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter occupies, including a quantized weight's scales (``quant_state``)."""
    marked = marked_storage(p)
    if marked is not None:  # a meta weight that a method will store quantized (QLoRA)
        return marked[0]
    n = p.numel() * p.element_size()
    state = getattr(p, "quant_state", None)
    if state is not None:  # bitsandbytes 4-bit: absmax (uint8 when double-quantized) + its own scales
        for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            n += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):  # bitsandbytes 8-bit: one fp32 scale per row
        n += scb.numel() * scb.element_size()
    return n


def _logical_numel(p: torch.Tensor) -> int:
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def _first_trainable_layer(model: nn.Module, n_layers: int) -> int:
    """Index of the lowest decoder layer that needs backward: 0 if anything at the input side trains
    (embeddings, soft prompts, prefixes), ``n_layers`` if only the head/final norm trains."""
    head = {id(p) for m in (model.get_output_embeddings(),) if m is not None for p in m.parameters()}
    first = n_layers
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = _LAYER_RE.search(f".{name}")
        if match:
            first = min(first, int(match.group(1)))
        elif id(p) in head or _is_final_norm(name):
            continue
        else:
            return 0
    return first


def _is_final_norm(name: str) -> bool:
    return bool(re.fullmatch(r"(model\.|transformer\.)?(norm|ln_f|final_layer_norm)\.(weight|bias)", name))


#: names of attention output projections: their input is the attention output, which the attention kernel
#: keeps anyway (nothing more is saved when they train)
_OUT_PROJ = {"o_proj", "out_proj", "o", "wo", "dense", "c_proj"}


def _linear_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module (nn.Linear, bitsandbytes, GPT-2 Conv1D); None otherwise."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores (in, out)
    return None


def _trained_inputs(model: nn.Module, h: int, i: int) -> dict[int, tuple[int, int]]:
    """Per decoder layer: the values per token kept beyond a frozen layer's because something in it trains,
    as ``(fp32 values, autocast values)``.

    A trained or adapted linear layer keeps its input for its weight's (or adapter's) gradient: the normalised
    hidden state feeding the attention projections (h, once however many of q/k/v train), the one feeding the
    MLP (h), the MLP's inner activation feeding its down projection (i); an attention output projection's
    input is the attention output the kernel keeps anyway. A trained norm keeps its normalised input (h, fp32).
    Measured with ``torch.autograd.graph.saved_tensors_hooks`` on smollm2-135m (fp32, per layer and token):
    frozen 6h + 3i; LoRA on q/v 7h + 3i; LoRA on every linear 8h + 4i; full fine-tuning 10h + 4i.
    """
    from peftkit.core.adapter import AdapterLayer

    kinds: dict[int, set[str]] = {}
    norms: dict[int, int] = {}
    inside: list[str] = []  # modules under an adapter layer: counted as that layer
    for name, module in model.named_modules():
        if inside and name.startswith(inside[-1] + "."):
            continue
        match = _LAYER_RE.search(f".{name}.")
        if match is None:
            continue
        layer = int(match.group(1))
        if isinstance(module, AdapterLayer):
            inside.append(name)
            trains = any(p.requires_grad for p in module.parameters())
            sizes = _linear_sizes(getattr(module, "base_layer", module))
        else:
            weight = module._parameters.get("weight")
            trains = weight is not None and weight.requires_grad
            sizes = _linear_sizes(module)
            if trains and sizes is None and "norm" in type(module).__name__.lower():
                norms[layer] = norms.get(layer, 0) + 1
                continue
            if sizes is None:
                continue
        if not trains:
            continue
        if sizes is None:
            kind = f"other:{name}"  # a trained block (e.g. a bottleneck adapter around an MLP): its input
        elif sizes[0] == i and i != h:
            kind = "down"
        elif sizes[1] in (i, 2 * i) and i != h:
            kind = "mlp_in"
        elif name.rsplit(".", 1)[-1] in _OUT_PROJ and sizes[0] == h:
            kind = "out"
        else:
            kind = "attn_in"
        kinds.setdefault(layer, set()).add(kind)
    width = {"down": i, "out": 0}
    layers = set(kinds) | set(norms)
    return {n: (norms.get(n, 0) * h, sum(width.get(k, h) for k in kinds.get(n, ()))) for n in layers}


def _activation_bytes(hf: Any, cfg: RunConfig, model: nn.Module, first: int, shape: BatchShape, t: int,
                      kv_len: int) -> float:
    """Bytes saved for backward by the decoder layers, the logits and the loss, for the largest micro-batch.

    Per layer and position (measured, see :func:`_trained_inputs`): each norm's fp32 input (2h), the
    attention's q and output (2h) and its keys and values, expanded to every head (2h, over all ``kv_len``
    positions), the MLP's gate, activation and up projection (3i), plus what trains in the layer; the (B, T, T)
    fp32 attention mask. CPU attention on this torch keeps no (heads x T x T) weights.

    Args:
        first: the lowest decoder layer that keeps activations.
        t: positions per row through the layers (``shape.width`` + virtual tokens of an embedding soft prompt).
        kv_len: positions each query attends to (``t`` + a prefix method's virtual tokens).
    """
    b, p = shape.rows, min(shape.shared_prefix, t - 1)
    h = int(getattr(hf, "hidden_size", 0) or getattr(hf, "n_embd", 0))
    i = int(getattr(hf, "intermediate_size", 0) or getattr(hf, "n_inner", 0) or 4 * h)
    n_layers = int(getattr(hf, "num_hidden_layers", 1))
    v = int(hf.vocab_size)
    elem = 2 if cfg.train.precision == "bf16" else 4  # matmul outputs follow autocast; norms and residuals fp32
    once = b // 2 * p if shape.pairs else p  # a preference batch runs each pair's prompt once, others one prefix
    rest = b * (t - p)  # positions run per row; the P shared ones run once, their keys/values repeated per row
    positions = rest + once
    kv_positions = b * kv_len + once  # keys/values: every row's full length (the repeated prefix too) + the prefix pass
    frozen = positions * (4 * 2 * h + elem * (2 * h + 3 * i)) + kv_positions * elem * 2 * h + rest * kv_len * 4
    extra = _trained_inputs(model, h, i)
    keep = range(first, n_layers)
    trained = sum(positions * (4 * extra.get(n, (0, 0))[0] + elem * extra.get(n, (0, 0))[1]) for n in keep)
    if cfg.train.gradient_checkpointing:
        top = max(keep, key=lambda n: sum(extra.get(n, (0, 0))), default=first)
        one = frozen + positions * (4 * extra.get(top, (0, 0))[0] + elem * extra.get(top, (0, 0))[1])
        layers = len(keep) * positions * h * 4 + (one if len(keep) else 0)
    else:
        layers = max(len(keep), 1) * frozen + trained  # with nothing kept, one frozen layer is still in flight in forward
    if shape.pairs:  # (2B, T-P, V) logits and their gradient, and an fp32 log-softmax (+ gradient) where labelled
        logits = b * (t - p) * v * elem * 2 + b * min(shape.labelled, t) * v * 4 * 2
    else:
        logits = head_loss_bytes(b, min(shape.labelled, t), v, elem, fused_loss_applies(cfg, model),
                                 checked_apart=shape.shared_prefix > 0)
    return float(layers + logits)


def fused_loss_applies(cfg: RunConfig, model: nn.Module) -> bool:
    """Whether a run of ``cfg`` takes its loss with the fused head + cross-entropy (what
    :meth:`peftkit.train.lm_head.HeadCapture.for_model` decides at run time): ``train.fused_loss``, a
    next-token run, not distributed, a head that is a plain ``nn.Linear`` (not adapted, not quantized or kept in
    low precision) and no soft-capping after it."""
    from peftkit.train.lm_head import output_head

    if not cfg.train.fused_loss or cfg.task != "causal_lm" or cfg.train.distributed in ("ddp", "fsdp"):
        return False
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):  # e.g. Gemma 2: the check finds it and keeps the plain loss
        return False
    head = output_head(model)
    marked = marked_storage(getattr(head, "weight", None)) is not None  # quantized on meta (QLoRA)
    return type(head) is nn.Linear and not marked


def head_loss_bytes(rows: int, labelled: int, vocab: int, elem: int, fused: bool, checked_apart: bool = False) -> int:
    """Bytes the LM head's output and the loss hold at a step's peak (the end of forward).

    Args:
        rows / labelled: B, and K the labelled positions per row (where the head runs).
        vocab: V.
        elem: bytes per element of the head's output (2 under bf16 autocast, else 4).
        fused: the fused loss (:func:`peftkit.train.lm_head.linear_cross_entropy_sum`): one chunk of n =
            :func:`~peftkit.train.lm_head.rows_per_chunk` (B x K, V) positions at a time, its head output
            (``elem``) and its fp32 log-softmax that becomes its gradient (4), and nothing of it afterwards. On
            the first batch the head's check (:class:`~peftkit.train.lm_head.HeadCapture`) also holds the logits
            it made: (B, K, V) when they fit one chunk, else (B, 1, V).
        checked_apart: the check ran on its own no-gradient batch (the shared-prefix check's two rows), away
            from the training step's peak.

    Plain loss: (B, K, V) three times: in forward the logits, the fp32 copy given to cross-entropy and its
    log-softmax (saved); in backward the log-softmax, its gradient and the gradient of the logits.
    """
    from peftkit.train.lm_head import rows_per_chunk

    positions = rows * labelled
    if not fused:
        return positions * vocab * (elem + 4 + 4)
    n = rows_per_chunk(positions, vocab)
    check = 0 if checked_apart else (positions if n == positions else rows) * vocab * elem
    return n * vocab * (elem + 4) + check


def measure_runtime_mb() -> float:
    """Peak RSS (MB) of a fresh Python that imports torch, transformers, datasets and peftkit's training
    modules: the fixed cost under every training run."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def predicted_peak_mb(cfg: RunConfig, model: nn.Module,
                      shape: BatchShape | Sequence[BatchShape] | None = None) -> float | None:
    """The predicted total for a run in progress (its real model, so nothing extra is allocated; ``shape``
    measured on its examples), or None when the model is one the estimate does not understand: reporting must
    never fail a finished run."""
    try:
        return round(predict_memory(cfg, model, shape).total, 1)
    except Exception:  # noqa: BLE001 - a prediction is informational only
        return None


__all__ = ["BatchShape", "MemoryBreakdown", "RUNTIME_MB", "assumed_shape", "build_meta_model", "data_shape",
           "expects_shared_prefix", "fused_loss_applies", "head_loss_bytes", "measure_runtime_mb", "measure_shape",
           "measure_shapes", "predict_memory", "predicted_peak_mb"]
