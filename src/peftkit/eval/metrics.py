"""Text metrics. ROUGE comes from ``rouge-score`` and BLEU/chrF from ``sacrebleu``; only the trivial ones
(accuracy, SQuAD-style exact match and token F1) are written here."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    _same_length(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    _same_length(predictions, references)
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of the F1 between normalised token bags (SQuAD's definition)."""
    _same_length(predictions, references)
    scores = []
    for p, r in zip(predictions, references):
        pt, rt = normalize(p).split(), normalize(r).split()
        if not pt or not rt:
            scores.append(float(pt == rt))
            continue
        common = sum((Counter(pt) & Counter(rt)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pt), common / len(rt)
        scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / max(len(scores), 1)


def per_example_scores(metric: str, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Each example's share of ``metric`` (its mean over the examples is the metric): 1/0 for ``accuracy``, the
    ROUGE-L F-measure for ``rougeL``; what intervals and paired tests resample (eval/stats.py)."""
    _same_length(predictions, references)
    if metric == "accuracy":
        return [1.0 if p == r else 0.0 for p, r in zip(predictions, references)]
    if metric != "rougeL":
        raise ValueError(f"no per-example form of {metric!r}")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (stemmed), from the ``rouge-score`` package."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for p, r in zip(predictions, references):
        for name, score in scorer.score(r, p).items():
            totals[name] += score.fmeasure
    n = max(len(references), 1)
    return {name: totals[name] / n for name in ("rouge1", "rouge2", "rougeL")}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) from ``sacrebleu``."""
    import sacrebleu

    _same_length(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100) from ``sacrebleu``."""
    import sacrebleu

    _same_length(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / max(n_tokens, 1))


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Everything that scores free text against a reference."""
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": token_f1(predictions, references),
        **rouge(predictions, references),
        "bleu": bleu(predictions, references),
        "chrf": chrf(predictions, references),
    }


def _same_length(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
