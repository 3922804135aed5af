"""Finding the modules a method attaches to.

Target specs follow Hugging Face PEFT so configs mean the same thing in both tools:

* a list of names: a module matches if its qualified name equals an entry or ends with ``"." + entry``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
* a single string: a regular expression matched against the whole qualified name, or
  ``"all-linear"`` for every linear layer except the output head.

``exclude`` uses the same rules; ``layers`` keeps only modules inside the listed layer indices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch.nn as nn

from peftkit.errors import ConfigError

# Names of the block lists in common architectures (``model.layers.3.``, ``transformer.h.3.``, ...).
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks|encoder\.layer|decoder\.layers)\.(\d+)(?:\.|$)")

TargetSpec = str | Sequence[str] | None


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a GPT-2 style ``Conv1D`` (a linear layer stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module sits in, if its name says so."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def name_matches(name: str, spec: TargetSpec) -> bool:
    """Does the qualified module ``name`` match a PEFT-style target spec?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s): excluded from ``all-linear``."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            heads.add(name)
        elif name.split(".")[-1] in {"lm_head", "classifier", "score", "cls", "qa_outputs"}:
            heads.add(name)
    return heads


# PEFT's names for the head of a sequence classifier (``PeftModelForSequenceClassification``): trained and saved
# with the adapter as ``modules_to_save`` for task type SEQ_CLS.
CLASSIFICATION_HEADS = ("classifier", "score")


def classification_head_names(model: nn.Module) -> list[str]:
    """The names (last path segment) of the model's classification head(s): ``classifier`` (BERT family) or
    ``score`` (decoder classifiers such as Llama); empty for models without one."""
    found = {name.split(".")[-1] for name, _ in model.named_modules() if name.split(".")[-1] in CLASSIFICATION_HEADS}
    return [h for h in CLASSIFICATION_HEADS if h in found]


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude: TargetSpec = None,
    layers: Iterable[int] | None = None,
    accept: Callable[[nn.Module], bool] | None = None,
) -> list[str]:
    """Qualified names of the modules to wrap, in model order.

    A module already wrapped by an adapter layer counts as the layer it wraps (so a second adapter
    can target it); the wrapper's own submodules are never targets.

    Args:
        model: any ``nn.Module``.
        target_modules: list of names/suffixes, a regex string, or ``"all-linear"``.
        exclude: modules to leave alone, same rules as ``target_modules``.
        layers: keep only modules inside these block indices.
        accept: which module kinds can be targets; by default linear-like layers and embeddings.

    Raises:
        ConfigError: nothing matched; the message lists the module names that were available.
    """
    if not target_modules:
        raise ConfigError("target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    accept = accept or (lambda m: is_linear_like(m) or isinstance(m, nn.Embedding))
    layer_set = set(layers) if layers is not None else None
    heads = output_head_names(model)
    found: list[str] = []
    candidates: list[str] = []
    inside_wrapper: str | None = None
    for name, mod in model.named_modules():
        if inside_wrapper is not None and name.startswith(inside_wrapper):
            if (name.startswith(inside_wrapper + "base_layer.") and accept(mod)
                    and _selected(name.replace(".base_layer.", "."), mod, target_modules, exclude, layer_set, heads)):
                from peftkit.core.inject import refuse_nesting

                refuse_nesting(model, name, mod)  # a layer inside a block another method wraps: raises, naming both
            continue
        base = getattr(mod, "base_layer", None)
        if isinstance(base, nn.Module):
            inside_wrapper = name + "."
            mod = base
        if not name or not accept(mod):
            continue
        candidates.append(name)
        if target_modules == "all-linear":
            if not is_linear_like(mod) or name in heads:
                continue
        elif not name_matches(name, target_modules):
            continue
        if exclude is not None and name_matches(name, exclude):
            continue
        if layer_set is not None and layer_index(name) not in layer_set:
            continue
        found.append(name)
    if not found:
        raise ConfigError(_nothing_matched(target_modules, exclude, layers, candidates))
    return found


def _selected(name: str, mod: nn.Module, target_modules: TargetSpec, exclude: TargetSpec, layers: set[int] | None,
              heads: set[str]) -> bool:
    """Would ``find_targets`` pick the module ``name`` (its path without wrappers)?"""
    if target_modules == "all-linear":
        if not is_linear_like(mod) or name in heads:
            return False
    elif not name_matches(name, target_modules):
        return False
    if exclude is not None and name_matches(name, exclude):
        return False
    return layers is None or layer_index(name) in layers


def _nothing_matched(target, exclude, layers, candidates: list[str]) -> str:
    suffixes = sorted({c.split(".")[-1] for c in candidates})
    msg = f"target_modules={target!r} matched no module"
    if exclude is not None:
        msg += f" (exclude={exclude!r})"
    if layers is not None:
        msg += f" in layers {sorted(layers)}"
    return msg + f"; available module names: {', '.join(suffixes) or '(none)'}"


def compact_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest PEFT-style list that selects exactly ``targets`` in ``model``.

    Saved configs prefer short suffixes (``["q_proj", "v_proj"]``) and fall back to full names when
    suffixes would select more than was adapted (e.g. after ``exclude`` or ``layers``).
    """
    suffixes = sorted({t.split(".")[-1] for t in targets})
    names = [n for n, m in model.named_modules() if n and name_matches(n, suffixes) and _is_wrapped_or_target(m)]
    return suffixes if sorted(names) == sorted(targets) else sorted(targets)


def _is_wrapped_or_target(mod: nn.Module) -> bool:
    return hasattr(mod, "base_layer") or is_linear_like(mod) or isinstance(mod, nn.Embedding)
