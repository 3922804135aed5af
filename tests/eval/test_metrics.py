import math

import pytest

from peftkit.eval.metrics import accuracy, bleu, chrf, exact_match, generation_metrics, normalize, rouge, token_f1


def test_accuracy_and_exact_match():
    assert accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    assert normalize("The  Cat, sat!") == "cat sat"
    assert exact_match(["The cat.", "a dog"], ["cat", "dog!"]) == 1.0
    assert exact_match(["cat"], ["dog"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy(["a", "b"], ["a"])


def test_token_f1_by_hand():
    # pred "cat sat" vs ref "cat sat down": P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1(["The cat sat"], ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1([""], [""]) == 1.0 and token_f1(["x"], [""]) == 0.0
    assert token_f1(["dog"], ["cat"]) == 0.0


def test_rouge_by_hand():
    r = rouge(["the cat sat on the mat"], ["the cat is on the mat"])
    # unigrams: 5 of 6 shared both ways; bigrams: the cat, on the, the mat shared of 5
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)  # LCS: the cat on the mat


def test_bleu_chrf_bounds_and_known_value():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["xyz qqq"], ["the cat sat on the mat"]) == pytest.approx(0.0, abs=1e-9)
    assert chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # brevity penalty only: a perfect prefix of 4 of 6 words -> BLEU = exp(1 - 6/4) * 100
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-3)


def test_generation_metrics_keys():
    m = generation_metrics(["a b"], ["a b"])
    assert set(m) == {"exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "bleu", "chrf"}
    assert m["exact_match"] == 1.0 and m["rougeL"] == 1.0


def test_per_example_scores_average_to_the_metric() -> None:
    from peftkit.eval.metrics import per_example_scores, rouge

    preds, refs = ["positive", "negative", "negative"], ["positive", "positive", "negative"]
    assert per_example_scores("accuracy", preds, refs) == [1.0, 0.0, 1.0]
    gen_p, gen_r = ["the cat sat", "a dog ran far", "hello"], ["the cat sat down", "the dog ran", "goodbye"]
    each = per_example_scores("rougeL", gen_p, gen_r)
    assert sum(each) / 3 == pytest.approx(rouge(gen_p, gen_r)["rougeL"]) and each[2] == 0.0
    with pytest.raises(ValueError, match="no per-example form"):
        per_example_scores("bleu", gen_p, gen_r)
