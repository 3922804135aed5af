"""Predict a training run's peak memory without loading the weights (``peftkit memory``).

The model is built on the meta device from its ``AutoConfig`` and the method is attached, so every
parameter's count, dtype and ``requires_grad`` are exact; only activations are estimated::

    total = runtime + weights + gradients + optimizer + activations
    weights     = sum(numel x element size)          over all (unique) parameters and buffers
    gradients   = sum(numel x element size)          over trainable parameters (fp32 adapters over any base)
    optimizer   = sum(2 x numel x element size)      AdamW's exp_avg and exp_avg_sq, in the parameter's dtype
    activations = layers_with_backward x B x T x per_token_layer + logits (+ one layer in flight)

``per_token_layer`` counts the tensors a decoder layer saves for backward (fp32; bf16 autocast halves the
matmul outputs): ~10 hidden + 4 intermediate + 2 kv-width values per token, plus the attention
weights (heads x T) that the CPU math attention kernel keeps when there is a padding mask. Layers below
the first trainable parameter keep nothing for backward when nothing below them trains (LoRA on the
upper layers, linear probe); anything trained at the input side (soft prompts, embeddings, prefixes,
a method in layer 0) needs every layer. Gradient checkpointing keeps only each layer's input plus one
layer recomputed during backward. The logits add (B, K, V) three times: the logits, the fp32 copy
passed to cross-entropy and its log-softmax (in backward: the log-softmax and two gradients), where K is
the positions the head runs at: all T when the loss covers every token (``data.train_on_prompt``, plain
text), else only the labelled ones (:mod:`peftkit.train.lm_head`), taken as T/4 since the prediction does
not read the data (a rotten-tomatoes answer is ~3 tokens; a chat reply can fill most of the row).

``runtime`` is the resident size of the Python + torch + transformers + peftkit stack before any model
is loaded (measured: :func:`measure_runtime_mb`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit.train.config import RunConfig

MB = 2**20
#: RSS of ``import torch, transformers, datasets`` + peftkit's training modules, measured with
#: :func:`measure_runtime_mb` on the reference machine (torch 2.13 CPU, transformers 5.23): 420 MB.
#: The tokenizer and the data fit in what that probe over-counts (a tiny-model run peaked at 556 MB
#: with ~150 MB of logits).
RUNTIME_MB = 420.0
#: bitsandbytes' CPU quantization of one layer allocates ~5.4x the layer's fp32 size in temporaries (measured:
#: +238 MB peak for a 2048 x 5632 layer, 44 MB in fp32); with the fp32 layer itself, ~6x.
QUANTIZE_TRANSIENT = 6

_LAYER_RE = re.compile(r"\.(?:layers|h|layer|block)\.(\d+)\.")
_PROBE = "import torch, transformers, datasets, peftkit.train.run, peftkit.cli.commands; " \
         "from peftkit.train.tracking import peak_memory_mb; print(peak_memory_mb())"


@dataclass
class MemoryBreakdown:
    """Predicted peak memory of one training process, in MB (2**20 bytes).

    Attributes:
        weights: all parameters and buffers (frozen + trainable) at their stored dtype.
        gradients: one fp32 gradient per trainable parameter.
        optimizer: AdamW's two fp32 states per trainable parameter.
        activations: tensors saved for backward, plus the logits and their gradient.
        runtime: the Python/torch/transformers process before the model is loaded.
        loading: the peak while loading: runtime + the fp32 checkpoint; for a quantized base (QLoRA),
            which is quantized layer by layer with each layer's file pages released once it is done,
            runtime + the quantized weights + the largest layer's quantization temporaries.
        total: the larger of loading and runtime + weights + gradients + optimizer + activations.
        trainable_params / frozen_params: parameter counts.
        layers_with_backward: decoder layers whose activations are kept for backward.
        tokens: batch_size x max_length (+ virtual tokens) of one micro-batch.
    """

    weights: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    loading: float
    total: float
    trainable_params: int
    frozen_params: int
    layers_with_backward: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("runtime (python/torch)", self.runtime), ("peak while loading", self.loading),
                ("total (peak)", self.total)]
        lines = [f"  {name:24s} {value:10,.1f} MB" for name, value in rows]
        lines.append(f"  trainable {self.trainable_params:,} / frozen {self.frozen_params:,} params; "
                     f"{self.layers_with_backward} layer(s) keep activations; {self.tokens} tokens per micro-batch")
        return "\n".join(lines)


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
    from peftkit.train.tasks import model_from_config

    try:
        with torch.device("meta"):
            return model_from_config(cfg, hf_config)  # the run's task class (a seq_cls head trains too)
    except PeftkitError:
        raise
    except (RuntimeError, NotImplementedError):  # e.g. Tensor.item() on a meta tensor
        return model_from_config(cfg, hf_config)


def predict_memory(cfg: RunConfig, model: nn.Module | None = None) -> MemoryBreakdown:
    """Predict the peak memory of ``peftkit train`` for ``cfg`` (one process, CPU RSS).

    Args:
        cfg: the run config (model, method, data.max_length, train.batch_size/precision/gradient_checkpointing).
        model: the model with the method attached (any device, meta included); built from ``cfg`` if None.

    Returns:
        The breakdown in MB.
    """
    model = build_meta_model(cfg) if model is None else model
    weights, trainable, frozen, grad_bytes = _parameter_bytes(model)
    checkpoint = 4 * (trainable + frozen)  # load_model reads fp32
    method = cfg.method_config()
    hf = model.config
    n_layers = int(getattr(hf, "num_hidden_layers", 1))
    first = _first_trainable_layer(model, n_layers)
    keep = n_layers - first
    virtual = int(getattr(method, "num_virtual_tokens", 0) or 0)
    prefix_kind = getattr(method, "kind", None) if virtual else None  # soft prompts: "embeddings" or "prefix"
    t = cfg.data.max_length + (virtual if virtual and prefix_kind != "prefix" else 0)
    kv_len = t + (virtual if prefix_kind == "prefix" else 0)
    tokens = cfg.train.batch_size * t
    act = _activation_bytes(hf, cfg, keep, t, kv_len)
    parts = {
        "weights": weights / MB,
        "gradients": grad_bytes / MB,
        "optimizer": _optimizer_bytes(model) / MB,
        "activations": act / MB,
        "runtime": RUNTIME_MB,
    }
    if cfg.train.precision == "bf16":  # autocast caches a bf16 copy of every trainable weight it casts
        parts["activations"] += 2 * _trainable_numel(model, torch.float32) / MB
    train = sum(parts.values())
    largest = _largest_quantized(model)
    if largest:  # quantized one layer at a time as its pages are read (methods/qlora.py): never the whole fp32 file
        loading = RUNTIME_MB + (weights + QUANTIZE_TRANSIENT * 4 * largest) / MB
    else:
        loading = RUNTIME_MB + checkpoint / MB
    return MemoryBreakdown(**parts, loading=loading, total=max(train, loading), trainable_params=trainable,
                           frozen_params=frozen, layers_with_backward=keep, tokens=tokens)


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _optimizer_bytes(model: nn.Module) -> int:
    """AdamW's exp_avg and exp_avg_sq: torch keeps them in each parameter's dtype (fp32 adapters: 8 bytes
    per parameter; full fine-tuning of a bf16 model: 4)."""
    return sum(2 * p.numel() * p.element_size() for p in _unique_parameters(model) if p.requires_grad)


def _trainable_numel(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in _unique_parameters(model) if p.requires_grad and p.dtype == dtype)


def _largest_quantized(model: nn.Module) -> int:
    """Values of the largest weight stored quantized (bitsandbytes, or marked so on the meta device); 0 if none."""
    sizes = [_logical_numel(p) for p in _unique_parameters(model)
             if getattr(p, "peftkit_stored_bytes", None) is not None or getattr(p, "quant_state", None) is not None
             or isinstance(getattr(p, "SCB", None), torch.Tensor)]
    return max(sizes, default=0)


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
    declared = getattr(p, "peftkit_stored_bytes", None)
    if declared is not None:  # a meta weight that a method will store quantized (QLoRA)
        return int(declared)
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


def _head_positions(cfg: RunConfig, t: int) -> int:
    """Positions per row the LM head runs at: every one when every token is labelled, else a quarter (the
    labelled response; see the module docstring)."""
    every = cfg.data.train_on_prompt or cfg.data.format == "text"
    return t if every else max(1, t // 4)


def _activation_bytes(hf: Any, cfg: RunConfig, keep: int, t: int, kv_len: int) -> float:
    """Bytes saved for backward by the decoder layers, the logits and the loss, for one micro-batch."""
    b = cfg.train.batch_size
    h = int(getattr(hf, "hidden_size", 0) or getattr(hf, "n_embd", 0))
    i = int(getattr(hf, "intermediate_size", 0) or getattr(hf, "n_inner", 0) or 4 * h)
    heads = int(getattr(hf, "num_attention_heads", 0) or getattr(hf, "n_head", 1))
    kv_heads = int(getattr(hf, "num_key_value_heads", 0) or heads)
    kv = h * kv_heads // heads
    v = int(hf.vocab_size)
    bf16 = cfg.train.precision == "bf16"
    elem = 2 if bf16 else 4
    # norms keep fp32 (x, normalised x); projections, attention and MLP outputs follow autocast
    per_token = 4 * 4 * h + elem * (6 * h + 4 * i + 2 * kv) + 4 * 2 * heads * kv_len
    layer = b * t * per_token
    if cfg.train.gradient_checkpointing:
        layers = keep * b * t * h * 4 + (layer if keep else 0)
    else:
        layers = max(keep, 1) * layer  # with nothing kept, one frozen layer is still in flight in forward
    # (B, K, V) three times at the peak: in forward the logits, the fp32 copy given to cross-entropy and
    # its log-softmax (saved); in backward the log-softmax, its gradient and the gradient of the logits
    logits = b * _head_positions(cfg, t) * v * (elem + 4 + 4)
    return float(layers + logits)


def measure_runtime_mb() -> float:
    """Peak RSS (MB) of a fresh Python that imports torch, transformers, datasets and peftkit's training
    modules: the fixed cost under every training run."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def predicted_peak_mb(cfg: RunConfig, model: nn.Module) -> float | None:
    """The predicted total for a run in progress (its real model, so nothing extra is allocated), or None
    when the model is one the estimate does not understand: reporting must never fail a finished run."""
    try:
        return round(predict_memory(cfg, model).total, 1)
    except Exception:  # noqa: BLE001 - a prediction is informational only
        return None


__all__ = ["MemoryBreakdown", "RUNTIME_MB", "build_meta_model", "measure_runtime_mb", "predict_memory", "predicted_peak_mb"]
