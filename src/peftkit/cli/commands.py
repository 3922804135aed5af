"""One function per command: register its options (help text is the manual), then call the library."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML config",
                       description="Fine-tune from CONFIG.yaml; any field can be overridden as key=value "
                                   "(e.g. method.r=16 train.max_steps=100). The adapter goes to OUTPUT_DIR/adapter.")
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values read as YAML")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from peftkit.train.config import load_config
    from peftkit.train.run import train_run

    train_run(load_config(*_config_and_overrides(args)), resume=args.resume)
    return 0


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional CONFIG positional may be omitted: a first ``key=value`` is an override."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def _generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a response with the training prompt template")
    p.add_argument("--model", default="smollm2-135m", help="built-in alias or local model folder")
    p.add_argument("--adapter", help="adapter folder (peftkit or PEFT format)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--system", help="system message (chat templates)")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "alpaca", "none"], help="prompt template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from peftkit.data.template import Template, user_example
    from peftkit.eval.generate import generate
    from peftkit.eval.tasks import load_model_with_adapter

    model, tok = load_model_with_adapter(args.model, args.adapter)
    template = Template.create(tok, args.template)
    outs = generate(model, template, [user_example(p, args.system) for p in args.prompt], args.max_new_tokens,
                    args.sample, args.temperature, args.top_p, seed=args.seed)
    for text in outs:
        print(text)
    return 0


def _merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="write a standalone model with the adapter merged into its weights")
    p.add_argument("--model", default="smollm2-135m", help="base model alias or folder")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder (loads with transformers alone)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from peftkit.models.export import merge_to_folder

    print(f"merged model written to {merge_to_folder(args.model, args.adapter, args.out, args.dtype, args.overwrite)}")
    return 0


def _eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="accuracy on a classification split by label likelihood")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", help="adapter folder")
    p.add_argument("--data", default="rotten-tomatoes", help="built-in dataset or file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="evaluate the first N examples of a seeded shuffle")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from peftkit.eval.tasks import evaluate_classification, load_model_with_adapter

    model, tok = load_model_with_adapter(args.model, args.adapter)
    res = evaluate_classification(model, tok, args.data, args.split, args.limit)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "predictions"}))
    else:
        print(f"{res['data']} {res['split']}: accuracy {res['accuracy']:.4f} on {res['n']} examples")
    return 0


def _info(sub: Any) -> None:
    p = sub.add_parser("info", help="methods, built-in models and datasets; parameter count of a config")
    p.add_argument("config", nargs="?", help="YAML config: print its trainable-parameter count (no training)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from peftkit.info import describe

    config, overrides = _config_and_overrides(args)
    print(describe(config, overrides))
    return 0


def _demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="LoRA on smollm2-135m + rotten-tomatoes: accuracy before/after, a sample")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--eval-examples", type=int, default=200, help="test examples scored before and after")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from peftkit.demo import demo

    demo(args.output_dir, args.steps, args.eval_examples)
    return 0


REGISTER = [_train, _generate, _eval, _merge, _info, _demo]
__all__ = ["REGISTER"]
