r"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al. 2021,
https://arxiv.org/abs/2005.00247 for the FFN-only placement).

A small residual MLP is inserted on the output of a sublayer (attention, feed-forward)::

    h ──┬──────────────────────────────────────────────┐
        └─► dropout ─► down (d → k) ─► σ ─► up (k → d) ─► · s ─(+)──► h + s·up(σ(down(h)))

k (``size``) is much smaller than d. Houlsby's near-identity init: down ~ N(0, 0.01²) truncated at 2σ,
biases zero, and up = 0 here (not just near zero), so the model is exactly the base at init.

Where adapters go (``placement``: "both" = Houlsby, "ffn" = Pfeiffer, "attention"), per model family:

* Llama-family (``self_attn``, ``mlp``) and GPT-2 (``attn``, ``mlp``): the attention or MLP module is wrapped,
  so the adapter acts on its output before the block's residual add. Attention modules return tuples;
  only the hidden states (item 0) pass through the adapter.
* BERT (``attention.output.dense``, ``output.dense``): BertSelfOutput / BertOutput do dense -> dropout ->
  LayerNorm(h + residual) in one forward, so the adapter wraps the ``dense`` sublayer: it sits before the
  residual and LayerNorm as in Houlsby, but before the dropout rather than after it (the same at eval).
* T5 (``SelfAttention``/``EncDecAttention``, ``DenseReluDense``).

``attention_modules`` / ``ffn_modules`` choose the modules for any other model. The adapter is a nonlinear
function of the activations, so it cannot be merged into the base weights: ``merge`` raises
NotMergeableError. peftkit saves it as an ``adapter_config.json`` of its own type (PEFT has no such method).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from peftkit.core.adapter import AdapterLayer
from peftkit.core.config import ConfigError, MethodConfig, check, from_dict
from peftkit.core.inject import wrap_modules
from peftkit.core.registry import register
from peftkit.core.targeting import TargetSpec, find_targets, is_linear_like, name_matches

