"""Invariants every registered method must keep, generated from the registry, on every tiny model family.

A new method is covered as soon as it registers itself; it only needs an entry in ``SPECS`` below (a config
that fits the tiny models, and which promises it makes). A registered method without one fails loudly.

Adapters are given random weights with :func:`tests.tiny.perturb_adapters` (found by what they are, not by
name), so that merged/unmerged, save/load and on/off comparisons are between outputs that really differ
from the base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.adapter import AdapterLayer, adapter_parameters
from peftkit.core.config import MethodConfig
from peftkit.errors import PeftkitError
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dora import DoraConfig
from peftkit.methods.full import FullConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.linear_probe import LinearProbeConfig
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.p_tuning import PTuningConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.qlora import QLoraConfig, load_qlora_adapter
from peftkit.methods.selective import SelectiveConfig
from tests.tiny import KINDS, Tiny, adapter_layer_names, make_tiny, perturb_adapters, weights


@dataclass(frozen=True)
class MethodSpec:
    """What the invariant tests need to know about one method.

    Attributes:
        config: model kind ("llama", "gpt2", "bert", "t5", "mlp") -> a config that fits that tiny model.
        identity_at_init: the method promises output == base output right after ``inject``.
        mergeable: the method folds into the base weights (``merge`` / ``unmerge`` / ``unload(merge=True)``).
        kinds: the tiny model kinds the method applies to (cases are generated for these only).
        in_place: the method trains base parameters in place (no adapter layers; nothing to switch off).
        load: how a saved adapter goes back onto a fresh base (QLoRA: quantizing the base again).
        quantizes_base: ``inject`` quantizes the base (QLoRA): "the base output" is then the quantized base's,
            read with the adapters switched off, and unmerging cannot give back the fp32 weights.
        merge_atol: merged vs unmerged outputs (fp32 rounding of the summed weights; for a quantized base the
            dequantized weight plus the delta against dequantize-in-forward plus LoRA).
    """

    config: Callable[[str], MethodConfig]
    identity_at_init: bool
    mergeable: bool
    kinds: tuple[str, ...] = KINDS
    in_place: bool = False
    quantizes_base: bool = False
    merge_atol: float = 1e-5  # fp32
    load: Callable[[nn.Module, Path], nn.Module] = peftkit.load_adapter


QLORA_KINDS = tuple(k for k in KINDS if k != "gpt2")  # GPT-2's Conv1D layers have no 4-bit form

SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec(
        config=lambda kind: peftkit.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
        identity_at_init=True,
        mergeable=True,
    ),
    "ia3": MethodSpec(
        config=lambda kind: IA3Config(target_modules=["fc1", "fc2", "out"], feedforward_modules=["fc2"])
        if kind == "mlp" else IA3Config(target_modules="all-linear"),  # the family's feed-forward modules
        identity_at_init=True,
        mergeable=True,
    ),
    "dora": MethodSpec(
        config=lambda kind: DoraConfig(r=4, alpha=8, target_modules="all-linear"),
        identity_at_init=True,
        mergeable=True,
    ),
    "bottleneck_adapter": MethodSpec(
        config=lambda kind: BottleneckConfig(size=4, placement="ffn", ffn_modules=["fc1", "fc2"])
        if kind == "mlp" else BottleneckConfig(size=4),
        identity_at_init=True,
        mergeable=False,
    ),
    "llama_adapter": MethodSpec(
        config=lambda kind: LlamaAdapterConfig(adapter_len=3, adapter_layers=1),
        identity_at_init=True,
        mergeable=False,
        kinds=("llama", "gpt2"),
    ),
    # soft prompts need a language model with input and output embeddings: not the MLP or the bare BERT encoder
    "prompt_tuning": MethodSpec(
        config=lambda kind: PromptTuningConfig(num_virtual_tokens=3),
        identity_at_init=False,
        mergeable=False,
        kinds=("llama", "gpt2", "t5"),
    ),
    "p_tuning": MethodSpec(
        config=lambda kind: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
        identity_at_init=False,
        mergeable=False,
        kinds=("llama", "gpt2", "t5"),
    ),
    "prefix_tuning": MethodSpec(
        config=lambda kind: PrefixTuningConfig(num_virtual_tokens=3),
        identity_at_init=False,
        mergeable=False,
        kinds=("llama", "gpt2", "t5"),
    ),
    # selective methods train base parameters in place
    "selective": MethodSpec(
        config=lambda kind: SelectiveConfig(patterns=["fc1.weight", "fc1.bias"]) if kind == "mlp"
        else SelectiveConfig(kinds=["norm"]),
        identity_at_init=True, mergeable=False, in_place=True,
    ),
    "bitfit": MethodSpec(config=lambda kind: BitFitConfig(), identity_at_init=True, mergeable=False, in_place=True,
                         kinds=("gpt2", "bert", "mlp")),  # Llama and T5 layers have no biases
    "linear_probe": MethodSpec(
        config=lambda kind: LinearProbeConfig(head=["out"]) if kind == "mlp" else LinearProbeConfig(),
        identity_at_init=True, mergeable=False, in_place=True, kinds=("llama", "gpt2", "t5", "mlp"),
    ),
    "full": MethodSpec(config=lambda kind: FullConfig(), identity_at_init=True, mergeable=False, in_place=True),
    # QLoRA's base is quantized (NF4: ~9% relative error per weight): its invariants hold against the quantized
    # base (adapters off); GPT-2's Conv1D layers are not quantized (QLoRA refuses them, tests/methods/test_qlora.py)
    "qlora": MethodSpec(config=lambda kind: QLoraConfig(r=4, alpha=8), identity_at_init=True, mergeable=True,
                        kinds=QLORA_KINDS, quantizes_base=True, load=load_qlora_adapter),
}

METHODS = sorted(peftkit.list_methods())


def cases(applies: Callable[[MethodSpec], bool] = lambda spec: True) -> list:
    """(method, kind) for every registered method with a spec, on the kinds it applies to, where ``applies``."""
    return [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS if m in SPECS and applies(SPECS[m])
            for k in SPECS[m].kinds]


def spec_for(method: str) -> MethodSpec:
    if method not in SPECS:
        pytest.fail(f"method {method!r} is registered but has no entry in SPECS in {__file__}: add a config for the "
                    "tiny models and say whether it is the identity at init and mergeable")
    return SPECS[method]


def adapted(method: str, tiny: Tiny, perturb: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """(a fresh tiny model with the method attached, the base model's output: the quantized base's for QLoRA)."""
    model = tiny.build()
    base_out = tiny.run(model)
    peftkit.inject(model, spec_for(method).config(tiny.kind))
    if spec_for(method).quantizes_base:
        with peftkit.disable_adapters(model):
            base_out = tiny.run(model)
    if perturb:
        perturb_adapters(model)
        assert (tiny.run(model) - base_out).abs().max() > 1e-3, "random adapter weights should change the output"
    return model, base_out


def test_every_registered_method_has_a_spec() -> None:
    missing = sorted(set(peftkit.list_methods()) - set(SPECS))
    assert not missing, f"registered methods without an entry in SPECS: {missing}"
    for name, spec in SPECS.items():
        assert type(spec.config("mlp")) is peftkit.get_method(name).config_cls


@pytest.mark.parametrize(("method", "kind"), cases(lambda spec: spec.identity_at_init))
def test_output_equals_base_at_init(method: str, kind: str) -> None:
    tiny_any = make_tiny(kind)
    model, base_out = adapted(method, tiny_any, perturb=False)
    assert adapter_layer_names(model) or spec_for(method).in_place
    torch.testing.assert_close(tiny_any.run(model), base_out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "kind"), cases())
def test_merged_equals_unmerged(method: str, kind: str) -> None:
    tiny_any = make_tiny(kind)
    model, _ = adapted(method, tiny_any)
    if spec_for(method).in_place:  # already in the weights: merging changes nothing
        before = tiny_any.run(model)
        peftkit.merge(model)
        torch.testing.assert_close(tiny_any.run(model), before, rtol=0, atol=0)
        return
    if not spec_for(method).mergeable:
        with pytest.raises(TypeError, match="cannot be merged"):
            peftkit.merge(model)
        return
    unmerged = tiny_any.run(model)
    peftkit.merge(model)
    assert all(layer.merged for layer in model.modules() if isinstance(layer, AdapterLayer))
    torch.testing.assert_close(tiny_any.run(model), unmerged, rtol=0, atol=spec_for(method).merge_atol)


@pytest.mark.parametrize(("method", "kind"), cases(lambda spec: spec.mergeable and not spec.quantizes_base))
def test_unmerge_restores_base_weights(method: str, kind: str) -> None:
    tiny_any = make_tiny(kind)
    base = weights(tiny_any.build())
    model, base_out = adapted(method, tiny_any)
    unmerged = tiny_any.run(model)
    peftkit.merge(model)
    peftkit.unmerge(model)
    restored = {k.replace(".base_layer.", "."): v for k, v in weights(model).items()}
    for key, w in base.items():
        torch.testing.assert_close(restored[key], w, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(tiny_any.run(model), unmerged, rtol=0, atol=spec_for(method).merge_atol)
    # and unload(merge=True) leaves a plain model computing the adapted output
    peftkit.unload(model, merge=True)
    assert adapter_layer_names(model) == [] and sorted(model.state_dict()) == sorted(base)
    torch.testing.assert_close(tiny_any.run(model), unmerged, rtol=0, atol=spec_for(method).merge_atol)


@pytest.mark.parametrize(("method", "kind"), cases())
def test_only_adapter_parameters_train_and_get_gradients(method: str, kind: str) -> None:
    tiny_any = make_tiny(kind)
    model, _ = adapted(method, tiny_any)
    adapter = dict(adapter_parameters(model))
    assert adapter
    adapter_ids = {id(p) for p in adapter.values()}
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable_ids == adapter_ids
    assert peftkit.count_parameters(model).trainable == sum(p.numel() for p in adapter.values())

    model.train()
    out = tiny_any.run_grad(model)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() * probe).sum().backward()
    no_grad = [k for k, p in adapter.items() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not no_grad, f"adapter parameters without gradient: {no_grad}"
    base_with_grad = [n for n, p in model.named_parameters() if id(p) not in adapter_ids and p.grad is not None]
    assert not base_with_grad


@pytest.mark.parametrize(("method", "kind"), cases())
def test_save_load_round_trip(method: str, kind: str, tmp_path: Path) -> None:
    tiny_any = make_tiny(kind)
    model, _ = adapted(method, tiny_any)
    out = tiny_any.run(model)
    peftkit.save_adapter(model, tmp_path / "adapter")
    loaded = spec_for(method).load(tiny_any.build(), tmp_path / "adapter")
    assert adapter_layer_names(loaded) == adapter_layer_names(model)
    saved, back = peftkit.adapter_state_dict(model), peftkit.adapter_state_dict(loaded)
    assert sorted(saved) == sorted(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    torch.testing.assert_close(tiny_any.run(loaded), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "kind"), cases())
def test_adapter_off_equals_base(method: str, kind: str) -> None:
    tiny_any = make_tiny(kind)
    model, base_out = adapted(method, tiny_any)
    adapted_out = tiny_any.run(model)
    if spec_for(method).in_place:
        with pytest.raises(PeftkitError, match="in place"):
            with peftkit.disable_adapters(model):
                pass
        return
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(tiny_any.run(model), base_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_any.run(model), adapted_out, rtol=0, atol=0)
    if spec_for(method).mergeable:
        peftkit.merge(model)
        with peftkit.disable_adapters(model):
            torch.testing.assert_close(tiny_any.run(model), base_out, rtol=0, atol=spec_for(method).merge_atol)
        torch.testing.assert_close(tiny_any.run(model), adapted_out, rtol=0, atol=spec_for(method).merge_atol)
