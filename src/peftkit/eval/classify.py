"""Classification by likelihood: the model "answers" with the label option whose response tokens it
finds most probable after the prompt. No sampling, no parsing of free text; the prompt comes from the
same template used in training.

The prompt is run once per example (left-padded, with the KV cache kept), and the options continue
from that cache, so scoring k options costs about one forward pass instead of k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.data.collate import pad_batch
from peftkit.data.template import Template, with_response
from peftkit.train.precision import autocast, model_device


@dataclass
class ClassificationResult:
    accuracy: float
    n: int
    predictions: list[str]
    references: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n}


def option_tokens(template: Template, example: dict[str, Any], options: Sequence[str]) -> list[list[int]]:
    """Response tokens (with the end marker) for each option."""
    return [template.response_ids(template.response_text(with_response(example, o))) for o in options]


@torch.no_grad()
def option_logprobs(
    model: nn.Module,
    template: Template,
    examples: Sequence[dict[str, Any]],
    options: Sequence[str],
    batch_size: int = 16,
    precision: str = "fp32",
) -> torch.Tensor:
    """Summed log-probability of each option's response tokens: (num_examples, num_options)."""
    device = model_device(model)
    tok = template.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    prompts = [template.prompt_ids(ex) for ex in examples]
    answers = [option_tokens(template, ex, options) for ex in examples]
    scores = torch.empty(len(examples), len(options))
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        with autocast(device, precision):
            scores[idx] = _score_batch(model, [prompts[i] for i in idx], [answers[i] for i in idx], pad_id, device)
    model.train(was_training)
    return scores


def _score_batch(model: nn.Module, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int,
                 device: torch.device) -> torch.Tensor:
    B, K = len(prompts), len(answers[0])
    p = pad_batch([{"input_ids": x} for x in prompts], pad_id, side="left")
    mask = p["attention_mask"].to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (left padding)
    out = model(input_ids=p["input_ids"].to(device), attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): predicts each option's first token
    flat = [a for per_example in answers for a in per_example]  # B*K options, example-major
    score = torch.tensor([float(first[i // K, a[0]]) for i, a in enumerate(flat)])
    rest = [a[1:] for a in flat]
    width = max(len(r) for r in rest)
    if width == 0:
        return score.view(B, K)
    cache = out.past_key_values
    cache.batch_repeat_interleave(K)
    # the options' tokens continue each prompt; right padding inside the continuation is harmless (causal)
    inputs = torch.full((B * K, width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((B * K, width), dtype=torch.long)
    for i, a in enumerate(flat):
        inputs[i, : len(a) - 1] = torch.tensor(a[:-1], dtype=torch.long) if len(a) > 1 else inputs[i, :0]
        cont_mask[i, : len(a) - 1] = 1
    full_mask = torch.cat([mask.repeat_interleave(K, dim=0), cont_mask.to(device)], dim=1)
    start = mask.sum(-1).repeat_interleave(K)  # (B*K,) real prompt lengths
    positions = start[:, None] + torch.arange(width, device=device)[None, :]
    logits = model(input_ids=inputs.to(device), attention_mask=full_mask, position_ids=positions,
                   past_key_values=cache, use_cache=False).logits  # (B*K, width, V)
    logp = F.log_softmax(logits.float(), dim=-1)
    for i, r in enumerate(rest):
        if r:
            score[i] += float(logp[i, torch.arange(len(r)), torch.tensor(r)].sum())
    return score.view(B, K)


def classify(
    model: nn.Module,
    template: Template,
    examples: Sequence[dict[str, Any]],
    options: Sequence[str],
    label_key: str = "output",
    batch_size: int = 16,
    precision: str = "fp32",
) -> ClassificationResult:
    """Accuracy of picking the most likely option against ``example[label_key]``."""
    scores = option_logprobs(model, template, examples, options, batch_size, precision)
    preds = [options[i] for i in scores.argmax(-1).tolist()]
    refs = [ex[label_key] for ex in examples]
    correct = sum(p == r for p, r in zip(preds, refs))
    return ClassificationResult(correct / max(len(refs), 1), len(refs), preds, refs)
