"""The label value every loss skips: PyTorch ``cross_entropy``'s default ``ignore_index`` (-100), which Hugging
Face's models and collators use too. Defined once: data (prompt tokens, padding), the soft-prompt methods (their
virtual tokens) and the training losses all mark or skip labels with it."""

IGNORE = -100

__all__ = ["IGNORE"]
