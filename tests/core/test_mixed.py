"""Mixed batches: row i of one forward / generate call uses adapter names[i] (or the base), exactly as if it ran
alone with that adapter active; the real ``peft`` package's ``adapter_names=`` is the oracle too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.core.adapter import adapter_layers, adapter_parameters
from peftkit.core.config import MethodConfig
from peftkit.core.mixed import BASE, mixed_batch
from peftkit.errors import ConfigError
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.dora import DoraConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.llama_adapter import LlamaAdapterConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.selective import SelectiveConfig
from tests.methods.test_invariants import SPECS
from tests.tiny import build_gpt2, build_llama, perturb_adapters

ATOL = 1e-5
NAMES = ["a", "b", BASE, "a", "b"]
BUILD = {"llama": build_llama, "gpt2": build_gpt2}
# a linear (or GPT-2 Conv1D) projection and the input embedding, in both adapters
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}
MIXABLE = {"lora", "dora", "ia3", "qlora"}


def ids(rows: int = len(NAMES), length: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def with_adapters(model: nn.Module, configs: dict[str, MethodConfig]) -> nn.Module:
    """``model`` with each named adapter attached and given its own random weights (all visibly non-zero)."""
    for i, (name, config) in enumerate(configs.items()):
        peftkit.inject(model, config, name)
        perturb_adapters(model, name, seed=i + 1, std=0.3)
    return model


def lora_pair(kind: str) -> dict[str, MethodConfig]:
    return {n: peftkit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], init="random") for n in "ab"}


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def each_row_alone(model: nn.Module, base: nn.Module | None, names: list[str], input_ids: torch.Tensor,
                   run: Callable[[nn.Module, torch.Tensor], torch.Tensor] = logits) -> list[torch.Tensor]:
    """Row i run by itself on ``base`` (for "__base__"; None: ``model`` with its adapters off, the quantized base
    of a QLoRA model) or on ``model`` with only its adapter active."""
    out = []
    for i, name in enumerate(names):
        if name == BASE and base is None:
            with peftkit.disable_adapters(model):
                out.append(run(model, input_ids[i:i + 1])[0])
        elif name == BASE:
            out.append(run(base, input_ids[i:i + 1])[0])
        else:
            peftkit.set_active(model, name)
            out.append(run(model, input_ids[i:i + 1])[0])
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_rows_equal_each_row_alone(kind: str) -> None:
    model = with_adapters(BUILD[kind](), lora_pair(kind))
    x = ids()
    with mixed_batch(model, NAMES):
        mixed = logits(model, x)
    alone = each_row_alone(model, BUILD[kind](), NAMES, x)
    assert (alone[0] - alone[1]).abs().max() > 1e-2  # the two adapters really differ
    assert (alone[0] - alone[2]).abs().max() > 1e-2  # and differ from the base
    for i, ref in enumerate(alone):
        torch.testing.assert_close(mixed[i], ref, rtol=0, atol=ATOL, msg=f"row {i} ({NAMES[i]})")


def greedy(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding with the KV cache: the raw logits of each generated step, (rows, steps, vocab)."""
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=5,
                             min_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_with_cache_equals_each_row_alone(kind: str) -> None:
    model = with_adapters(BUILD[kind](), lora_pair(kind))
    x = ids(length=4)
    with mixed_batch(model, NAMES):
        mixed = greedy(model, x)
    alone = each_row_alone(model, BUILD[kind](), NAMES, x, run=greedy)
    for i, ref in enumerate(alone):
        torch.testing.assert_close(mixed[i], ref, rtol=0, atol=ATOL, msg=f"row {i} ({NAMES[i]})")
        assert torch.equal(mixed[i].argmax(-1), ref.argmax(-1))  # the same tokens were generated


@pytest.fixture
def load_base(hf_base_dir: Callable[[str], Path]) -> Callable[[str], nn.Module]:
    return lambda kind: AutoModelForCausalLM.from_pretrained(hf_base_dir(kind)).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_as_peft_adapter_names(kind: str, load_base, tmp_path: Path) -> None:
    ours = with_adapters(load_base(kind), lora_pair(kind))
    for name in "ab":
        peftkit.save_adapter(ours, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(load_base(kind), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    x = ids(length=4)
    with torch.no_grad():
        expected = theirs(input_ids=x, adapter_names=NAMES).logits
        expected_gen = theirs.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=5,
                                       min_new_tokens=5, do_sample=False, pad_token_id=0, adapter_names=NAMES,
                                       output_logits=True, return_dict_in_generate=True)
    with mixed_batch(ours, NAMES):
        torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(greedy(ours, x), torch.stack(expected_gen.logits, dim=1), rtol=0, atol=ATOL)


def dora_and_lora(kind: str) -> dict[str, MethodConfig]:
    # a DoRA adapter and a plain LoRA adapter sharing layers (a DoRA layer holding a LoRA adapter too)
    return {"a": DoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], init="random"),
            "b": peftkit.LoraConfig(r=2, alpha=4, target_modules=TARGETS[kind][:2], init="random")}


