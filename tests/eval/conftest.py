from tests.lm import tiny_lm, tiny_lm_dir, tokenizer  # noqa: F401  (fixtures)
