"""Built-in methods: importing this package registers each of them (one file per method)."""

from peftkit.methods import lora  # noqa: F401
