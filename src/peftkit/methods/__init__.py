"""Built-in methods: importing this package registers each of them (one file per method)."""

from peftkit.methods import lora  # noqa: F401
from peftkit.methods import ia3  # noqa: F401
from peftkit.methods import dora  # noqa: F401
from peftkit.methods import bottleneck  # noqa: F401
from peftkit.methods import llama_adapter  # noqa: F401
from peftkit.methods import prompt_tuning  # noqa: F401
from peftkit.methods import p_tuning  # noqa: F401
from peftkit.methods import prefix_tuning  # noqa: F401
from peftkit.methods import selective  # noqa: F401
from peftkit.methods import bitfit  # noqa: F401
from peftkit.methods import linear_probe  # noqa: F401
from peftkit.methods import full  # noqa: F401
from peftkit.methods import qlora  # noqa: F401
