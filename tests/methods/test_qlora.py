"""QLoRA: NF4/int8 storage error, training, save/load (plain LoRA files), merging into fp32, memory.

The shared invariants (tests/methods/test_invariants.py) compare against the fp32 base; QLoRA's base is
quantized, so the same invariants are checked here against the quantized base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.adapter import adapter_parameters
from peftkit.errors import ConfigError
from peftkit.methods.qlora import QLoraConfig, load_qlora_adapter
from peftkit.methods.quantize import BLOCK, dequantize_weight, is_quantized, quantize_linear, quantized_bytes
from tests.tiny import Tiny, perturb_adapters

# NF4 code values (Dettmers et al. 2023, appendix E): the widest gap is between -1 and -0.6962
NF4_HALF_GAP = (1.0 - 0.6961928) / 2
MERGE_ATOL = 1e-5  # merged (fp32 dequantized + delta) vs unmerged (dequantize in forward + LoRA): fp32 rounding


def _linear(out_f: int = 128, in_f: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


FP32_U = 2.0 ** -24  # fp32 unit roundoff


def _nf4_reference(q: nn.Module) -> torch.Tensor:
    """The fp32 weight a 4-bit layer stores, from its bytes and scales alone, with no bitsandbytes kernel: value i
    is ``code[nibble i] * scale[i // blocksize]`` along the flattened weight (high nibble first); a double-quantized
    scale is ``code2[byte] * absmax2[its block of 256] + offset``. One fp32 product (and one sum) per value, which
    IEEE rounds the same on every CPU and vector width: any kernel that computes the right value gives these bits.
    """
    state = q.weight.quant_state
    packed = q.weight.data.view(torch.uint8).flatten()
    numel = state.shape.numel()
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()[:numel].long()
    if state.nested:
        inner = state.state2
        scales = inner.code[state.absmax.long()] * inner.absmax[torch.arange(state.absmax.numel()) // inner.blocksize]
        scales = scales + state.offset
    else:
        scales = state.absmax.float()
    return (state.code.float()[codes] * scales[torch.arange(numel) // state.blocksize]).view(state.shape)


def _dot_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far two fp32 computations of ``a @ b`` (any summation order, blocking, FMA) can be apart elementwise:
    each is within gamma_K * (|a| @ |b|) of the exact product, gamma_K ~ K * 2^-24 for K summed terms (Higham)."""
    return 2 * a.shape[-1] * FP32_U * (a.abs() @ b.abs())


def test_nf4_round_trip_error_within_bound():
    lin = _linear()
    q = quantize_linear(lin, bits=4)
    deq = dequantize_weight(q)
    w = lin.weight.detach()
    blocks = w.flatten().view(-1, BLOCK)  # (n_blocks, 64): bitsandbytes' blocks run along the flattened weight
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    err = (deq.flatten().view(-1, BLOCK) - blocks).abs()
    # half the widest NF4 gap of each block's absmax, + 2% for the 8-bit quantized absmax (double quant)
    assert bool((err <= (NF4_HALF_GAP + 0.02) * absmax + 1e-7).all())
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.11  # ~0.09 for uniform/normal weights (MEASURED.md: 0.092)
    stored = q.weight.numel() + q.weight.quant_state.absmax.numel() + q.weight.quant_state.state2.absmax.numel() * 4
    assert stored == quantized_bytes(w.numel(), 4, True)
    assert 8 * stored / w.numel() == pytest.approx(4.13, abs=0.01)


def test_int8_round_trip_error_within_bound():
    lin = _linear()
    deq = dequantize_weight(quantize_linear(lin, bits=8))
    w = lin.weight.detach()
    row_absmax = w.abs().amax(dim=1, keepdim=True)
    assert bool(((deq - w).abs() <= row_absmax / 127 + 1e-6).all())  # within one int8 step of its row
    assert ((deq - w).norm() / w.norm()).item() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_forward_matches_dequantized_weight(bits):
    lin = _linear()
    q = quantize_linear(lin, bits=bits)
    x = torch.randn(5, 256)
    expect = F.linear(x, dequantize_weight(q), lin.bias)
    torch.testing.assert_close(q(x), expect, rtol=0, atol=1e-4)


def _qlora(tiny: Tiny, bits: int = 4, perturb: bool = True) -> nn.Module:
    model = tiny.build()
    peftkit.inject(model, QLoraConfig(r=4, alpha=8, bits=bits))
    if perturb:
        perturb_adapters(model)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_base_is_quantized_and_only_lora_trains(tiny_llama, bits):
    model = _qlora(tiny_llama, bits)
    linears = [m for n, m in model.named_modules() if n.endswith("base_layer")]
    assert linears and all(is_quantized(m) for m in linears)
    assert not is_quantized(model.lm_head)  # the output head stays fp32
    adapter = dict(adapter_parameters(model))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter.values()}
    assert all(p.dtype == torch.float32 for p in adapter.values())
    model.train()
    tiny_llama.run_grad(model).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.values())


