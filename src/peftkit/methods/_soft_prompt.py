r"""What the soft-prompt methods (prompt tuning, P-tuning, prefix tuning) share: one adapter layer, two hooks.

A soft prompt is N trainable "virtual tokens" that the frozen model reads before the caller's tokens::

    embeddings kind (prompt tuning, P-tuning):   [P_1 .. P_N, e(x_1) .. e(x_T)]   fed as inputs_embeds
    prefix kind (prefix tuning):                 every layer l attends to [K^l_1..K^l_N, k(x)..], [V^l_1..V^l_N, v(x)..]

Nothing is re-declared per architecture. :class:`SoftPromptLayer` wraps the model's input embedding (so the
generic wrapping, freezing, saving and unloading of ``peftkit.core`` apply) and owns, per adapter, a module
whose ``forward()`` returns the virtual-token table (N, width). Two hooks on the top-level model do the rest:

* a forward *pre*-hook prepends the prompt to the embedded inputs (or, for prefixes, passes a transformers
  ``Cache`` pre-filled with the per-layer keys/values), and extends ``attention_mask``, ``position_ids``,
  ``labels`` and ``token_type_ids`` to match;
* a forward hook strips the virtual positions from ``logits``, so logits stay aligned with the caller's
  ``input_ids``: the training loop, classification by likelihood and ``generate`` need no per-method code.

Positions follow Hugging Face PEFT so logits agree with it: virtual tokens take positions 0..N-1 and the
caller's tokens N + (their own positions). Given explicit ``position_ids`` (as ``generate`` passes, counted
from the attention mask) the real tokens keep their padding-aware positions, so a left-padded batch
generates exactly what each row generates alone.

With a KV cache the prompt is added once: a cache that already holds it carries a marker, and later
steps only extend the attention mask and positions. For encoder-decoder models (T5) the embeddings kind
prepends to the encoder input (a hook on ``get_encoder()``, which ``generate`` calls on its own) and the
prefix kind prefixes the decoder's self-attention, with PEFT's layer-to-row layout (``Geometry.prefix_slot``).

Files are PEFT's: one tensor ``prompt_embeddings`` holding the table (for P-tuning and projected prefixes
the encoder's *output*, as PEFT stores it), written and read through the config's ``to_file`` /
``from_file`` hooks of ``peftkit.core.io``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import torch
import torch.nn as nn

from peftkit.core.adapter import AdapterLayer, adapter_parameters
from peftkit.core.config import MethodConfig, check
from peftkit.core.inject import replace_module
from peftkit.core.io import PREFIX as FILE_PREFIX
from peftkit.core.labels import IGNORE
from peftkit.errors import AdapterFileError, ConfigError, PeftkitError

FILE_KEY = "prompt_embeddings"  # PEFT's single tensor for every prompt-learning method
ENCODER_PREFIX = "prompt_encoder."  # optional extra keys: the encoder itself, to resume training
CACHE_MARK = "_peftkit_virtual_tokens"  # set on a Cache object that holds the virtual tokens

EMBEDDINGS = "embeddings"
PREFIX = "prefix"


# -- configs ---------------------------------------------------------------------------------------


@dataclass
class SoftPromptConfig(MethodConfig):
    """Fields of every soft-prompt method.

    Attributes:
        num_virtual_tokens: N, how many virtual tokens (typically 10-100).
        save_encoder: also write the reparameterizing encoder (P-tuning's MLP/LSTM, prefix tuning's MLP) to the
            adapter file, so that training can resume from it. The file stays loadable by PEFT, which reads the
            table ``prompt_embeddings`` only.
    """

    num_virtual_tokens: int = 20
    save_encoder: bool = False

    def validate(self) -> None:
        n = self.num_virtual_tokens
        check(isinstance(n, int) and not isinstance(n, bool) and n > 0,
              f"method.num_virtual_tokens must be a positive integer, got {n!r}")

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    # -- what a method provides ---------------------------------------------------------------
    #: ``"embeddings"`` (virtual tokens are input embeddings) or ``"prefix"`` (per-layer keys/values)
    virtual_token_kind: ClassVar[str] = EMBEDDINGS

    def make_encoder(self, model: nn.Module, embedding: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The module computing the (N, width) table from trainable parameters."""
        raise NotImplementedError

    def peft_fields(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The method's own fields of PEFT's adapter_config.json."""
        raise NotImplementedError

    # -- PEFT adapter_config.json ----------------------------------------------------------------
    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        geo = Geometry.of(model)
        prefix = self.virtual_token_kind == PREFIX
        return {
            "peft_type": self.peft_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            # for prefixes PEFT's token_dim/num_attention_heads describe the keys/values (GQA: the kv heads)
            "token_dim": geo.kv_dim if prefix else geo.hidden,
            "num_attention_heads": geo.kv_heads if prefix else geo.heads,
            "num_layers": geo.layers,
            # PEFT's default per task type; prompt tables of encoder-decoders are written with N rows, not 2N
            "num_transformer_submodules": geo.prefix_submodules if prefix else 1,
            "modules_to_save": None,
            **self.peft_fields(),
        }

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return True

    @staticmethod
    def common_from_peft(d: dict[str, Any]) -> dict[str, Any]:
        if d.get("modules_to_save"):
            raise ConfigError("adapter_config.json uses 'modules_to_save', which peftkit's soft prompts do not support")
        return {"num_virtual_tokens": int(d.get("num_virtual_tokens") or 20)}

    # -- file hooks of peftkit.core.io ----------------------------------------------------------
    def to_file(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's layout: the table as ``prompt_embeddings`` (+ the encoder's weights with ``save_encoder``)."""
        encoder = find_layer(model).prompt_encoder[adapter_name]
        out = {FILE_KEY: encoder().detach()}
        if self.save_encoder and not isinstance(encoder, PromptTable):
            out.update({ENCODER_PREFIX + k: v.detach() for k, v in encoder.state_dict().items()})
        return out

    def from_file(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a file's tensors onto the adapter's parameters.

        A file with the encoder's weights restores the encoder (training can go on); otherwise the adapter becomes
        a plain table holding ``prompt_embeddings``, as in PEFT's inference mode.
        """
        layer = find_layer(model)
        name = layer_name(model)
        encoder = layer.prompt_encoder[adapter_name]
        if FILE_KEY not in tensors:
            raise AdapterFileError(f"tensor {FILE_KEY!r} is missing (not a prompt-learning adapter?)")
        extra = sorted(k for k in tensors if k != FILE_KEY and not k.startswith(ENCODER_PREFIX))
        if extra:
            raise AdapterFileError(f"tensor {extra[0]!r} does not belong to a {self.method_name} adapter")
        has_encoder = any(k.startswith(ENCODER_PREFIX) for k in tensors) and not isinstance(encoder, PromptTable)
        self.save_encoder = has_encoder  # saved again the way it came
        if not has_encoder:
            table = _fit_table(tensors[FILE_KEY], encoder.num_rows, encoder.width)
            new = PromptTable(encoder.num_rows, encoder.width, encoder.kind, encoder.geometry)
            dtype = encoder.embedding.weight.dtype
            layer.prompt_encoder[adapter_name] = new.to(device=layer.weight.device, dtype=dtype)
            tensors = {f"{ENCODER_PREFIX}embedding.weight": table}
        keys = {k for k, _ in adapter_parameters(model, adapter_name)}
        mapped = {}
        for key, t in tensors.items():
            if key == FILE_KEY:
                continue
            target = f"{name}.{key}"
            if target not in keys:
                raise AdapterFileError(f"tensor {key!r} does not fit this {self.method_name} adapter's encoder")
            mapped[FILE_PREFIX + target] = t
        return mapped


def _fit_table(table: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    # PEFT's encoder-decoder files may hold rows for 2 "transformer submodules"; only the first N are ever used
    if table.ndim == 2 and table.shape[1] == width and table.shape[0] > rows and table.shape[0] % rows == 0:
        table = table[:rows]
    if tuple(table.shape) != (rows, width):
        raise AdapterFileError(f"tensor {FILE_KEY!r} has shape {tuple(table.shape)} but this model expects "
                               f"({rows}, {width}) (adapter made for another model or num_virtual_tokens?)")
    return table


# -- model geometry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Sizes a soft prompt needs, read from the model's config (the decoder's, for encoder-decoders)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    encoder_decoder: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        """Width of one prefix row: 2·layers (key, value) slots of kv_dim each."""
        return self.layers * 2 * self.kv_dim

    @property
    def prefix_submodules(self) -> int:
        """PEFT's ``num_transformer_submodules`` for prefixes: 2 for encoder-decoders, 1 otherwise."""
        return 2 if self.encoder_decoder else 1

    def prefix_slot(self, layer: int) -> int:
        """Which of a prefix row's 2·layers slots holds ``layer``'s key (its value is the next slot).

        Decoder-only models: layer l takes slots 2l, 2l+1. Encoder-decoders follow PEFT (``get_prompt`` with
        ``num_transformer_submodules=2``): it repeats the 2L slots to 4L, cuts them into L groups of (self key,
        self value, cross key, cross value) and keeps only the self-attention pair (the cross-attention cache is
        replaced by an empty one). So decoder layer l takes slots 4l mod 2L and 4l mod 2L + 1: with an even
        number of layers (every released T5), layers l and l + L/2 share one prefix and half the slots are unused.
        """
        return (2 * self.prefix_submodules * layer) % (2 * self.layers)

    @staticmethod
    def of(model: nn.Module) -> Geometry:
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError("soft prompts need a Hugging Face transformers model (with a .config)")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        encdec = bool(getattr(config, "is_encoder_decoder", False))

        def first(*names: str) -> Any:
            return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head", "num_heads")
        layers = (first("num_decoder_layers") if encdec else None) or first("num_hidden_layers", "n_layer", "num_layers")
        if not (hidden and heads and layers):
            raise ConfigError(f"cannot read hidden size, heads and layers from {type(config).__name__}")
        kv_heads = first("num_key_value_heads") or heads
        head_dim = first("head_dim", "d_kv") or hidden // heads
        return Geometry(hidden, layers, heads, kv_heads, head_dim, encdec)


# -- the per-adapter table modules ----------------------------------------------------------------


class PromptSource(nn.Module):
    """Base of the per-adapter modules: ``forward()`` gives the (num_rows, width) virtual-token table.

    Attributes:
        kind: ``"embeddings"`` (rows are input embeddings) or ``"prefix"`` (rows are per-layer keys/values).
        geometry: the model sizes, to cut prefix rows into layers.
        num_rows: N, the number of virtual tokens.
        width: the row width (hidden size, or layers x 2 x kv_dim for prefixes).
    """

    def __init__(self, rows: int, width: int, kind: str, geometry: Geometry) -> None:
        super().__init__()
        self.kind, self.geometry, self.num_rows, self.width = kind, geometry, rows, width


class PromptTable(PromptSource):
    """A plain lookup table: prompt tuning's virtual tokens, or any method's saved output (PEFT's inference mode)."""

    def __init__(self, rows: int, width: int, kind: str, geometry: Geometry) -> None:
        super().__init__(rows, width, kind, geometry)
        self.embedding = nn.Embedding(rows, width)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, width)


# -- the adapter layer ----------------------------------------------------------------------------------


class SoftPromptLayer(AdapterLayer):
    """Wraps the model's input embedding; holds each soft-prompt adapter's table module and the model hooks.

    The wrapper embeds exactly like the embedding it wraps: the virtual tokens are added by the hooks on
    the top-level model, which this layer installs and removes (``release``).
    """

    adapter_attrs = ("prompt_encoder",)

    def __init__(self, base_layer: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_encoder = nn.ModuleDict()
        self._calls: list[_Call | None] = []
        self._handles = _install_hooks(self, model)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def release(self) -> nn.Module:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base_layer

    def active_encoder(self) -> nn.Module | None:
        """The active adapter's table module; None when adapters are disabled or none is active."""
        active = self.use_adapters()
        if len(active) > 1:
            raise PeftkitError(f"only one soft prompt can be active at a time, got {', '.join(active)}")
        return self.prompt_encoder[active[0]] if active else None

    @staticmethod
    def prompt_rows(encoder: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The virtual-token table in the model's dtype: (N, width)."""
        return encoder().to(dtype)


def find_layer(model: nn.Module) -> SoftPromptLayer:
    for mod in model.modules():
        if isinstance(mod, SoftPromptLayer):
            return mod
    raise ValueError("this model has no soft prompt")


def layer_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, SoftPromptLayer))


def attach_soft_prompt(model: nn.Module, config: SoftPromptConfig, adapter_name: str) -> list[str]:
    """Wrap the input embedding (once) and add ``adapter_name``'s table module; returns the wrapped path.

    Raises:
        ConfigError: the model is not a language model with input and output embeddings, or its input
            embedding is already adapted by another method.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if embedding is None or not callable(get_out) or get_out() is None:
        raise ConfigError(f"{config.method_name} needs a language model with an LM head (…ForCausalLM or "
                          f"…ForConditionalGeneration); {type(model).__name__} has none")
    name = next(n for n, m in model.named_modules() if m is embedding)
    if isinstance(embedding, AdapterLayer) and not isinstance(embedding, SoftPromptLayer):
        raise ConfigError(f"module {name!r} is already adapted by another method ({type(embedding).__name__})")
    base = embedding.base_layer if isinstance(embedding, SoftPromptLayer) else embedding
    dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
    # built before wrapping, so that a config the model refuses leaves the model untouched
    encoder = config.make_encoder(model, base).to(device=base.weight.device, dtype=dtype)
    encoder.train(model.training)
    if isinstance(embedding, SoftPromptLayer):
        layer = embedding
    else:
        layer = SoftPromptLayer(embedding, model)
        replace_module(model, name, layer)
    layer.prompt_encoder[adapter_name] = encoder
    return [name]


# -- hooks ------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """What the pre-hook did, for the forward hook: how many logits positions to keep, what to restore."""

    keep: int | None = None  # keep the last `keep` logits positions (the caller's tokens)
    n: int = 0
    readonly: Any = None  # the read-only prefix cache passed in, if any
    restore: list[tuple[Any, str, Any]] | None = None


def _install_hooks(layer: SoftPromptLayer, model: nn.Module) -> list[Any]:
    params = inspect.signature(model.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kw = {**dict(zip(names, args)), **kwargs}
        layer._calls.append(None)  # pushed first: the forward hook pops even if this hook raises
        call = layer._calls[-1] = _before_forward(layer, module, kw)
        return ((), kw) if call is not None else None

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = layer._calls.pop() if layer._calls else None
        return _after_forward(call, output) if call is not None else None

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True, always_call=True)]
    if getattr(model.config, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None)):
        encoder = model.get_encoder()
        enc_names = [n for n, p in inspect.signature(encoder.forward).parameters.items()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        def enc_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            kw = {**dict(zip(enc_names, args)), **kwargs}
            return ((), kw) if _before_encoder(layer, kw) else None

        handles.append(encoder.register_forward_pre_hook(enc_pre, with_kwargs=True))
    return handles


def _before_forward(layer: SoftPromptLayer, model: nn.Module, kw: dict[str, Any]) -> _Call | None:
    """Rewrite the top-level model's keyword arguments in place; None when there is nothing to do."""
    encoder = layer.active_encoder()
    if encoder is None:
        return None
    n = encoder.num_rows
    cache = kw.get("past_key_values")
    if encoder.geometry.encoder_decoder:
        return _before_encdec(layer, model, encoder, kw, n)
    if _cache_len(cache) > 0:  # a later generation step: the prompt is in the cache already (if marked)
        if getattr(cache, CACHE_MARK, None) == n:
            _extend_mask(kw, "attention_mask", n)
            _shift_positions(kw, "position_ids", n)
        return _Call()
    _refuse_packing(kw)
    if encoder.kind == PREFIX:
        return _prefix(layer, model, encoder, kw, n, "attention_mask", "position_ids")
    return _prepend(layer, encoder, kw, n)


def _prepend(layer: SoftPromptLayer, encoder: nn.Module, kw: dict[str, Any], n: int) -> _Call:
    """Decoder-only prompt: [prompt, embed(inputs)] as inputs_embeds, the other inputs extended to match."""
    embeds = _embed(layer, kw)  # (B, T, D)
    batch, length = embeds.shape[:2]
    prompt = layer.prompt_rows(encoder, embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, N, D)
    kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, N+T, D)
    kw["input_ids"] = None
    _extend_mask(kw, "attention_mask", n)
    if kw.get("position_ids") is not None:
        pos = kw["position_ids"]  # (B or 1, T)
        virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
        kw["position_ids"] = torch.cat([virtual, pos + n], dim=-1)
    for key, fill in (("labels", IGNORE), ("token_type_ids", 0)):
        if kw.get(key) is not None:
            t = kw[key]
            kw[key] = torch.cat([t.new_full((t.shape[0], n), fill), t], dim=1)
    if isinstance(kw.get("past_key_values"), _cache_types()):
        setattr(kw["past_key_values"], CACHE_MARK, n)
    return _Call(keep=length, n=n)


