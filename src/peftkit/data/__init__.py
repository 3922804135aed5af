"""Data: file formats, built-in datasets, templates, tokenization, batching (no model code)."""
