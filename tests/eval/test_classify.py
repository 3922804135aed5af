import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.data.template import Template
from peftkit.eval.classify import classify, option_logprobs, option_tokens
from peftkit.methods.llama_adapter import LlamaAdapterAttention, LlamaAdapterConfig
from tests.tiny import perturb_adapters

EXAMPLES = [
    {"instruction": "Classify the sentiment.", "input": "I loved it, wonderful.", "output": "positive"},
    {"instruction": "Classify the sentiment.", "input": "Dull.", "output": "negative"},
    {"instruction": "Classify the sentiment of this long review.", "input": "word " * 20, "output": "negative"},
]
OPTIONS = ["negative", "positive", "mixed feelings overall"]


def naive_scores(model, template, examples, options):
    """Reference: one full forward per (example, option), right padded, sum of response log-probs."""
    out = torch.empty(len(examples), len(options))
    for i, ex in enumerate(examples):
        prompt = template.prompt_ids(ex)
        for j, ans in enumerate(option_tokens(template, ex, options)):
            ids = torch.tensor([prompt + ans])
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits[0, :-1], -1)
            tgt = ids[0, 1:]
            out[i, j] = logp[torch.arange(len(tgt)), tgt][len(prompt) - 1:].sum()
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_cached_batched_scoring_equals_naive(tiny_lm, batch_size):
    model, tok = tiny_lm
    template = Template.create(tok)
    got = option_logprobs(model, template, EXAMPLES, OPTIONS, batch_size=batch_size)
    torch.testing.assert_close(got, naive_scores(model, template, EXAMPLES, OPTIONS), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_cached_batched_scoring_equals_naive_with_a_trained_llama_adapter(tiny_lm, batch_size):
    """The scoring path (left-padded prompts, options continuing from a shared KV cache) gives the plain
    full forward's log-probs for LLaMA-Adapter, whose prompt is attended outside the cache: gates open."""
    model, tok = tiny_lm
    template = Template.create(tok)
    with torch.no_grad():
        base = naive_scores(model, template, EXAMPLES, OPTIONS)
    peftkit.inject(model, LlamaAdapterConfig(adapter_len=4))  # both layers, GQA (4 query / 2 key-value heads)
    perturb_adapters(model, std=1.0)
    layers = [m for m in model.modules() if isinstance(m, LlamaAdapterAttention)]
    gates = [g.item() for m in layers for g in m.adaption_gate.values()]
    assert len(gates) == 2 and min(abs(g) for g in gates) > 0.1
    assert len({len(template.prompt_ids(ex)) for ex in EXAMPLES}) == 3  # batches of 2 and 16 are left padded
    expected = naive_scores(model, template, EXAMPLES, OPTIONS)
    assert (expected - base).abs().max() > 0.1  # the adapter really changes the scores
    got = option_logprobs(model, template, EXAMPLES, OPTIONS, batch_size=batch_size)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_classify_picks_the_option_the_model_was_taught(tiny_lm, tmp_path):
    """A constructed case with a known answer: train the tiny LM until it says the label, then classify.

    Each review is its word repeated: with one token to find, some initialisations of the tiny model never
    learn to tell two of the words apart (its attention at init is nearly one-hot). A full batch, lr 5e-3 with
    a cosine decay: passed for 16 of 16 model initialisations with the fused and with the plain loss (worst
    margin 8.3 nats, the two losses' margins within 0.5 nats of each other), where lr 1e-2, constant, batches
    of 8 and single-word reviews failed for 3-5 of 8, different ones with the two losses.
    """
    from peftkit.data.tokenize import encode_all
    from peftkit.train.config import TrainConfig
    from peftkit.train.loop import Batching, Trainer, Wiring

    model, tok = tiny_lm
    template = Template.create(tok)
    rows = [{"instruction": "Is this good?", "input": " ".join([w] * 6), "output": lab}
            for w, lab in [("great", "positive"), ("awful", "negative"), ("superb", "positive"), ("bad", "negative")]]
    before = classify(model, template, rows, ["negative", "positive"])
    # every weight trains (the loop is method-agnostic): the tiny model memorises the four labels quickly
    Trainer(model, encode_all(template, rows * 4, 64).examples, [], TrainConfig(max_steps=60, batch_size=16, lr=5e-3,
            warmup_steps=5, save_every=0, eval_every=0, schedule="cosine"), Batching(tok.pad_token_id),
            Wiring(tmp_path, show_progress=False)).fit()
    after = classify(model, template, rows, ["negative", "positive"])
    assert after.accuracy == 1.0 and after.predictions == [r["output"] for r in rows]
    assert before.accuracy < 1.0 and before.n == after.n == 4  # it was taught, not lucky at init
