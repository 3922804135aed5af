from tests.lm import tokenizer  # noqa: F401  (fixture)
