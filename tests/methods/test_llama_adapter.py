"""LLaMA-Adapter: gated prompt attention with grouped-query heads, the zero-init gate, top-layer choice,
generation with a KV cache, GPT-2, and the merge refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import peftkit
from peftkit.core.io import read_adapter_config
from peftkit.errors import NotMergeableError
from peftkit.methods.llama_adapter import LlamaAdapterAttention, LlamaAdapterConfig
from tests.tiny import Tiny, adapter_layer_names, make_tiny, perturb_adapters


def set_gate(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LlamaAdapterAttention):
                for gate in layer.adaption_gate.values():
                    gate.fill_(value)


def test_gqa_prompt_attention_matches_a_per_head_reference(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    set_gate(model, 0.7)
    layer = model.model.layers[1].self_attn
    base = layer.base_layer
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 2, 8)  # 2 query heads per key/value head
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(5).expand(2, 5)
    cos, sin = model.model.rotary_emb(x, position_ids)
    kwargs = {"hidden_states": x, "position_embeddings": (cos, sin), "attention_mask": None}
    with torch.no_grad():
        got, _ = layer(**kwargs)
        base_out, _ = base(**kwargs)
        q = base.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)  # the model's own rotary embedding
        prompt = layer.adaption_prompt["default"][0]  # (3, 32)
        k, v = base.k_proj(prompt).view(3, 2, 8), base.v_proj(prompt).view(3, 2, 8)  # no position on the prompt
        heads = []
        for h in range(4):
            kv = h // 2
            probs = torch.softmax(q[:, h] @ k[:, kv].T / math.sqrt(8), dim=-1)  # (2, 5, 3)
            heads.append(0.7 * probs @ v[:, kv])  # (2, 5, 8)
        expected = base_out + torch.cat(heads, dim=-1) @ base.o_proj.weight.T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_zero_gate_starts_from_the_base_model_and_trains_the_gate_first(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, LlamaAdapterConfig(adapter_len=4))
    torch.testing.assert_close(tiny_llama.run(model), base, rtol=0, atol=0)
    layer = model.model.layers[0].self_attn
    prompt, gate = layer.adaption_prompt["default"], layer.adaption_gate["default"]
    assert prompt.shape == (1, 4, 32) and gate.shape == (1,) and gate.item() == 0.0
    assert 0.2 < prompt.std() < 0.4  # N(0, 0.3²): the scale of the attention's normed inputs (see the module doc)
    tiny_llama.run_grad(model).logsumexp(-1).sum().backward()
    assert gate.grad.abs().item() > 0 and not prompt.grad.any()  # through a zero gate the prompt gets no gradient


def test_init_std_sets_the_prompt_scale_and_is_validated(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=64, init_std=1.0))  # PEFT's init
    prompt = model.model.layers[0].self_attn.adaption_prompt["default"]
    assert 0.9 < prompt.std() < 1.1 and abs(prompt.mean()) < 0.1
    for bad in (0, -1.0, float("inf"), "big"):
        with pytest.raises(peftkit.ConfigError, match="method.init_std must be a finite number > 0"):
            LlamaAdapterConfig(init_std=bad)


def test_top_layers_are_adapted(tiny_llama: Tiny) -> None:
    one = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    assert adapter_layer_names(one) == ["model.layers.1.self_attn"]
    every = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=2))
    assert adapter_layer_names(every) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with pytest.raises(peftkit.ConfigError, match="adapter_layers=3 but the model has only 2 'self_attn' modules"):
        peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_layers=3))


def test_unsupported_models_are_refused(tiny_bert: Tiny) -> None:
    with pytest.raises(peftkit.ConfigError, match="model type 'bert'.*set method.target_modules"):
        peftkit.inject(tiny_bert.build(), LlamaAdapterConfig())
    with pytest.raises(peftkit.ConfigError, match="cannot adapt module 'encoder.layer.1.attention'"):
        peftkit.inject(tiny_bert.build(), LlamaAdapterConfig(target_modules="attention", adapter_layers=1))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_with_cache_equals_without(kind: str) -> None:
    tiny = make_tiny(kind)
    model = peftkit.inject(tiny.build(), LlamaAdapterConfig(adapter_len=3))
    perturb_adapters(model, std=1.0)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])  # left-padded batch
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(**kw, use_cache=True)
        uncached = model.generate(**kw, use_cache=False)
        assert torch.equal(cached, uncached)
        with peftkit.disable_adapters(model):
            base_logits = model(input_ids=ids, attention_mask=mask).logits
        assert (model(input_ids=ids, attention_mask=mask).logits - base_logits).abs().max() > 1e-2


def test_gpt2_prompt_output_is_added_before_nothing_else(tiny_gpt2: Tiny) -> None:
    # PEFT's GPT-2 variant: the prompt's keys/values come from the fused c_attn, and its output is added as is
    model = peftkit.inject(tiny_gpt2.build(), LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    set_gate(model, 0.5)
    layer = model.transformer.h[1].attn
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = layer(x)
        base_out, _ = layer.base_layer(x)
        q = layer.base_layer.c_attn(x)[..., :32].view(1, 4, 4, 8).transpose(1, 2)
        _, k, v = layer.base_layer.c_attn(layer.adaption_prompt["default"]).split(32, dim=2)
        k, v = k.view(1, 2, 4, 8).transpose(1, 2), v.view(1, 2, 4, 8).transpose(1, 2)
        probs = 0.5 * torch.softmax(q @ k.transpose(2, 3) / math.sqrt(8), dim=-1)
        expected = base_out + (probs @ v).transpose(1, 2).reshape(1, 4, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_not_mergeable(tiny_llama: Tiny) -> None:
    model = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=2))
    with pytest.raises(NotMergeableError, match=r"\(llama_adapter\) cannot be merged"):
        peftkit.merge(model)


def test_file_fields_and_keys(tiny_llama: Tiny, tmp_path: Path) -> None:
    model = peftkit.inject(tiny_llama.build(), LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    perturb_adapters(model)
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = read_adapter_config(tmp_path / "a")
    assert {k: cfg[k] for k in ("peft_type", "target_modules", "adapter_len", "adapter_layers", "task_type")} == {
        "peft_type": "ADAPTION_PROMPT", "target_modules": "self_attn", "adapter_len": 3, "adapter_layers": 1,
        "task_type": "CAUSAL_LM"}
    assert {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()} == {
        "base_model.model.model.layers.1.self_attn.adaption_prompt": (1, 3, 32),
        "base_model.model.model.layers.1.self_attn.adaption_gate": (1,)}


def test_two_adapters_add_their_prompt_outputs(tiny_llama: Tiny) -> None:
    model = tiny_llama.build()
    base = tiny_llama.run(model)
    peftkit.inject(model, LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    peftkit.inject(model, LlamaAdapterConfig(adapter_len=4, adapter_layers=1), "b")
    perturb_adapters(model, std=1.0)
    peftkit.set_active(model, "default")
    a_out = tiny_llama.run(model)
    peftkit.set_active(model, "b")
    b_out = tiny_llama.run(model)
    peftkit.set_active(model, ["default", "b"])
    both = tiny_llama.run(model)
    assert (both - base).abs().max() > 1e-2 and not torch.allclose(both, a_out) and not torch.allclose(both, b_out)
    peftkit.delete_adapter(model, "b")
    torch.testing.assert_close(tiny_llama.run(model), a_out, rtol=0, atol=0)
