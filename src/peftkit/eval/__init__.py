"""Evaluation: metrics, classification by label likelihood or by head, generation, in-context baselines, forgetting.

The choice of what ``peftkit eval --task`` scores is declared here (no torch import) for the CLI and
:func:`peftkit.eval.scoring.evaluate` alike.
"""

from __future__ import annotations

from typing import Literal, get_args

EvalTask = Literal["auto", "classification", "multiple_choice", "generation", "perplexity", "preference"]
EVAL_TASKS: tuple[str, ...] = get_args(EvalTask)