def _prefix(layer: SoftPromptLayer, model: nn.Module, encoder: nn.Module, kw: dict[str, Any], n: int,
            mask_key: str, position_key: str) -> _Call:
    """Pass the per-layer prefix as a pre-filled cache; extend the mask and shift the positions by N."""
    geo = encoder.geometry
    names: tuple[str, ...] = ("input_ids", "inputs_embeds")  # any input with the batch size
    if geo.encoder_decoder:  # labels alone are fine too: the model shifts them into decoder_input_ids
        names = ("decoder_input_ids", "decoder_inputs_embeds", "labels", *names, "encoder_outputs")
    ref = next((kw[k] for k in names if kw.get(k) is not None), None)
    if ref is None:
        raise PeftkitError("prefix tuning needs input_ids or inputs_embeds (for encoder-decoders also "
                           "decoder_input_ids, labels or encoder_outputs)")
    batch = (ref if isinstance(ref, torch.Tensor) else ref[0]).shape[0]  # encoder_outputs: (hidden states, ...)
    dtype = layer.base_layer.weight.dtype
    keys, values = _prefix_states(layer.prompt_rows(encoder, dtype), geo, batch)
    call = _Call()
    use_cache = kw.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(model.config, "use_cache", False))
    restore = _checkpointing_keeps_cache(model)
    if not use_cache or restore is not None:
        cache = _ReadOnlyPrefix(keys, values)  # replayed as is by gradient checkpointing's recompute
        call.readonly, call.restore = cache, restore
        full = _wrap_encdec(cache) if geo.encoder_decoder else cache
    else:
        full = kw.get("past_key_values")
        if full is None:
            from transformers import DynamicCache, EncoderDecoderCache

            full = EncoderDecoderCache(DynamicCache(), DynamicCache()) if geo.encoder_decoder else DynamicCache()
        self_cache = getattr(full, "self_attention_cache", full)
        for i, (k, v) in enumerate(zip(keys, values)):
            self_cache.update(k, v, i)
        setattr(full, CACHE_MARK, n)
    kw["past_key_values"] = full
    _extend_mask(kw, mask_key, n)
    _shift_positions(kw, position_key, n)
    return call