@pytest.mark.parametrize("bits", [4, 8])
def test_training_reduces_loss_and_survives_an_eval_pass(tiny_llama, bits):
    torch.manual_seed(0)
    model = _qlora(tiny_llama, bits, perturb=False)
    ids = tiny_llama.inputs["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step() -> float:
        loss = F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model.train()
    first = step()
    for _ in range(10):
        step()
    middle = step()
    model.eval()  # bitsandbytes may repack weights for inference in eval + no_grad (MEASURED.md trap)
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    for _ in range(10):
        last = step()
    assert middle < first * 0.95
    assert last < middle  # still learning after the evaluation pass


def test_save_load_round_trip_and_peft_compatible_file(tiny_llama, tmp_path: Path):
    import json

    model = _qlora(tiny_llama)
    out = tiny_llama.run(model)
    peftkit.save_adapter(model, tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and "bits" not in data  # a plain LoRA file

    loaded = load_qlora_adapter(tiny_llama.build(), tmp_path / "adapter")
    saved, back = peftkit.adapter_state_dict(model), peftkit.adapter_state_dict(loaded)
    assert sorted(saved) == sorted(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    torch.testing.assert_close(tiny_llama.run(loaded), out, rtol=0, atol=0)  # quantization is deterministic

    # as plain LoRA over the fp32 base: peftkit and PEFT agree exactly; vs QLoRA only the quantization error
    fp32 = peftkit.load_adapter(tiny_llama.build(), tmp_path / "adapter")
    from peft import PeftModel

    ref = PeftModel.from_pretrained(tiny_llama.build(), str(tmp_path / "adapter"))
    torch.testing.assert_close(tiny_llama.run(fp32), tiny_llama.run(ref), rtol=0, atol=1e-5)
    rel = ((tiny_llama.run(fp32) - out).norm() / out.norm()).item()
    assert rel < 0.2


def test_merge_dequantizes_into_fp32_within_tolerance(tiny_llama):
    model = _qlora(tiny_llama)
    unmerged = tiny_llama.run(model)
    peftkit.merge(model)
    torch.testing.assert_close(tiny_llama.run(model), unmerged, rtol=0, atol=MERGE_ATOL)
    peftkit.unmerge(model)  # stays fp32 (dequantized base), same output as before merging
    torch.testing.assert_close(tiny_llama.run(model), unmerged, rtol=0, atol=MERGE_ATOL)
    plain = peftkit.unload(model, merge=True)
    assert not any(is_quantized(m) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(tiny_llama.build().state_dict())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    torch.testing.assert_close(tiny_llama.run(plain), unmerged, rtol=0, atol=MERGE_ATOL)


def test_adapter_off_equals_quantized_base(tiny_llama):
    model = _qlora(tiny_llama)
    adapted = tiny_llama.run(model)
    with peftkit.disable_adapters(model):
        off = tiny_llama.run(model)
    base = tiny_llama.build()
    for name, module in list(base.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            q = quantize_linear(module)
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, q)
    torch.testing.assert_close(off, tiny_llama.run(base), rtol=0, atol=1e-6)
    assert (adapted - off).abs().max() > 1e-3


def test_bad_settings_name_the_field(tiny_gpt2):
    with pytest.raises(ConfigError, match="method.bits"):
        QLoraConfig(bits=3)
    with pytest.raises(ConfigError, match="Conv1D"):
        peftkit.inject(tiny_gpt2.build(), QLoraConfig())


def test_memory_prediction_counts_quantized_bytes(hf_base_dir):
    from transformers import AutoModelForCausalLM

    from peftkit.runs.config import load_config
    from peftkit.runs.memory import MB, predict_memory

    cfg = load_config(None, [f"model={hf_base_dir('llama')}", "method.name=qlora"])
    pred = predict_memory(cfg)  # meta device: weights declared with their quantized size
    model = AutoModelForCausalLM.from_pretrained(hf_base_dir("llama"))
    peftkit.inject(model, cfg.method_config())
    real = predict_memory(cfg, model)  # the real quantized tensors (packed data + scales)
    assert round(pred.weights * MB) == round(real.weights * MB)
    lora = predict_memory(load_config(None, [f"model={hf_base_dir('llama')}", "method.name=lora",
                                             "method.target_modules=all-linear"]))
    assert pred.weights < lora.weights and pred.trainable_params == lora.trainable_params


# -- storing the rest of the base small: base_dtype, quantize_head (bench/memory.py) -------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_base_and_quantized_head_store_less_and_still_train(tiny_llama):
    """Everything still computes in fp32 (the bf16 embedding's rows are cast up exactly; the NF4 head is dequantized
    to fp32): the output equals the fp32 model given the bf16-rounded embedding and the head's stored NF4 weight,
    to the rounding of the head's 32-long dot products. No bf16 kernel runs, so no CPU-dependent tolerance."""
    from peftkit.runs.memory import _parameter_bytes

    plain = _qlora(tiny_llama, perturb=False)
    model = tiny_llama.build()
    peftkit.inject(model, QLoraConfig(r=4, alpha=8, base_dtype="bf16", quantize_head=True))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and is_quantized(model.lm_head)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    head = _nf4_reference(model.lm_head)  # (vocab, hidden) fp32, from the stored codes and scales
    fp32_head = plain.lm_head.weight.detach()
    absmax = fp32_head.flatten().view(-1, BLOCK).abs().amax(dim=1, keepdim=True)
    err = (head.flatten().view(-1, BLOCK) - fp32_head.flatten().view(-1, BLOCK)).abs()
    assert bool((err <= (NF4_HALF_GAP + 0.02) * absmax + 1e-7).all())  # NF4 storage bound (round-trip test above)
    expected = _qlora(tiny_llama, perturb=False)  # the same quantized layers: they compute the same
    with torch.no_grad():
        emb = expected.model.embed_tokens.weight
        emb.copy_(emb.to(torch.bfloat16).float())
        expected.lm_head.weight.copy_(head)
    inputs = {}
    for name, m in (("model", model), ("expected", expected)):
        m.lm_head.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
    out, exp = tiny_llama.run(model), tiny_llama.run(expected)
    assert out.dtype == torch.float32
    assert torch.equal(inputs["model"], inputs["expected"])  # the bf16 embedding path is exact up to the head
    assert bool(((out - exp).abs() <= _dot_bound(inputs["model"], head.T)).all())
    assert _rel(out, tiny_llama.run(plain)) > 0.01  # and the head's NF4 error is visible: the check has teeth
    emb, head = plain.model.embed_tokens.weight.numel(), plain.lm_head.weight.numel()
    saved = 2 * emb + 4 * head - quantized_bytes(head, 4, True)  # bf16 embedding, NF4 head
    assert _parameter_bytes(model)[0] == _parameter_bytes(plain)[0] - saved
    perturb_adapters(model)
    model.train()
    tiny_llama.run_grad(model).sum().backward()
    adapter = dict(adapter_parameters(model))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.values())  # incl. layer 0 (below the hook)


def test_bf16_base_keeps_a_tied_head_tied_and_computes_in_fp32(tiny_llama):
    model = tiny_llama.build(tie_word_embeddings=True)
    peftkit.inject(model, QLoraConfig(r=4, alpha=8, base_dtype="bf16"))
    fp32 = tiny_llama.build(tie_word_embeddings=True)
    peftkit.inject(fp32, QLoraConfig(r=4, alpha=8))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert sorted(model.state_dict()) == sorted(fp32.state_dict())  # the same keys: files and merging unchanged
    assert _rel(tiny_llama.run(model), tiny_llama.run(fp32)) < 0.02  # bf16 rounding of the embedding/head only
    model.train()
    tiny_llama.run_grad(model).sum().backward()  # the head's backward casts the bf16 weight up, and drops it
    assert all(p.grad is not None for _, p in adapter_parameters(model))


def test_quantized_head_of_a_tied_model_leaves_the_embedding(tiny_llama):
    model = tiny_llama.build(tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight.detach().clone()
    peftkit.inject(model, QLoraConfig(r=4, alpha=8, quantize_head=True))
    assert is_quantized(model.lm_head) and torch.equal(model.model.embed_tokens.weight, emb)
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_meta_prediction_counts_the_options(hf_base_dir):
    from transformers import AutoModelForCausalLM

    from peftkit.runs.config import load_config
    from peftkit.runs.memory import MB, predict_memory

    cfg = load_config(None, [f"model={hf_base_dir('llama')}", "method.name=qlora", "method.base_dtype=bf16",
                             "method.quantize_head=true"])
    pred = predict_memory(cfg)
    model = AutoModelForCausalLM.from_pretrained(hf_base_dir("llama"))
    peftkit.inject(model, cfg.method_config())
    assert round(pred.weights * MB) == round(predict_memory(cfg, model).weights * MB)
    plain = predict_memory(load_config(None, [f"model={hf_base_dir('llama')}", "method.name=qlora"]))
    assert pred.weights < plain.weights
    fp32_file = 4 * (pred.trainable_params + pred.frozen_params) / MB
    assert pred.loading < pred.runtime + fp32_file  # quantized layer by layer: the fp32 file is never all resident


def test_quantizing_while_materializing_equals_quantizing_the_built_model(tiny_llama):
    """A model built on the meta device and filled layer by layer (bench/memory.py's 1B model) gets the same
    quantized base as the model built in full."""
    from peftkit.methods.qlora import quantize_base

    ref = tiny_llama.build()
    state = ref.state_dict()
    peftkit.inject(ref, QLoraConfig(r=4, alpha=8))
    with torch.device("meta"):
        model = type(tiny_llama.build())(tiny_llama.build().config)
    filled = []

    def fill(name: str, layer: nn.Linear) -> None:
        filled.append(name)
        layer.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")})

    config = QLoraConfig(r=4, alpha=8)
    quantize_base(model, config, materialize=fill)
    assert filled and all(is_quantized(model.get_submodule(n)) for n in filled)
    model.load_state_dict({k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in filled}, strict=False,
                          assign=True)
    model.model.rotary_emb = type(ref.model.rotary_emb)(config=model.config)
    torch.manual_seed(0)
    peftkit.inject(model, config)
    torch.testing.assert_close(tiny_llama.run(model), tiny_llama.run(ref), rtol=0, atol=0)


def test_quantizing_a_memory_mapped_checkpoint_releases_pages_not_values(tiny_llama, hf_base_dir):
    """transformers loads safetensors as views of a memory-mapped file; the pages of each quantized layer are
    handed back to the OS (madvise) once it is done. The values read afterwards (the fp32 tensors kept) and the
    model's output are those of the same model quantized from memory."""
    from transformers import AutoModelForCausalLM

    from peftkit.allocator import file_backed as _file_backed

    mapped = AutoModelForCausalLM.from_pretrained(hf_base_dir("llama"))
    if not _file_backed(mapped.model.layers[0].mlp.up_proj.weight):
        pytest.skip("this transformers/platform does not memory-map safetensors weights")
    torch.manual_seed(0)
    peftkit.inject(mapped, QLoraConfig(r=4, alpha=8))
    ref = tiny_llama.build()
    torch.manual_seed(0)
    peftkit.inject(ref, QLoraConfig(r=4, alpha=8))
    assert not any(_file_backed(p) for p in mapped.parameters())  # nothing left viewing the file
    torch.testing.assert_close(tiny_llama.run(mapped), tiny_llama.run(ref), rtol=0, atol=0)
    torch.testing.assert_close(mapped.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)


def test_bad_storage_settings_name_the_field():
    with pytest.raises(ConfigError, match="method.base_dtype"):
        QLoraConfig(base_dtype="fp16")
    with pytest.raises(ConfigError, match="method.quantize_head"):
        QLoraConfig(quantize_head="yes")


def test_low_precision_head_matches_an_fp32_linear_in_blocks(monkeypatch):
    """The bf16 head is cast up a block of rows at a time; values and gradients equal F.linear on the
    upcast weight."""
    from peftkit.methods import quantize

    monkeypatch.setattr(quantize, "UPCAST_ROWS", 7)  # blocks that do not divide the 30 rows
    lin = _linear(out_f=30, in_f=16)
    lin.weight.data = lin.weight.data.to(torch.bfloat16)
    lin.requires_grad_(False)  # QLoRA's base is frozen
    head = quantize.LowPrecisionLinear(lin)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = head(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, lin.weight.float(), lin.bias)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert y.dtype == torch.float32 and head.weight.grad is None


def test_second_adapter_keeps_the_first_and_the_quantized_base(tiny_llama):
    """Two named QLoRA adapters on one model: both stay on every layer, over the same quantized base, and each
    computes what a model with only that adapter computes."""
    from peftkit.core.adapter import adapter_layers

    model = tiny_llama.build()
    peftkit.inject(model, QLoraConfig(r=4, alpha=8), "first")
    perturb_adapters(model, "first", seed=1)
    peftkit.inject(model, QLoraConfig(r=2, alpha=8), "second")
    perturb_adapters(model, "second", seed=2)
    layers = [layer for _, layer in adapter_layers(model)]
    assert layers and all(sorted(layer.adapter_names()) == ["first", "second"] for layer in layers)
    assert all(is_quantized(layer.base_layer) for layer in layers)
    with_first = tiny_llama.run(model)
    peftkit.set_active(model, "second")
    with_second = tiny_llama.run(model)
    assert (with_first - with_second).abs().max() > 1e-3

    for name, seed, r, out in (("first", 1, 4, with_first), ("second", 2, 2, with_second)):
        alone = tiny_llama.build()
        peftkit.inject(alone, QLoraConfig(r=r, alpha=8), name)
        perturb_adapters(alone, name, seed=seed)
        torch.testing.assert_close(out, tiny_llama.run(alone), rtol=0, atol=1e-6)


def test_second_adapter_must_match_the_quantized_base(tiny_llama):
    model = tiny_llama.build()
    peftkit.inject(model, QLoraConfig(r=4), "first")
    with pytest.raises(ConfigError, match="method.bits=8"):
        peftkit.inject(model, QLoraConfig(r=4, bits=8), "second")
    with pytest.raises(ConfigError, match="method.quant_type=fp4"):
        peftkit.inject(model, QLoraConfig(r=4, quant_type="fp4"), "second")
    fp32 = tiny_llama.build()
    peftkit.inject(fp32, peftkit.LoraConfig(r=4, target_modules="all-linear"), "plain")
    with pytest.raises(ConfigError, match="unquantized layer"):
        peftkit.inject(fp32, QLoraConfig(r=4), "second")


@pytest.mark.parametrize("out_f,in_f,block_bytes", [(30, 48, 4 * 48 * 5), (96, 256, 4 * 256 * 16), (7, 64, 2**20)])
def test_blockwise_4bit_layer_equals_bitsandbytes_path(monkeypatch, out_f, in_f, block_bytes):
    """The CPU 4-bit layer dequantizes blocks of rows (methods/_nf4.py): exactly the stored weight (_nf4_reference),
    outputs and input gradients within fp32 GEMM rounding of x @ W^T and of bitsandbytes' whole-weight path, no
    block above BLOCK_BYTES of fp32."""
    import bitsandbytes as bnb

    import peftkit.methods._nf4 as nf4
    from peftkit.methods import _row_blocks

    monkeypatch.setattr(_row_blocks, "BLOCK_BYTES", block_bytes)  # several blocks, a last partial one
    q = quantize_linear(_linear(out_f=out_f, in_f=in_f), bits=4)
    assert isinstance(q, nf4.BlockwiseLinear4bit) and isinstance(q, bnb.nn.Linear4bit)
    blocks, buffers = [], set()
    for first, w in nf4.dequantized_blocks(q.weight.data, q.weight.quant_state, torch.float32):
        buffers.add(w.untyped_storage().data_ptr())
        blocks.append((first, w.clone()))  # a block is valid until the next one is asked for
    assert len(buffers) == 1  # every block lands in the one reused buffer: no allocation per block
    assert all(w.numel() * 4 <= max(block_bytes, 4 * in_f * 64) for _, w in blocks)
    # Dequantized values are single fp32 products: exactly the reference on every CPU (issue #23: bitsandbytes'
    # AVX512 kernel scales rows that do not start a quantization block, in_features % 64 != 0, with the wrong
    # absmax; its scalar and AVX2 kernels do not).
    weight = _nf4_reference(q)
    assert torch.equal(torch.cat([w for _, w in blocks]), weight)
    assert torch.equal(dequantize_weight(q), weight)  # what merging and export use
    x = torch.randn(2, 5, in_f, requires_grad=True)
    y = q(x)
    x_ref = x.detach().clone().requires_grad_(True)
    # bitsandbytes' own CPU path on the same weight; on an AVX512 CPU with in_f % 64 != 0 its kernel is wrong
    # (issue #23, nf4._kernel_is_safe), so only x @ W^T is compared there
    bnb_is_right = nf4._kernel_is_safe(in_f, BLOCK, out_f)
    ref = bnb.nn.Linear4bit.forward(q, x_ref)
    # Outputs: in_f-long fp32 dot products, summed in another order by another GEMM (blocks of rows vs the whole
    # weight): within _dot_bound of each other and of x @ W^T; the bias is added after (one more rounding of |y|).
    bound = _dot_bound(x.detach(), weight.T) + 2 * FP32_U * F.linear(x.detach(), weight, q.bias).abs()
    assert bool(((y - F.linear(x.detach(), weight, q.bias)).abs() <= bound).all())
    assert not bnb_is_right or bool(((y - ref).abs() <= bound).all())
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert bool(((x.grad - g @ weight).abs() <= _dot_bound(g, weight)).all())  # out_f-long sums
    assert not bnb_is_right or bool(((x.grad - x_ref.grad).abs() <= _dot_bound(g, weight)).all())
    assert q.weight.grad is None and q.bias.grad is None


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("out_f,in_f", [(30, 48), (96, 256), (7, 64), (40, 80), (5, 33), (1, 48)])
def test_pure_torch_dequantization_equals_the_kernel(monkeypatch, double_quant, quant_type, out_f, in_f):
    """The pure-torch dequantization that replaces bitsandbytes' kernel where that kernel is wrong (AVX512,
    in_features % 64 != 0: nf4._kernel_is_safe) gives exactly the kernel's values where the kernel is right, and
    exactly the stored weight (_nf4_reference) everywhere, in blocks of rows (several, a partial last one) and
    whole (dequantize_weight: merging, export)."""
    import peftkit.methods._nf4 as nf4
    from peftkit.methods import _row_blocks

    monkeypatch.setattr(_row_blocks, "BLOCK_BYTES", 4 * in_f * 8)
    q = quantize_linear(_linear(out_f=out_f, in_f=in_f, seed=1), bits=4, quant_type=quant_type,
                        double_quant=double_quant)

    def dequantized(safe: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(nf4, "_kernel_is_safe", lambda *args, **kwargs: safe)
        blocks = [w.clone() for _, w in nf4.dequantized_blocks(q.weight.data, q.weight.quant_state, torch.float32)]
        return torch.cat(blocks), dequantize_weight(q)

    real = nf4._kernel_is_safe
    torch_blocks, torch_whole = dequantized(safe=False)
    weight = _nf4_reference(q)
    assert torch.equal(torch_blocks, weight) and torch.equal(torch_whole, weight)
    if real(in_f, BLOCK, out_f):  # this CPU's kernel is right for this shape (always on an AVX2-only CPU)
        kernel_blocks, kernel_whole = dequantized(safe=True)
        assert torch.equal(torch_blocks, kernel_blocks) and torch.equal(torch_whole, kernel_whole)
    x = torch.randn(3, in_f)  # and the layer computes with it
    monkeypatch.setattr(nf4, "_kernel_is_safe", lambda *args, **kwargs: False)
    bound = _dot_bound(x, weight.T) + 2 * FP32_U * F.linear(x, weight, q.bias).abs()
    assert bool(((q(x) - F.linear(x, weight, q.bias)).abs() <= bound).all())


def test_kernel_is_avoided_exactly_where_avx512_indexes_rows_wrong(monkeypatch):
    """bitsandbytes 0.50.2's AVX512 4-bit kernel scales value (row, col) by absmax[row * (in // 64) + col // 64]:
    right for every value only when in_features is a multiple of the block size, or for one row."""
    import peftkit.methods._nf4 as nf4

    assert isinstance(nf4._cpu_has_avx512f(), bool)  # the native probe (or /proc/cpuinfo) answers here
    monkeypatch.setattr(nf4, "_cpu_has_avx512f", lambda: True)
    assert not nf4._kernel_is_safe(48, 64, 30) and not nf4._kernel_is_safe(80, 64, 2)
    assert not nf4._kernel_is_safe(96, 64, 3)  # a multiple of 16 (the AVX512 path runs) but not of 64
    assert nf4._kernel_is_safe(64, 64, 30) and nf4._kernel_is_safe(2048 + 64, 64, 30) and nf4._kernel_is_safe(48, 64, 1)
    assert not nf4._kernel_is_safe(4096, 4096, 30)  # bitsandbytes' own AVX512 fallback: blocks >= 2048
    # the scales the AVX512 path reads differ from the flat blocks' exactly in those cases
    for in_f, rows in ((48, 30), (80, 2), (96, 3), (64, 30), (2112, 30), (48, 1)):
        flat = [(r * in_f + c) // 64 for r in range(rows) for c in range(in_f)]
        avx512 = [r * (in_f // 64) + c // 64 for r in range(rows) for c in range(in_f)]
        assert (flat == avx512) == nf4._kernel_is_safe(in_f, 64, rows)
    monkeypatch.setattr(nf4, "_cpu_has_avx512f", lambda: False)
    assert all(nf4._kernel_is_safe(in_f, 64, 30) for in_f in (48, 64, 80, 96))
    assert nf4._kernel_is_safe(4096, 4096, 30)


@pytest.mark.parametrize("in_f,kernel_runs", [(48, False), (80, False), (256, True)])
def test_an_avx512_cpu_runs_the_kernel_only_where_it_is_right(monkeypatch, in_f, kernel_runs):
    """With AVX512F reported, the layer, its blocks and dequantize_weight never call bitsandbytes' kernel for a
    width it scales wrongly there, and still give the stored weight; a multiple of 64 keeps the (fast) kernel."""
    import types

    import peftkit.methods._nf4 as nf4

    real = nf4._native_lib()
    calls = []

    def kernel(*args):
        calls.append(args[-1].value)  # in_features
        return real.cdequantize_blockwise_cpu_nf4_fp32(*args)

    monkeypatch.setattr(nf4, "_native_lib", lambda: types.SimpleNamespace(cdequantize_blockwise_cpu_nf4_fp32=kernel))
    monkeypatch.setattr(nf4, "_cpu_has_avx512f", lambda: True)
    q = quantize_linear(_linear(out_f=24, in_f=in_f), bits=4)
    weight = _nf4_reference(q)
    assert torch.equal(dequantize_weight(q), weight)
    x = torch.randn(3, in_f)
    bound = _dot_bound(x, weight.T) + 2 * FP32_U * F.linear(x, weight, q.bias).abs()
    assert bool(((q(x) - F.linear(x, weight, q.bias)).abs() <= bound).all())
    assert bool(calls) == kernel_runs


def test_memory_prediction_counts_one_dequantized_block_for_4bit(tiny_llama):
    """The predictor's transient for a 4-bit base is one dequantized block + the layer's scales (methods/_nf4.py),
    not the whole fp32 weight; an 8-bit base still dequantizes whole weights."""
    from peftkit.methods._row_blocks import BLOCK_BYTES
    from peftkit.runs.memory import _dequantized_copies, _quantized_sizes

    big = 32000 * 2048  # a 1B model's head: 262 MB in fp32
    assert _dequantized_copies([(big, 4)]) == (BLOCK_BYTES + 4 * big // BLOCK, 0)  # above glibc's mmap threshold
    assert _dequantized_copies([(1024, 4)]) == (4 * 1024 + 4 * 1024 // BLOCK, 4 * 1024)  # smaller than a block
    assert _dequantized_copies([(big, 8), (1024, 8)]) == (4 * big, 4 * 1024)  # above glibc's mmap threshold: not churned
    model = _qlora(tiny_llama, bits=4)
    sizes = _quantized_sizes(model)
    assert sizes and all(bits == 4 for _, bits in sizes)
    assert sorted(n for n, _ in sizes) == sorted(m.weight.quant_state.shape.numel() for m in model.modules() if is_quantized(m))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_f,in_f", [(30, 48), (200, 256)])
def test_quantizing_by_rows_equals_bitsandbytes_quantization(monkeypatch, double_quant, out_f, in_f):
    """Quantizing a block of rows at a time (no whole-weight temporaries) gives bitsandbytes' bytes and state."""
    import bitsandbytes.functional as bf

    from peftkit.methods import _row_blocks, quantize

    monkeypatch.setattr(_row_blocks, "BLOCK_BYTES", 4 * in_f * 16)  # several row blocks and a partial last one
    w = _linear(out_f=out_f, in_f=in_f).weight.detach()
    packed, state = quantize.quantize_4bit_by_rows(w, "nf4", double_quant, BLOCK)
    ref_packed, ref = bf.quantize_4bit(w, blocksize=BLOCK, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert state.shape == ref.shape and state.blocksize == ref.blocksize and state.nested == ref.nested
    if double_quant:
        assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
    q = quantize_linear(_linear(out_f=out_f, in_f=in_f), bits=4, double_quant=double_quant)
    assert torch.equal(q.weight.data, ref_packed) and torch.equal(dequantize_weight(q), bf.dequantize_4bit(ref_packed, ref))