def ia3_pair(kind: str) -> dict[str, MethodConfig]:
    # output scaling (attention) and input scaling (the feed-forward output layer) in each adapter
    targets = {"llama": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}[kind]
    return {n: IA3Config(target_modules=targets, init="random") for n in "ab"}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("configs", [dora_and_lora, ia3_pair], ids=["dora+lora", "ia3"])
def test_dora_and_ia3_rows_equal_each_row_alone(kind: str, configs) -> None:
    model = with_adapters(BUILD[kind](), configs(kind))
    x = ids()
    with mixed_batch(model, NAMES):
        mixed = logits(model, x)
    alone = each_row_alone(model, BUILD[kind](), NAMES, x)
    assert (alone[0] - alone[1]).abs().max() > 1e-2 and (alone[0] - alone[2]).abs().max() > 1e-2
    for i, ref in enumerate(alone):
        torch.testing.assert_close(mixed[i], ref, rtol=0, atol=ATOL, msg=f"row {i} ({NAMES[i]})")


@pytest.mark.parametrize("method", [m for m in sorted(SPECS) if {"llama", "gpt2"} & set(SPECS[m].kinds)])
def test_every_method_mixes_or_refuses_naming_itself(method: str) -> None:
    spec = SPECS[method]
    kind = next(k for k in ("llama", "gpt2") if k in spec.kinds)
    model = with_adapters(BUILD[kind](), {"a": spec.config(kind)})
    names = ["a", BASE, "a"]
    x = ids(rows=3)
    if method not in MIXABLE:
        with pytest.raises(ConfigError, match=f"not supported (by |for adapter 'a' \\(){method}"):
            with mixed_batch(model, names):
                pass
        return
    with mixed_batch(model, names):
        mixed = logits(model, x)
    base = None if spec.quantizes_base else BUILD[kind]()
    for i, ref in enumerate(each_row_alone(model, base, names, x)):
        torch.testing.assert_close(mixed[i], ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("extra", [BottleneckConfig(size=4, placement="ffn"),
                                   LlamaAdapterConfig(adapter_len=3, adapter_layers=1),
                                   PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=lambda c: c.method_name)
def test_unnamed_unmixable_adapter_is_off_for_every_row(extra: MethodConfig) -> None:
    # LoRA, and another method on other blocks (bottleneck: feed-forward; LLaMA-Adapter: attention), both active
    target = "q_proj" if extra.method_name == "bottleneck_adapter" else "down_proj"
    model = with_adapters(build_llama(), {"a": peftkit.LoraConfig(r=4, target_modules=[target], init="random"),
                                          "c": extra})
    peftkit.set_active(model, ["a", "c"])
    x = ids(rows=2)
    both = logits(model, x)
    with mixed_batch(model, ["a", BASE]):
        mixed = logits(model, x)
    peftkit.set_active(model, "a")
    torch.testing.assert_close(mixed[0], logits(model, x[:1])[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(mixed[1], logits(build_llama(), x[1:])[0], rtol=0, atol=ATOL)
    peftkit.set_active(model, ["a", "c"])
    torch.testing.assert_close(logits(model, x), both, rtol=0, atol=0)  # everything restored after the block
    with pytest.raises(ConfigError, match=f"{extra.method_name} \\(adapter 'c'\\)"):
        with mixed_batch(model, ["c", "a"]):
            pass


def test_block_restores_state_even_on_error_and_nests() -> None:
    model = with_adapters(build_llama(), lora_pair("llama"))
    x = ids(rows=2)
    before = logits(model, x)
    with pytest.raises(RuntimeError, match="boom"):
        with mixed_batch(model, ["b", "b"]):
            raise RuntimeError("boom")
    assert all(getattr(layer, "mixed_rows", None) is None for _, layer in adapter_layers(model))
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=0)
    with mixed_batch(model, ["b", BASE]):
        with mixed_batch(model, [BASE, "a"]):
            inner = logits(model, x)
        outer = logits(model, x)
    alone = each_row_alone(model, build_llama(), ["b", "a"], x)
    base = logits(build_llama(), x)
    torch.testing.assert_close(inner[1], alone[1], rtol=0, atol=ATOL)
    torch.testing.assert_close(inner[0], base[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(outer[0], alone[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(outer[1], base[1], rtol=0, atol=ATOL)


def test_gradients_reach_only_each_rows_adapter() -> None:
    model = with_adapters(build_llama(), lora_pair("llama"))
    for _, p in adapter_parameters(model):
        p.requires_grad_(True)
    x = ids(rows=3)
    with mixed_batch(model, ["a", BASE, "a"]):
        model(input_ids=x).logits.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in adapter_parameters(model, "a")}
    assert all(p.grad is None for _, p in adapter_parameters(model, "b"))
    model.zero_grad()
    peftkit.set_active(model, "a")
    # the same loss from rows 0 and 2 alone: the base row contributes no gradient to the adapter
    (model(input_ids=x[[0, 2]]).logits.square().sum() / x.shape[0] / x.shape[1] / 100).backward()
    for k, p in adapter_parameters(model, "a"):
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-7, msg=k)


def test_refusals() -> None:
    model = with_adapters(build_llama(), lora_pair("llama"))
    x = ids(rows=2)
    for names, match in [(["a", "nope"], "no adapter named 'nope'; loaded adapters: a, b"),
                         ("a", "non-empty list"), ([], "non-empty list")]:
        with pytest.raises(ConfigError, match=match):
            with mixed_batch(model, names):
                pass
    with pytest.raises(ConfigError, match="3 adapter names for a batch of 2 rows"):
        with mixed_batch(model, ["a", "b", "a"]):
            logits(model, x)
    peftkit.merge(model)
    with pytest.raises(ConfigError, match="adapter 'a' \\(lora\\) is merged .* unmerge it first"):
        with mixed_batch(model, ["a", "b"]):
            pass
    with pytest.raises(ConfigError, match="no peftkit adapters"):
        with mixed_batch(build_llama(), [BASE]):
            pass


@pytest.mark.parametrize("extra", [SelectiveConfig(kinds=["norm"]),
                                   peftkit.LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]),
                                   peftkit.LoraConfig(r=2, target_modules=["o_proj"], bias="all")],
                         ids=["selective", "modules_to_save", "bias"])
def test_adapters_that_changed_the_base_are_refused_even_unnamed(extra: MethodConfig) -> None:
    model = with_adapters(build_llama(), {"a": peftkit.LoraConfig(r=4, target_modules=["q_proj"]), "x": extra})
    with pytest.raises(ConfigError, match=f"adapter 'x'.*{extra.method_name}|{extra.method_name}.*adapter 'x'"):
        with mixed_batch(model, ["a", BASE]):
            pass


def test_generate_entry_point_answers_each_example_with_its_adapter(tiny_lm) -> None:
    from peftkit.data.template import Template
    from peftkit.eval.generate import generate

    model, tok = tiny_lm
    for i, name in enumerate("ab"):
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"), name)
        perturb_adapters(model, name, seed=i + 1, std=0.5)
    template = Template.create(tok, "alpaca")
    examples = [{"instruction": t, "input": "", "output": ""} for t in ("Name a color", "Hi", "Say yes please", "2+2")]
    names = ["a", "b", BASE, "a"]
    mixed = generate(model, template, examples, max_new_tokens=4, batch_size=4, adapter_names=names)
    expected = {}
    for name in "ab":  # the same left-padded batch, every row with one adapter
        peftkit.set_active(model, name)
        expected[name] = generate(model, template, examples, max_new_tokens=4, batch_size=4)
    with peftkit.disable_adapters(model):
        expected[BASE] = generate(model, template, examples, max_new_tokens=4, batch_size=4)
    assert mixed == [expected[n][i] for i, n in enumerate(names)]
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters answer differently
    with pytest.raises(ConfigError, match="one adapter name per example"):
        generate(model, template, examples, adapter_names=["a"])


def test_qlora_rows_equal_each_row_alone_over_the_quantized_base() -> None:
    from peftkit.methods.qlora import QLoraConfig

    # a second QLoRA adapter would quantize the first one's LoRA layers (quantize_base): b is plain LoRA on the
    # same, already quantized, layers
    model = with_adapters(build_llama(), {"a": QLoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init="random"),
                                          "b": peftkit.LoraConfig(r=2, target_modules=["q_proj"], init="random")})
    x = ids()
    with mixed_batch(model, NAMES):
        mixed = logits(model, x)
    with peftkit.disable_adapters(model):
        base = logits(model, x)  # the quantized base
    for i, name in enumerate(NAMES):
        if name != BASE:
            peftkit.set_active(model, name)
        ref = base[i] if name == BASE else logits(model, x[i:i + 1])[0]
        torch.testing.assert_close(mixed[i], ref, rtol=0, atol=ATOL, msg=f"row {i} ({name})")
