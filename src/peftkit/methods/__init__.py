"""Built-in methods: importing this package registers each of them (one file per method)."""

from peftkit.methods import (
    bitfit,  # noqa: F401
    bottleneck,  # noqa: F401
    dora,  # noqa: F401
    full,  # noqa: F401
    ia3,  # noqa: F401
    linear_probe,  # noqa: F401
    llama_adapter,  # noqa: F401
    lora,  # noqa: F401
    p_tuning,  # noqa: F401
    prefix_tuning,  # noqa: F401
    prompt_tuning,  # noqa: F401
    qlora,  # noqa: F401
    selective,  # noqa: F401
)
