"""Prompt tuning, P-tuning and prefix tuning: injection, generation with the KV cache, files, training.

The shared invariants (only soft-prompt parameters train, save -> load, adapter off == base) are in
test_invariants.py; PEFT interop in tests/interop/test_peft_prompt_interop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.cli.main import main
from peftkit.data.collate import pad_batch
from peftkit.data.template import Template
from peftkit.data.tokenize import encode_all
from peftkit.errors import AdapterFileError, ConfigError, PeftkitError
from peftkit.eval.inspect_prompt import inspect_prompt
from peftkit.methods._soft_prompt import PromptTable, SoftPromptLayer
from peftkit.methods.p_tuning import PromptEncoder, PTuningConfig
from peftkit.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.train.config import TrainConfig
from peftkit.train.loop import Batching, Trainer, Wiring, enable_gradient_checkpointing
from peftkit.train.loss import evaluate_loss, lm_loss_sum
from tests.lm import tiny_lm, tiny_lm_dir, tokenizer  # noqa: F401  (fixtures)
from tests.tiny import make_tiny, perturb_adapters

N = 4
CONFIGS = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=N),
    "p_tuning_mlp": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
    "p_tuning_lstm": lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=8),
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=N),
    "prefix_projection": lambda: PrefixTuningConfig(num_virtual_tokens=N, projection=True, encoder_hidden_size=16),
}
METHODS = ("prompt_tuning", "p_tuning_mlp", "prefix_tuning")  # one per method where variants add nothing
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


def adapted(kind: str, variant: str, std: float = 1.0) -> nn.Module:
    model = peftkit.inject(make_tiny(kind).build(), CONFIGS[variant]())
    perturb_adapters(model, std=std)  # far from the base, so that wrong positions or masks change the tokens
    return model


def left_padded(rows: list[list[int]], right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    if right:
        return (torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, steps: int = 6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, use_cache=use_cache, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)


def new_tokens(model: nn.Module, out, prompt_len: int) -> torch.Tensor:
    # decoder-only models return prompt + new tokens; encoder-decoders the decoder's tokens only
    return out.sequences if model.config.is_encoder_decoder else out.sequences[:, prompt_len:]


# -- configs and attaching -------------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "method.num_virtual_tokens"),
    (lambda: PromptTuningConfig(init="text"), "method.init_text"),
    (lambda: PromptTuningConfig(init="words"), "method.init"),
    (lambda: PTuningConfig(encoder="gru"), "method.encoder"),
    (lambda: PTuningConfig(encoder_dropout=1.0), "method.encoder_dropout"),
    (lambda: PrefixTuningConfig(init="ones"), "method.init"),
    (lambda: PrefixTuningConfig(encoder_hidden_size=0), "method.encoder_hidden_size"),
])
def test_bad_config_values_name_the_field(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_models_without_lm_head_are_refused(kind: str) -> None:
    model = make_tiny(kind).build()
    with pytest.raises(ConfigError, match="needs a language model with an LM head"):
        peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=N))
    assert not hasattr(model, "peftkit_state")


@pytest.mark.parametrize("variant, trainable", [
    ("prompt_tuning", N * 32),
    ("prefix_tuning", N * 2 * 2 * 16),  # layers x (k, v) x kv_dim: GQA, 2 kv heads of 8
])
def test_trainable_parameter_counts(variant: str, trainable: int) -> None:
    model = peftkit.inject(make_tiny("llama").build(), CONFIGS[variant]())
    assert peftkit.count_parameters(model).trainable == trainable
    assert isinstance(model.get_input_embeddings(), SoftPromptLayer)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_logits_stay_aligned_with_input_ids(kind: str, variant: str) -> None:
    tiny = make_tiny(kind)
    base = tiny.run(tiny.build())
    model = adapted(kind, variant)
    out = tiny.run(model)
    assert out.shape == base.shape
    assert (out - base).abs().max() > 1e-2


def test_prompt_tuning_inits() -> None:
    model = make_tiny("llama").build()
    vocab = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    table = model.get_input_embeddings().prompt_encoder["default"]().detach()
    assert all(any(torch.equal(row, v) for v in vocab) for row in table)  # every row is a vocabulary embedding

    model = make_tiny("llama").build()
    peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=200, init="random"))
    table = model.get_input_embeddings().prompt_encoder["default"]().detach()
    assert abs(float(table.std()) / float(vocab.std()) - 1) < 0.1  # the vocabulary's scale, not N(0, 1)


def test_prompt_tuning_text_init_repeats_the_text(tiny_lm) -> None:
    model, tok = tiny_lm
    text = "Classify the sentiment of this review:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=len(ids) + 2, init="text", init_text=text))
    layer = model.get_input_embeddings()
    expected = layer.base_layer.weight[torch.tensor(ids + ids[:2])]
    torch.testing.assert_close(layer.prompt_encoder["default"]().detach(), expected.detach(), rtol=0, atol=0)
    config = json.loads(json.dumps(model.peftkit_state.configs["default"].to_peft(model, [])))
    assert config["prompt_tuning_init"] == "TEXT" and config["tokenizer_name_or_path"]


def test_text_init_without_tokenizer_is_a_config_error() -> None:
    model = make_tiny("llama").build()  # built in memory: no folder to take a tokenizer from
    with pytest.raises(ConfigError, match="method.tokenizer"):
        peftkit.inject(model, PromptTuningConfig(init="text", init_text="hello"))


def test_forward_equals_the_prompt_prepended_by_hand() -> None:
    model = adapted("llama", "prompt_tuning")
    layer = model.get_input_embeddings()
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        with peftkit.disable_adapters(model):
            embeds = torch.cat([layer.prompt_encoder["default"]()[None], layer(ids)], dim=1)  # (1, N+T, d)
            ref = model(inputs_embeds=embeds, labels=torch.cat([torch.full((1, N), -100), ids], dim=1))
    torch.testing.assert_close(out.logits, ref.logits[:, N:], rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)  # labels were extended with N ignored positions


def test_packed_rows_are_refused() -> None:
    model = adapted("llama", "prompt_tuning")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.raises(PeftkitError, match="packed rows"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]]), use_cache=False)


# -- several adapters, off, unload -------------------------------------------------------------------------


def test_switching_deleting_and_unloading() -> None:
    tiny = make_tiny("gpt2")
    model = tiny.build()
    base = tiny.run(model)
    peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=N))
    peftkit.inject(model, PrefixTuningConfig(num_virtual_tokens=2), adapter_name="prefix")
    perturb_adapters(model, std=1.0)
    first = tiny.run(model)
    peftkit.set_active(model, "prefix")
    second = tiny.run(model)
    assert (first - second).abs().max() > 1e-2
    peftkit.set_active(model, ["default", "prefix"])
    with pytest.raises(PeftkitError, match="only one soft prompt"):
        tiny.run(model)
    peftkit.set_active(model, "prefix")
    peftkit.delete_adapter(model, "default")
    torch.testing.assert_close(tiny.run(model), second, rtol=0, atol=0)

    peftkit.unload(model)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(tiny.run(model), base, rtol=0, atol=0)


# -- generation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_projection"])
def test_greedy_with_cache_equals_without(kind: str, variant: str) -> None:
    model = adapted(kind, variant)
    ids, mask = left_padded(ROWS)
    cached, uncached = greedy(model, ids, mask, True), greedy(model, ids, mask, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with peftkit.disable_adapters(model):
        base = greedy(model, ids, mask, True)
    assert not all(torch.allclose(a, b) for a, b in zip(base.scores, cached.scores))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("variant", METHODS)
def test_batched_left_padded_generation_equals_row_by_row(kind: str, variant: str) -> None:
    model = adapted(kind, variant)
    # T5's encoder sees the prompt, then the padding: its relative position bias counts the pads, so
    # encoder-decoders are padded on the right (as T5's tokenizer does)
    ids, mask = left_padded(ROWS, right=kind == "t5")
    batched = greedy(model, ids, mask, True)
    tokens = new_tokens(model, batched, ids.shape[1])
    for i, row in enumerate(ROWS):
        alone = greedy(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), True)
        assert torch.equal(new_tokens(model, alone, len(row))[0], tokens[i]), i
        for step, (a, b) in enumerate(zip(alone.scores, batched.scores)):
            torch.testing.assert_close(a[0], b[i], atol=1e-4, rtol=1e-4, msg=f"row {i} step {step}")


@pytest.mark.parametrize("variant", METHODS)
def test_generate_with_adapter_off_is_the_base(variant: str) -> None:
    tiny = make_tiny("llama")
    base_model = tiny.build()
    model = adapted("llama", variant)
    ids, mask = left_padded(ROWS)
    with peftkit.disable_adapters(model):
        off = greedy(model, ids, mask, True)
    assert torch.equal(off.sequences, greedy(base_model, ids, mask, True).sequences)


def test_peftkit_generate_uses_the_prompt(tiny_lm) -> None:
    from peftkit.eval.generate import generate

    model, tok = tiny_lm
    template = Template.create(tok)
    prompts = [{"instruction": "Say the color of grass", "input": ""}, {"instruction": "Hi", "input": ""}]
    base = generate(model, template, prompts, max_new_tokens=5)
    peftkit.inject(model, PrefixTuningConfig(num_virtual_tokens=N))
    perturb_adapters(model, std=1.0)
    batched = generate(model, template, prompts, max_new_tokens=5)
    assert batched != base
    assert [generate(model, template, [p], max_new_tokens=5)[0] for p in prompts] == batched


# -- files -------------------------------------------------------------------------------------------------


def test_p_tuning_is_saved_as_a_plain_table(tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = adapted("llama", "p_tuning_mlp", std=0.3)
    out = tiny.run(model)
    peftkit.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (N, 32)
    loaded = peftkit.load_adapter(tiny.build(), tmp_path / "a", trainable=True)
    assert isinstance(loaded.get_input_embeddings().prompt_encoder["default"], PromptTable)
    assert peftkit.count_parameters(loaded).trainable == N * 32
    torch.testing.assert_close(tiny.run(loaded), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant, encoder_cls", [("p_tuning_lstm", PromptEncoder), ("prefix_projection", PrefixEncoder)])
def test_save_encoder_lets_training_resume(variant: str, encoder_cls: type, tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = peftkit.inject(tiny.build(), CONFIGS[variant]())
    model.peftkit_state.configs["default"].save_encoder = True
    perturb_adapters(model, std=0.3)
    out = tiny.run(model)
    peftkit.save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "prompt_embeddings" in keys and any(k.startswith("prompt_encoder.") for k in keys)

    loaded = peftkit.load_adapter(tiny.build(), tmp_path / "a", trainable=True)
    assert loaded.peftkit_state.configs["default"].save_encoder  # saved again with its encoder
    assert isinstance(loaded.get_input_embeddings().prompt_encoder["default"], encoder_cls)
    assert peftkit.count_parameters(loaded).trainable == peftkit.count_parameters(model).trainable
    torch.testing.assert_close(tiny.run(loaded), out, rtol=0, atol=1e-6)


def test_wrong_prompt_shape_is_a_file_error(tmp_path: Path) -> None:
    tiny = make_tiny("llama")
    model = adapted("llama", "prompt_tuning")
    peftkit.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.zeros(N, 16)}, str(file))
    fresh = tiny.build()
    with pytest.raises(AdapterFileError, match=r"'prompt_embeddings' has shape \(4, 16\).*\(4, 32\)"):
        peftkit.load_adapter(fresh, tmp_path / "a")
    assert not hasattr(fresh, "peftkit_state") and type(fresh.get_input_embeddings()) is nn.Embedding
    assert not fresh._forward_pre_hooks
    save_file({"prompt_embeddings": torch.zeros(N, 32), "other": torch.zeros(1)}, str(file))
    with pytest.raises(AdapterFileError, match="'other' does not belong"):
        peftkit.load_adapter(tiny.build(), tmp_path / "a")


# -- training ----------------------------------------------------------------------------------------------

TRAIN_ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
              for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 4


@pytest.mark.parametrize("config, lr", [
    (PromptTuningConfig(num_virtual_tokens=8, init="vocab"), 0.3),
    (PTuningConfig(num_virtual_tokens=8), 1e-2),
    (PrefixTuningConfig(num_virtual_tokens=8), 0.3),
], ids=["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_trainer_reduces_loss(config, lr: float, tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    torch.manual_seed(0)
    peftkit.inject(model, config)
    data = encode_all(Template.create(tok), TRAIN_ROWS, 64).examples
    before = evaluate_loss(model, data, 16, tok.pad_token_id)
    cfg = TrainConfig(max_steps=8, batch_size=4, lr=lr, warmup_steps=0, eval_every=0, save_every=0, log_every=4)
    Trainer(model, data, [], cfg, Batching(tok.pad_token_id), Wiring(tmp_path, show_progress=False)).fit()
    after = evaluate_loss(model, data, 16, tok.pad_token_id)
    assert after < before - 0.8, (before, after)  # ~13 -> ~11.3 nats: only the soft prompt moved


@pytest.mark.parametrize("kind", ["lm", "gpt2"])
@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_projection"])
def test_gradient_checkpointing_gives_the_same_gradients(kind: str, variant: str, request) -> None:
    if kind == "lm":
        model, tok = request.getfixturevalue("tiny_lm")
        batch = pad_batch(encode_all(Template.create(tok), TRAIN_ROWS[:4], 64).examples, tok.pad_token_id)
    else:  # GPT-2 withholds the cache from checkpointed blocks at the model level too
        model = make_tiny("gpt2").build()
        ids, mask = left_padded(ROWS)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    peftkit.inject(model, CONFIGS[variant]())
    perturb_adapters(model, std=0.3)
    model.train()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss, _ = lm_loss_sum(model, batch)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    enable_gradient_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        assert plain[k].abs().sum() > 0, k
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-5, rtol=1e-4, msg=k)


def test_cli_trains_prompt_tuning_and_inspects_the_prompt(tiny_lm_dir, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    out = tmp_path / "run"
    assert main(["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", "method.name=prompt_tuning",
                 "method.num_virtual_tokens=5", "method.init=text", "method.init_text=Say the color",
                 "train.max_steps=3", "train.lr=0.1", "train.batch_size=4", "train.eval_every=0",
                 "train.save_every=0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 5
    capsys.readouterr()

    assert main(["inspect-prompt", str(out / "adapter"), "--model", str(tiny_lm_dir), "--top-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in rows] == list(range(5)) and all(len(r["nearest"]) == 3 for r in rows)
    assert all(r["nearest"][0]["similarity"] >= r["nearest"][-1]["similarity"] for r in rows)
    assert main(["inspect-prompt", str(out / "adapter"), "--model", str(tiny_lm_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 6 and "nearest vocabulary tokens" in table[0]


def test_inspect_prompt_finds_the_init_text(tiny_lm, tmp_path: Path) -> None:
    model, tok = tiny_lm
    text = "Classify the sentiment of this review:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    peftkit.inject(model, PromptTuningConfig(num_virtual_tokens=len(ids), init="text", init_text=text))
    peftkit.save_adapter(model, tmp_path / "a")  # untrained: each virtual token is exactly a text token
    rows = inspect_prompt(tmp_path / "a", top_k=2)
    assert [r["nearest"][0]["id"] for r in rows] == ids
    assert all(abs(r["nearest"][0]["similarity"] - 1.0) < 1e-4 for r in rows)


def test_inspect_prompt_errors(tmp_path: Path, capsys) -> None:
    model = peftkit.inject(make_tiny("llama").build(), PrefixTuningConfig(num_virtual_tokens=2))
    peftkit.save_adapter(model, tmp_path / "prefix")
    with pytest.raises(AdapterFileError, match="PREFIX_TUNING adapter has no virtual tokens in the word embedding"):
        inspect_prompt(tmp_path / "prefix")
    model = peftkit.inject(make_tiny("llama").build(), PromptTuningConfig(num_virtual_tokens=2))
    peftkit.save_adapter(model, tmp_path / "prompt")
    with pytest.raises(ConfigError, match="names no base model; pass --model"):
        inspect_prompt(tmp_path / "prompt")
    assert main(["inspect-prompt", str(tmp_path / "prompt"), "--top-k", "0"]) == 2
    assert "--top-k must be a positive integer" in capsys.readouterr().err