def _before_encdec(layer: SoftPromptLayer, model: nn.Module, encoder: nn.Module, kw: dict[str, Any], n: int) -> _Call:
    cache = kw.get("past_key_values")
    if encoder.kind == EMBEDDINGS:
        # the encoder hook prepends to the encoder's input; here the encoder mask (used by cross-attention) must
        # cover the virtual tokens too
        mask = kw.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            outputs = kw.get("encoder_outputs")
            if outputs is not None:
                real = outputs[0].shape[1] - n
            else:
                real = _embed_ref_len(kw, "input_ids", "inputs_embeds")
            if mask.shape[1] == real:
                _extend_mask(kw, "attention_mask", n)
        return _Call()
    if _cache_len(cache) > 0:
        if getattr(cache, CACHE_MARK, None) == n:
            _extend_mask(kw, "decoder_attention_mask", n)
        return _Call()
    return _prefix(layer, model, encoder, kw, n, "decoder_attention_mask", "decoder_position_ids")


def _before_encoder(layer: SoftPromptLayer, kw: dict[str, Any]) -> bool:
    """Encoder of an encoder-decoder: prepend the prompt to its input (the mask may already cover it)."""
    encoder = layer.active_encoder()
    if encoder is None or encoder.kind != EMBEDDINGS:
        return False
    n = encoder.num_rows
    embeds = _embed(layer, kw)  # (B, T, D)
    prompt = layer.prompt_rows(encoder, embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    kw["input_ids"] = None
    mask = kw.get("attention_mask")
    if mask is not None and mask.shape[-1] == embeds.shape[1]:
        _extend_mask(kw, "attention_mask", n)
    return True


def _after_forward(call: _Call, output: Any) -> Any:
    for obj, attr, value in reversed(call.restore or []):
        if value is _UNSET:
            obj.__dict__.pop(attr, None)
        else:
            setattr(obj, attr, value)
    if call.keep is None and call.readonly is None:
        return None
    if isinstance(output, tuple):  # return_dict=False: the logits are the first 3D tensor (after the loss)
        i = next((i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.ndim == 3), None)
        if call.keep is not None and i is not None and output[i].shape[1] > call.keep:
            output = (*output[:i], output[i][:, -call.keep:], *output[i + 1:])
        return output
    logits = getattr(output, "logits", None)
    if call.keep is not None and logits is not None and logits.shape[1] > call.keep:
        output.logits = logits[:, -call.keep:]  # (B, T, V): aligned with the caller's input_ids
    cache = getattr(output, "past_key_values", None)
    if cache is not None and call.readonly is not None and (cache is call.readonly or
                                                          getattr(cache, "self_attention_cache", None) is call.readonly):
        output.past_key_values = None  # the read-only prefix is no cache to continue from
    elif cache is not None and call.keep is not None:
        setattr(cache, CACHE_MARK, call.n)
    return output


# -- small helpers --------------------------------------------------------------------------------------


def _embed(layer: SoftPromptLayer, kw: dict[str, Any]) -> torch.Tensor:
    if kw.get("inputs_embeds") is not None:
        return kw["inputs_embeds"]
    if kw.get("input_ids") is None:
        raise PeftkitError("a soft prompt needs input_ids or inputs_embeds")
    return layer(kw["input_ids"])  # through the wrapper: hooks on the input embedding still run


def _embed_ref_len(kw: dict[str, Any], ids_key: str, embeds_key: str) -> int:
    if kw.get(ids_key) is not None:
        return kw[ids_key].shape[1]
    return kw[embeds_key].shape[1] if kw.get(embeds_key) is not None else -1


def _extend_mask(kw: dict[str, Any], key: str, n: int) -> None:
    mask = kw.get(key)
    if mask is None:
        return
    if mask.ndim != 2:
        raise PeftkitError(f"soft prompts need a 2D {key} (batch, length), got shape {tuple(mask.shape)}")
    kw[key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, N+T)


def _shift_positions(kw: dict[str, Any], key: str, n: int) -> None:
    if kw.get(key) is not None:
        kw[key] = kw[key] + n


def _refuse_packing(kw: dict[str, Any]) -> None:
    pos = kw.get("position_ids")
    if pos is not None and kw.get("attention_mask") is None and pos.shape[-1] > 1 and bool((pos.diff(dim=-1) != 1).any()):
        raise PeftkitError("soft prompts cannot be trained on packed rows (data.packing): only the first example "
                           "of a row would see the virtual tokens; set data.packing=false")


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _cache_types() -> tuple[type, ...]:
    from transformers import Cache

    return (Cache,)


def _prefix_states(rows: torch.Tensor, geo: Geometry, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(N, layers*2*kv_dim) rows -> per-layer keys and values, each (B, kv_heads, N, head_dim), in PEFT's order
    (see :meth:`Geometry.prefix_slot` for encoder-decoders)."""
    n = rows.shape[0]
    states = rows.view(n, geo.layers * 2, geo.kv_heads, geo.head_dim).permute(1, 2, 0, 3)  # (2L, H, N, hd)
    states = states.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, N, hd)
    slots = [geo.prefix_slot(i) for i in range(geo.layers)]
    return [states[s] for s in slots], [states[s + 1] for s in slots]


def _wrap_encdec(cache: Any) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(cache, DynamicCache())


def _checkpointing_keeps_cache(model: nn.Module) -> list[tuple[Any, str, Any]] | None:
    """With gradient checkpointing in training, transformers drops the cache inside checkpointed layers (it
    would be written twice by the recompute). The read-only prefix is safe to replay, so let it through for this
    call; returns what to restore afterwards (None when checkpointing is off)."""
    if not model.training:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        return None
    restore: list[tuple[Any, str, Any]] = []
    for m in layers:
        # transformers' documented switch for layers that only read the cache
        restore.append((m, "_can_checkpoint_with_cache", m.__dict__.get("_can_checkpoint_with_cache", _UNSET)))
        m._can_checkpoint_with_cache = True
    for m in model.modules():
        # model-level flags that also withhold the cache from checkpointed layers (GPT-2); the layers still
        # checkpoint themselves
        if not isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False) is True:
            restore.append((m, "gradient_checkpointing", True))
            m.gradient_checkpointing = False
    return restore


_UNSET = object()


def _ReadOnlyPrefix(keys: list[torch.Tensor], values: list[torch.Tensor]) -> Any:  # noqa: N802 - a class factory
    return _readonly_cache_class()(keys, values)


@cache
def _readonly_cache_class() -> type:
    # built on first use: transformers is imported only when a soft prompt runs
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    class _PrefixLayer(DynamicLayer):
        """A cache layer holding fixed keys/values: ``update`` returns [prefix, new] and stores nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)  # (B, H, N+T, hd)
            values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
            return keys, values

    class ReadOnlyPrefix(DynamicCache):
        """A cache of per-layer prefix keys/values that forward passes read but never grow."""

        def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
            Cache.__init__(self, layers=[_PrefixLayer(k, v) for k, v in zip(keys, values)])

    return ReadOnlyPrefix
