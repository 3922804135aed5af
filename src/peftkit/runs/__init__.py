"""Runs: a config in, a trained and scored adapter out -- the run config, task types, multi-task runs, the final
evaluation, the memory predictor, comparisons, export, the demo and ``peftkit info``. Builds on ``train/`` (the
loop), ``eval/`` (scoring), ``methods/`` and ``models/``; nothing below imports it."""
