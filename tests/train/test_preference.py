"""Preference objectives against the reference stack: PEFT's LoRA (and its ``disable_adapter`` as the reference),
TRL's log-probabilities (``selective_log_softmax``) and TRL's loss code (DPO sigmoid / hinge / IPO as
``DPOTrainer._compute_loss`` writes them; ORPO's ``odds_ratio_loss`` called itself): the same batch gives the same
loss and the same adapter gradients as peftkit's objective."""

from __future__ import annotations

import copy
import types

import peft
import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

import peftkit
from peftkit.core.labels import IGNORE
from peftkit.runs.preference import adapters_off_logps
from peftkit.train.preference import PreferenceLoss, pair_collate, sequence_logps


@pytest.fixture
def load_base(hf_base_dir):
    from transformers import AutoModelForCausalLM

    return lambda kind: AutoModelForCausalLM.from_pretrained(hf_base_dir(kind)).eval()


def _pairs(n: int = 3, seed: int = 0) -> list[dict[str, list[int]]]:
    """n pairs on a shared prompt length, answers of different lengths (labels on the answer only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 90, (5 + i,), generator=g).tolist()
        chosen = torch.randint(3, 90, (2 + i,), generator=g).tolist()
        rejected = torch.randint(3, 90, (4 - i % 2,), generator=g).tolist()
        out.append({"input_ids": prompt + chosen, "labels": [IGNORE] * len(prompt) + chosen,
                    "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE] * len(prompt) + rejected})
    return out


def _twins(load_base, tmp_path):
    """A PEFT LoRA model and peftkit's, loaded from PEFT's files: the same weights (B not zero)."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(load_base("llama"), cfg)
    theirs.save_pretrained(tmp_path / "a")
    ours = load_base("llama")
    peftkit.load_adapter(ours, tmp_path / "a", trainable=True)
    return theirs.train(), ours.train()


def _trl_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and per-token-mean completion log-probabilities the way TRL's trainers compute them."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    per_token = selective_log_softmax(logits.float(), labels.masked_fill(~mask, 0)) * mask
    return per_token.sum(1), per_token.sum(1) / mask.sum(1)


def _trl_loss(kind: str, beta: float, theirs, batch) -> torch.Tensor:
    """TRL 1.16's losses, written as its DPOTrainer._compute_loss writes them (dpo_trainer.py:1387-1404)."""
    logps, mean = _trl_logps(theirs, batch)
    b = logps.shape[0] // 2
    with torch.no_grad(), theirs.disable_adapter():
        ref, _ = _trl_logps(theirs, batch)
    ratio_c, ratio_r = logps[:b] - ref[:b], logps[b:] - ref[b:]
    delta = ratio_c - ratio_r
    if kind == "dpo":
        return (-F.logsigmoid(beta * delta)).mean()
    if kind == "hinge":
        return torch.relu(1 - beta * delta).mean()
    mask = (batch["labels"][:, 1:] != IGNORE).float()
    n = mask.sum(1)
    ipo = ratio_c / n[:b] - ratio_r / n[b:]
    return ((ipo - 1 / (2 * beta)) ** 2).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default", "").replace("lora_A.weight", "lora_A") \
                .replace("lora_B.weight", "lora_B")
            out[key] = p.grad.clone()
    return out


@pytest.mark.parametrize("kind", ["dpo", "hinge", "ipo"])
def test_loss_and_adapter_gradients_match_trl_and_peft(load_base, tmp_path, kind):
    theirs, ours = _twins(load_base, tmp_path)
    batch = pair_collate(_pairs(), pad_id=0)
    expected = _trl_loss(kind, 0.3, theirs, batch)
    expected.backward()
    objective = PreferenceLoss(kind, beta=0.3, reference=adapters_off_logps)
    total, n = objective(ours, batch)
    (total / n).backward()
    # fp32 sums over a few dozen tokens and a 100-word vocabulary: ~1e-6 relative
    assert torch.allclose(total / n, expected, rtol=1e-5, atol=1e-6), (float(total / n), float(expected))
    g_theirs, g_ours = _grads(theirs), _grads(ours)
    assert len(g_ours) == 8 and g_ours.keys() <= {k.replace(".weight", "") for k in g_theirs} | set(g_theirs)
    for name, g in g_ours.items():
        ref = g_theirs.get(name, g_theirs.get(name + ".weight"))
        assert ref is not None, name
        assert torch.allclose(g.reshape(ref.shape), ref, rtol=1e-4, atol=1e-7), name


