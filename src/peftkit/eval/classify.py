"""Classification by likelihood: the model "answers" with the label option whose response tokens it
finds most probable after the prompt. No sampling, no parsing of free text; the prompt comes from the
same template used in training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.data.collate import pad_batch
from peftkit.data.template import Template
from peftkit.data.tokenize import IGNORE
from peftkit.train.loop import autocast, model_device


@dataclass
class ClassificationResult:
    accuracy: float
    n: int
    predictions: list[str]
    references: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n}


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
    rows = []
    for ex in examples:
        prompt = template.prompt_ids(ex)
        for opt in options:
            resp = template.response_ids(template.response_text({**ex, "output": opt}))
            rows.append({"input_ids": prompt + resp, "labels": [IGNORE] * len(prompt) + resp})
    device = model_device(model)
    pad_id = template.tokenizer.pad_token_id if template.tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    scores = torch.empty(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([rows[i] for i in idx], pad_id).items()}
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        scores[idx] = (tok * mask).sum(-1).cpu()
    model.train(was_training)
    return scores.view(len(examples), len(options))


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