# (attention modules, FFN modules) per model family, as regexes over whole module names.
FAMILY_MODULES: dict[str, tuple[str, str]] = {
    "llama": (r".*\.self_attn", r".*\.mlp"),
    "gpt2": (r".*\.h\.\d+\.attn", r".*\.h\.\d+\.mlp"),
    "bert": (r".*\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "t5": (r".*\.(SelfAttention|EncDecAttention)", r".*\.DenseReluDense"),
}
for _family in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"):
    FAMILY_MODULES[_family] = FAMILY_MODULES["llama"]
for _family in ("roberta", "xlm-roberta", "electra"):
    FAMILY_MODULES[_family] = FAMILY_MODULES["bert"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

#: The ``peft_type`` written into peftkit's own adapter files (PEFT cannot load these).
FILE_TYPE = "PEFTKIT_BOTTLENECK_ADAPTER"


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapter settings.

    Attributes:
        size: bottleneck width k (> 0); each adapter adds about 2·d·k parameters.
        activation: the nonlinearity σ: "relu" (Houlsby), "gelu", "silu" or "tanh".
        placement: "both" (after attention and after the FFN: Houlsby), "ffn" (Pfeiffer) or "attention".
        scaling: s, the factor on the adapter's output.
        dropout: dropout on the adapter's input (0 disables it).
        init_std: standard deviation of the down-projection's init (truncated at 2σ); up starts at zero.
        attention_modules: the attention modules to follow (names/suffixes or a regex, as ``target_modules``);
            None: the family's (see the module docstring).
        ffn_modules: the feed-forward modules to follow, same rules.
        layers: only adapt these transformer-block indices.
        modules_to_save: extra base modules trained fully and saved with the adapter.
    """

    default_lr = 1e-3

    peft_type = FILE_TYPE

    size: int = 64
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    placement: Literal["both", "attention", "ffn"] = "both"
    scaling: float = 1.0
    dropout: float = 0.0
    init_std: float = 1e-2
    attention_modules: list[str] | str | None = None
    ffn_modules: list[str] | str | None = None
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        check(isinstance(self.size, int) and self.size > 0, f"method.size must be a positive integer, got {self.size!r}")
        check(self.activation in ACTIVATIONS,
              f"method.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        check(self.placement in ("both", "attention", "ffn"),
              f"method.placement must be both, attention or ffn, got {self.placement!r}")
        check(0.0 <= self.dropout < 1.0, f"method.dropout must be in [0, 1), got {self.dropout!r}")
        check(self.init_std >= 0.0, f"method.init_std must be >= 0, got {self.init_std!r}")

    def module_specs(self, model: nn.Module) -> list[tuple[str, TargetSpec]]:
        """``[(kind, target spec)]`` to wrap, kind "attention" and/or "ffn" as ``placement`` says."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        family = FAMILY_MODULES.get(model_type or "")
        attn = self.attention_modules if self.attention_modules is not None else family and family[0]
        ffn = self.ffn_modules if self.ffn_modules is not None else family and family[1]
        wanted = {"both": ("attention", "ffn"), "attention": ("attention",), "ffn": ("ffn",)}[self.placement]
        specs = []
        for kind, spec in (("attention", attn), ("ffn", ffn)):
            if kind not in wanted:
                continue
            if not spec:
                raise ConfigError(f"bottleneck adapters do not know where the {kind} modules of model type "
                                  f"{model_type!r} are: set method.{kind}_modules")
            specs.append((kind, spec))
        return specs

    # -- adapter_config.json (peftkit's own type) ---------------------------------------
    def to_peft(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        # the exact modules adapted (layers already applied), so the file means the same on any model version
        for kind, spec in self.module_specs(model):
            fields[f"{kind}_modules"] = [t for t in targets if name_matches(t, spec)]
        fields["layers"] = None
        return {"peft_type": FILE_TYPE, "peftkit_method": self.method_name, **fields}

    @classmethod
    def matches_peft(cls, d: dict[str, Any]) -> bool:
        return True

    @classmethod
    def from_peft(cls, d: dict[str, Any]) -> BottleneckConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {k: v for k, v in d.items() if k in names})


class BottleneckAdapter(AdapterLayer):
    """A sublayer followed by residual bottleneck MLPs, one per adapter name (applied in turn)."""

    adapter_attrs = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.adapter_scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: BottleneckConfig) -> None:
        param = next(self.base_layer.parameters(), None)
        dtype = param.dtype if param is not None and param.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"device": param.device if param is not None else None, "dtype": dtype}
        down = nn.Linear(self.hidden_size, config.size, **kw)  # (k, d)
        up = nn.Linear(config.size, self.hidden_size, **kw)  # (d, k)
        with torch.no_grad():
            nn.init.trunc_normal_(down.weight, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std)
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_act[name] = ACTIVATIONS[config.activation]()
        self.adapter_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_scaling[name] = config.scaling

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        for extra in (self.adapter_act, self.adapter_dropout):
            if adapter in extra:
                del extra[adapter]
        self.adapter_scaling.pop(adapter, None)

    def adapt(self, h: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """h + s·up(σ(down(dropout(h)))) for each adapter in turn; h: (..., d)."""
        for name in adapters:
            down, up = self.adapter_down[name], self.adapter_up[name]
            x = self.adapter_dropout[name](h.to(down.weight.dtype) if not torch.is_autocast_enabled(h.device.type) else h)
            z = self.adapter_act[name](down(x))  # (..., k)
            h = h + (up(z) * self.adapter_scaling[name]).to(h.dtype)  # (..., d)
        return h

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapters = self.use_adapters()
        out = self.base_layer(*args, **kwargs)
        if not adapters:
            return out
        if isinstance(out, torch.Tensor):
            return self.adapt(out, adapters)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (self.adapt(out[0], adapters), *out[1:])  # attention: (hidden, weights, ...)
        raise TypeError(f"bottleneck adapter: {type(self.base_layer).__name__} returned {type(out).__name__}, "
                        "not hidden states (a tensor or a tuple starting with one)")


def _hidden_size(model: nn.Module, module: nn.Module, name: str) -> int:
    """d: the wrapped module's output width (a linear layer's out features, else the model's hidden size)."""
    if is_linear_like(module):
        w = module.weight
        return w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ConfigError(f"bottleneck adapter: cannot tell the output width of module {name!r} "
                      f"({type(module).__name__}); target linear layers or a transformers model")


@register("bottleneck_adapter", BottleneckConfig,
          "Bottleneck adapters (Houlsby/Pfeiffer): residual down-up MLPs after attention and/or FFN blocks (not mergeable)")
def attach_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[str]:
    found: set[str] = set()
    for _, spec in config.module_specs(model):
        found.update(find_targets(model, spec, layers=config.layers, accept=lambda m: True))
    targets = [n for n, _ in model.named_modules() if n in found]  # model order

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, BottleneckAdapter):
            layer = module  # another adapter after the same sublayer
        elif isinstance(module, AdapterLayer):
            raise ConfigError(f"module {name!r} is already adapted by another method ({type(module).__name__})")
        else:
            layer = BottleneckAdapter(module, _hidden_size(model, module, name))
        layer.add_adapter(adapter_name, config)
        return layer

    wrap_modules(model, targets, wrap)
    return targets