def test_orpo_odds_ratio_matches_trls_function(load_base, tmp_path):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    _, ours = _twins(load_base, tmp_path)
    batch = pair_collate(_pairs(), pad_id=0)
    logps, counts = sequence_logps(ours, batch)
    mean = logps / counts
    b = mean.shape[0] // 2
    fake = types.SimpleNamespace(beta=0.2, accelerator=types.SimpleNamespace(device="cpu"))
    terms, *_ = ORPOTrainer.odds_ratio_loss(fake, mean[:b], mean[b:])  # beta * log sigma(log odds ratio)
    per_pair, _ = PreferenceLoss("orpo", beta=0.2).pair_losses(logps, counts, None, batch)
    nll = -mean[:b]  # the SFT term on the chosen answer (the paper's; TRL also counts the prompt's tokens)
    assert torch.allclose(per_pair, nll - terms, rtol=1e-5, atol=1e-6)


def test_logps_are_trls(load_base, tmp_path):
    theirs, ours = _twins(load_base, tmp_path)
    batch = pair_collate(_pairs(4, seed=3), pad_id=0)
    with torch.no_grad():
        assert torch.allclose(sequence_logps(ours, batch)[0], _trl_logps(theirs, batch)[0], rtol=1e-5, atol=1e-5)


def test_disabled_adapter_reference_equals_a_frozen_copy(load_base, tmp_path):
    _, ours = _twins(load_base, tmp_path)
    frozen = copy.deepcopy(load_base("llama")).eval()
    batch = pair_collate(_pairs(), pad_id=0)
    with torch.no_grad():
        assert torch.equal(adapters_off_logps(ours.eval(), batch), sequence_logps(frozen, batch)[0])


def test_simpo_and_label_smoothing_formulas():
    logps = torch.tensor([-4.0, -9.0, -6.0, -5.0], dtype=torch.float64)
    counts = torch.tensor([2, 3, 3, 2])
    ref = torch.tensor([-5.0, -8.0, -5.5, -6.0], dtype=torch.float64)
    simpo, _ = PreferenceLoss("simpo", beta=2.0, gamma=0.5).pair_losses(logps, counts, None, {})
    avg = logps / counts
    assert torch.allclose(simpo, -F.logsigmoid(2.0 * (avg[:2] - avg[2:]) - 0.5))
    smooth, rewards = PreferenceLoss("dpo", beta=0.5, label_smoothing=0.2).pair_losses(logps, counts, ref, {})
    d = (logps[:2] - ref[:2]) - (logps[2:] - ref[2:])
    assert torch.allclose(smooth, -0.8 * F.logsigmoid(0.5 * d) - 0.2 * F.logsigmoid(-0.5 * d))
    assert torch.allclose(rewards[0], 0.5 * (logps[:2] - ref[:2])) and torch.allclose(rewards[1], 0.5 * (logps[2:] - ref[2:]))


def test_metrics_are_means_over_the_pairs_seen_then_reset(load_base, tmp_path):
    _, ours = _twins(load_base, tmp_path)
    objective = PreferenceLoss("dpo", beta=0.1, reference=adapters_off_logps)
    batch = pair_collate(_pairs(), pad_id=0)
    objective(ours, batch)
    objective(ours, batch)
    m = objective.metrics()
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                      "logps/rejected"}
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-9)
    assert 0 <= m["rewards/accuracies"] <= 1 and objective.metrics() == {}
    ours.eval()
    objective(ours, batch)  # validation forwards are not training metrics
    assert objective.metrics() == {}
