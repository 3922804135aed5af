"""One function per command: register its options (help text is the manual), then call the library."""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_HELP = "base model alias or local folder (default: the base the --adapter records; without --adapter: smollm2-135m)"


# -- options several commands share: defined once ----------------------------------------------------------------
def _add_config(p: argparse.ArgumentParser, config_help: str = "YAML config (default: built-in defaults)",
                overrides_help: str = "dotted overrides, as for `peftkit train`", optional: bool = True) -> None:
    """The CONFIG.yaml positional and its ``key=value`` overrides (see :func:`_config_and_overrides`)."""
    p.add_argument("config", nargs="?" if optional else None, help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def _add_model(p: argparse.ArgumentParser, text: str = MODEL_HELP) -> None:
    p.add_argument("--model", help=text)


def _add_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="adapter folder (peftkit or PEFT format)")


def _add_template(p: argparse.ArgumentParser) -> None:
    from peftkit.data.template import KINDS

    p.add_argument("--template", default="auto", choices=KINDS,
                   help="prompt template (auto: the tokenizer's chat template when it has one, else alpaca)")


def _add_max_new_tokens(p: argparse.ArgumentParser, default: int, text: str) -> None:
    p.add_argument("--max-new-tokens", type=int, default=default, help=text)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="--sample: softmax temperature (> 0)")
    p.add_argument("--top-p", type=float, default=0.9, help="--sample: nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="--sample: random seed")


def _add_strict_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-base", action="store_true",
                   help="refuse an adapter recorded as trained on other base weights (default: warn)")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML config",
                       description="Fine-tune from CONFIG.yaml; any field can be overridden as key=value "
                                   "(e.g. method.r=16 train.max_steps=100). The adapter goes to OUTPUT_DIR/adapter.")
    _add_config(p, overrides_help="dotted overrides, values read as YAML")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from peftkit.runs.config import load_config
    from peftkit.runs.run import train_run

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
    _add_model(p)
    _add_adapter(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--system", help="system message (chat templates)")
    _add_template(p)
    _add_max_new_tokens(p, 64, "tokens generated at most per prompt (>= 1)")
    _add_sampling(p)
    _add_strict_base(p)
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from peftkit.data.template import Template, user_example
    from peftkit.eval.generate import generate
    from peftkit.eval.scoring import load_model_with_adapter

    _check_generation_args(args)  # before the model is loaded
    model, tok = load_model_with_adapter(_model(args), args.adapter, strict_base=args.strict_base)
    template = Template.create(tok, args.template)
    outs = generate(model, template, [user_example(p, args.system) for p in args.prompt], args.max_new_tokens,
                    args.sample, args.temperature, args.top_p, seed=args.seed)
    for text in outs:
        print(text)
    return 0


def _chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="talk to a model or fine-tune in the terminal, answers streamed",
                       description="An interactive chat with the prompt template the adapter trained with. "
                                   "/reset forgets the conversation, /system TEXT sets the system message, /exit "
                                   "quits. From a pipe, every line is a message and every answer one line.")
    _add_model(p)
    _add_adapter(p)
    p.add_argument("--system", help="system message (chat templates)")
    _add_template(p)
    _add_max_new_tokens(p, 256, "tokens generated at most per answer (>= 1)")
    _add_sampling(p)
    p.add_argument("--context", type=int, help="tokens kept (conversation + answer; default: the model's context, "
                                               "at most 4096)")
    _add_strict_base(p)
    p.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    import sys

    import torch

    from peftkit.data.template import Template
    from peftkit.eval.scoring import load_model_with_adapter
    from peftkit.runs.chat import ChatSession, run_chat

    _check_generation_args(args)
    model, tok = load_model_with_adapter(_model(args), args.adapter, strict_base=args.strict_base)
    torch.manual_seed(args.seed)
    limit = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    session = ChatSession(model, Template.create(tok, args.template), args.system, args.max_new_tokens, args.sample,
                          args.temperature, args.top_p, min(args.context or min(limit, 4096), limit))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    interactive = sys.stdin.isatty()
    run_chat(session, _typed_lines() if interactive else sys.stdin, write, interactive)
    return 0


def _typed_lines() -> Any:
    import sys

    while True:
        sys.stdout.write(">>> ")  # on stdout: input()'s prompt goes to stderr on a terminal
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            print()
            return
        yield line


def _model(args: argparse.Namespace) -> str:
    """``--model``, defaulting to the base the adapter(s) record (the built-in default without an adapter)."""
    from peftkit.models.builtin import default_model

    if args.model is None:
        adapters = args.adapter if isinstance(args.adapter, list) else [args.adapter] if args.adapter else []
        args.model = default_model(adapters)
    return args.model


def _check_generation_args(args: argparse.Namespace) -> None:
    from peftkit.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "sample", False):
        if not args.temperature > 0 or args.temperature == float("inf"):
            raise ConfigError(f"--temperature must be > 0 (use greedy decoding without --sample), got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")


def _merge(sub: Any) -> None:
    from peftkit.core.combine import COMBINATIONS, SIGN_METHODS

    p = sub.add_parser("merge", help="write a standalone model with the adapter merged into its weights, "
                                     "or combine several LoRA adapters into one",
                       description="One --adapter: a standalone model with it merged. Several --adapter (or "
                                   "--combination): one LoRA adapter combined from them (PEFT format), or with "
                                   "--into-base a standalone model with that combination merged. Combinations: "
                                   + "; ".join(f"{k}: {v}" for k, v in COMBINATIONS.items()) + ".")
    _add_model(p)
    p.add_argument("--adapter", required=True, action="append", help="adapter folder (repeat to combine several)")
    p.add_argument("--out", required=True, help="output folder: the merged model (loads with transformers alone) "
                                                "or the combined adapter")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="merged model's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--combination", choices=list(COMBINATIONS),
                   help="how to combine the adapters (default with several adapters: cat, the exact sum)")
    p.add_argument("--weights", help="comma-separated weight per adapter, e.g. 0.5,0.5 (default: all 1; "
                                     "negative first value: --weights=-1,1)")
    p.add_argument("--density", type=float, help="ties/dare/dare_ties: fraction of each delta kept, in (0, 1]")
    p.add_argument("--rank", type=int, help="svd/ties/dare/dare_ties: rank of the combined adapter")
    p.add_argument("--majority-sign", default="total", choices=SIGN_METHODS,
                   help="ties/dare_ties: elect each entry's sign by summed mass or by count")
    p.add_argument("--seed", type=int, default=0, help="dare/dare_ties: seed of the random drop")
    p.add_argument("--into-base", action="store_true",
                   help="with several adapters: write a standalone model with the combination merged")
    _add_strict_base(p)
    p.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from peftkit.runs.export import merge_to_folder

    if len(args.adapter) > 1 or any(v is not None for v in (args.combination, args.weights, args.density, args.rank)):
        return _run_combine(args)
    out = merge_to_folder(_model(args), args.adapter[0], args.out, args.dtype, args.overwrite, args.strict_base)
    print(f"merged model written to {out}")
    return 0


def _export(sub: Any) -> None:
    from peftkit.runs.export.gguf_model import GGUF_DTYPES

    p = sub.add_parser("export", help="write a fine-tune (or a base) as GGUF for llama.cpp, Ollama and LM Studio",
                       description="A LoRA/QLoRA --adapter becomes a llama.cpp LoRA file (adapter.gguf, used over a "
                                   "GGUF of the same base); --merge, and every method a LoRA file cannot express "
                                   "(DoRA, IA3, full and selective fine-tunes, ...), a merged model.gguf; --model "
                                   "alone, the base as model.gguf. --ollama adds a Modelfile (and base.gguf for a "
                                   "LoRA file): ollama create NAME -f OUT/Modelfile. Written offline, without llama.cpp.")
    _add_model(p)
    _add_adapter(p)
    p.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="write the merged model instead of a LoRA file")
    p.add_argument("--dtype", default="f16", choices=list(GGUF_DTYPES),
                   help="tensor type (vectors stay f32; q8_0 rows that are not whole 32-value blocks are f16)")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile (chat template, stop words)")
    p.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name (default: the built-in model's own; "
                                           "'default' for other models)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _add_strict_base(p)
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from peftkit.errors import ConfigError
    from peftkit.runs.export.gguf import export_gguf

    if args.adapter is None and args.model is None:
        raise ConfigError("give --adapter (a fine-tune) or --model (a base) to export")
    result = export_gguf(_model(args), args.adapter, args.out, args.dtype, args.merge, args.ollama, args.overwrite,
                         args.strict_base, args.tokenizer_pre)
    for note in result.notes:
        print(f"note: {note}")
    print(f"{result.route} GGUF written to {result.out}: {', '.join(result.files)}")
    if args.ollama:
        print(f"ollama create NAME -f {result.out / 'Modelfile'}")
    return 0


def _run_combine(args: argparse.Namespace) -> int:
    from peftkit.errors import ConfigError
    from peftkit.runs.combine import combine_to_folder

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    out = combine_to_folder(_model(args), args.adapter, args.out, weights, args.combination or "cat", args.density,
                            args.rank, args.majority_sign, args.seed, args.into_base, args.dtype, args.overwrite,
                            args.strict_base)
    print(f"{'merged model' if args.into_base else 'combined adapter'} written to {out}")
    return 0


def _eval(sub: Any) -> None:
    from peftkit.data.builtin import SPLITS
    from peftkit.eval import EVAL_TASKS

    p = sub.add_parser("eval", help="score a model (+ adapter) on a task: accuracy, ROUGE/BLEU, perplexity",
                       description="Classification by label likelihood, MMLU-style multiple choice from a file "
                                   "(question, choices, answer), free generation scored with EM/F1/ROUGE/BLEU/chrF, "
                                   "or perplexity of a .txt file. --shots K gives the in-context baseline.")
    _add_model(p)
    _add_adapter(p)
    p.add_argument("--data", default="rotten-tomatoes", help="built-in dataset, data file, or .txt for perplexity")
    p.add_argument("--task", default="auto", choices=EVAL_TASKS,
                   help="what to score (auto: from the data: labels -> classification, .txt -> perplexity, else generation)")
    p.add_argument("--test", metavar="FILE",
                   help="a dedicated test file, scored whole as the test split (same format as --data; --data still "
                        "gives the shots and label options); without it the test split is the 10%% of a --data file "
                        "(20+ rows with answers) that training holds out, seeded, or a built-in dataset's own")
    p.add_argument("--split", default="test", choices=SPLITS, help="split of the data scored")
    p.add_argument("--limit", type=int, help="evaluate the first N examples of a seeded shuffle (N >= 1; default: all)")
    p.add_argument("--shots", type=int, default=0, help="k solved training examples before each query (0: zero-shot)")
    _add_template(p)
    _add_max_new_tokens(p, 48, "generation tasks: tokens generated at most (>= 1)")
    p.add_argument("--predictions", help="write per-example predictions to this JSONL file")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (--limit) and of the shots drawn")
    _add_json(p)
    p.add_argument("--forgetting", action="store_true",
                   help="what the fine-tune cost: perplexity of held-out general text (hamlet.txt, or --data FILE.txt) "
                        "and the --data task's score, base (adapter off) vs fine-tuned; positive forgetting = ability lost")
    p.add_argument("--forgetting-tokens", type=int, default=2048, help="--forgetting: tokens of general text scored")
    p.add_argument("--base", help="--forgetting/--harness: the base model to compare against (default: --model; "
                                  "needed when --model is a fully fine-tuned model folder)")
    p.add_argument("--harness", metavar="TASKS",
                   help="run lm-evaluation-harness tasks (comma-separated; shipped: peftkit_rotten_tomatoes, "
                        "peftkit_hamlet) on the adapter and its base, side by side (pip install lm-eval)")
    p.add_argument("--harness-include", action="append", default=[], metavar="DIR",
                   help="--harness: a folder of lm-eval task YAMLs (local JSONL data: dataset_path: json)")
    _add_strict_base(p)
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from peftkit.eval.scoring import evaluate, load_model_with_adapter

    _check_eval_args(args)  # before the model is loaded
    model, tok = load_model_with_adapter(_model(args), args.adapter, strict_base=args.strict_base)
    if args.harness:
        return _print_harness(args, model, tok)
    if args.forgetting:
        return _print_forgetting(args, model, tok)
    res = evaluate(model, tok, args.data, args.task, args.split, args.limit, args.shots, args.template, args.seed,
                   max_new_tokens=args.max_new_tokens, predictions_file=args.predictions, test=args.test)
    if args.json:
        print(json.dumps(res))
    else:
        head = f"{res['data']} ({res['task']}"
        head += f", {res['split']}, {res['n']} examples, {res['shots']}-shot)" if "split" in res else ")"
        metrics = {k: v for k, v in res.items() if isinstance(v, float)}
        print(head + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _print_harness(args: argparse.Namespace, model: Any, tok: Any) -> int:
    from peftkit.eval.harness import harness_report

    base = None
    if args.base:
        from peftkit.eval.scoring import load_model_with_adapter

        def base() -> Any:
            return load_model_with_adapter(args.base)[0]
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    report = harness_report(model, tok, tasks, args.harness_include, args.limit, base)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"lm-eval ({report['base_from']} = base{f', first {args.limit} documents' if args.limit else ''}):")
    print(f"  {'task / metric':<40} {'base':>12} {'adapter':>12} {'gap':>12}")
    for task, metrics in report["tasks"].items():
        for metric, v in metrics.items():
            print(f"  {task + ' / ' + metric:<40} {v['base']:>12.4f} {v['adapter']:>12.4f} {v['gap']:>+12.4f}")
    return 0


def _check_eval_args(args: argparse.Namespace) -> None:
    from peftkit.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (leave it out to score every example), got {args.limit}")
    if args.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {args.shots}")
    _check_generation_args(args)
    if args.test is not None:
        _check_test_file_args(args)
    if args.forgetting:
        _check_forgetting_args(args)
    if args.harness is not None and not args.adapter and not args.base:
        raise ConfigError("--harness scores a fine-tune beside its base: give --adapter (or --base for a fully "
                          "fine-tuned --model folder)")


def _check_test_file_args(args: argparse.Namespace) -> None:
    from pathlib import Path

    from peftkit.errors import ConfigError, DataError

    if args.split != "test":
        raise ConfigError(f"--test FILE is the test split; it does not apply to --split {args.split}")
    if args.forgetting:
        raise ConfigError("--test does not apply to --forgetting (it scores the --data task's own test split)")
    if args.task == "perplexity" or Path(args.data).suffix.lower() == ".txt":
        raise ConfigError("--test does not apply to perplexity (--data FILE.txt is scored whole)")
    try:
        found = Path(args.test).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        found = False
    if not found:
        raise DataError(f"--test file not found: {args.test}")


def _check_forgetting_args(args: argparse.Namespace) -> None:
    from peftkit.errors import ConfigError

    if not args.adapter and not args.base:
        raise ConfigError("--forgetting compares a fine-tune with its base: give --adapter (or --base for a fully "
                          "fine-tuned --model folder)")
    if args.forgetting_tokens <= 0:
        raise ConfigError(f"--forgetting-tokens must be > 0, got {args.forgetting_tokens}")


def _print_forgetting(args: argparse.Namespace, model: Any, tok: Any) -> int:
    from peftkit.eval.forgetting import forgetting_report, format_report
    from peftkit.models import load_model

    text = args.data if args.data.endswith(".txt") else None
    report = forgetting_report(model, tok, [] if text else [args.data], args.forgetting_tokens, args.limit or 200, text,
                               args.template, base=lambda: load_model(args.base or args.model)[0], seed=args.seed,
                               max_new_tokens=args.max_new_tokens)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="train several methods on one task and report the trade-offs",
                       description="Runs every method in CONFIG.yaml's `runs` with the same budget, scores each on "
                                   "the same test examples next to zero-/few-shot baselines, and writes report.md, "
                                   "report.json, report.html and PNG plots to output_dir. Finished runs are reused.")
    _add_config(p, "compare config (see examples/compare-rotten-tomatoes.yaml)",
                "dotted overrides of the compare config", optional=False)
    p.add_argument("--budget", metavar="LIMITS",
                   help="dry run: which methods fit e.g. memory=2GB,time=10m (predicted peak memory; training time "
                        "from a few measured steps) - nothing of the comparison is trained or written")
    p.add_argument("--budget-steps", type=int, default=3, help="--budget: steps timed per method (>= 2)")
    p.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from peftkit.runs.compare import compare, load_compare_config

    cfg = load_compare_config(args.config, list(args.overrides))
    if args.budget is not None:
        from peftkit.runs.budget import check_budget, format_budget, parse_budget

        budget = parse_budget(args.budget)  # before anything is loaded
        print(format_budget(check_budget(cfg.run_configs(), budget, args.budget_steps), budget))
        return 0
    report = compare(cfg)
    from peftkit.runs.compare import markdown_table

    print(markdown_table(report))
    return 0


def _info(sub: Any) -> None:
    p = sub.add_parser("info", help="methods, built-in models and datasets; parameter count of a config")
    _add_config(p, "YAML config: print its trainable-parameter count (no training)")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from peftkit.runs.info import describe

    config, overrides = _config_and_overrides(args)
    print(describe(config, overrides))
    return 0


def _demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="LoRA on smollm2-135m + rotten-tomatoes: accuracy before/after, a sample")
    p.add_argument("--output-dir", default="runs/demo", help="where the run and demo_results.json go")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--eval-examples", type=int, default=200, help="test examples scored before and after")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from peftkit.runs.demo import demo

    demo(args.output_dir, args.steps, args.eval_examples)
    return 0


def _inspect_prompt(sub: Any) -> None:
    p = sub.add_parser("inspect-prompt", help="nearest vocabulary tokens of each virtual token of a soft prompt",
                       description="For each virtual token of a prompt tuning or P-tuning adapter, the vocabulary "
                                   "tokens whose input embeddings are closest by cosine similarity.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter folder (peftkit or PEFT format)")
    _add_model(p, "base model alias or folder (default: the adapter's base_model_name_or_path)")
    p.add_argument("--top-k", type=int, default=5, help="tokens listed per virtual token")
    _add_json(p)
    p.set_defaults(handler=run_inspect_prompt)


def run_inspect_prompt(args: argparse.Namespace) -> int:
    from peftkit.eval.inspect_prompt import format_table, inspect_prompt

    rows = inspect_prompt(args.adapter_dir, args.model, args.top_k)
    print(json.dumps(rows, ensure_ascii=False) if args.json else format_table(rows))
    return 0


def _memory(sub: Any) -> None:
    p = sub.add_parser("memory", help="predict a training run's peak memory (no weights are loaded)",
                       description="Expected peak memory of `peftkit train CONFIG.yaml key=value ...`: weights, "
                                   "gradients, AdamW states, activations and the runtime, from the model's config.")
    _add_config(p)
    _add_json(p)
    p.add_argument("--no-data", action="store_true",
                   help="do not read the training data: assume rows of data.max_length tokens, a quarter of them "
                        "labelled, no shared prefix (default: measure the batch shape on a sample of the examples)")
    p.set_defaults(handler=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    from peftkit.runs.config import load_config
    from peftkit.runs.memory import build_meta_model, data_shape, predict_memory

    cfg = load_config(*_config_and_overrides(args))
    model = build_meta_model(cfg)
    pred = predict_memory(cfg, model, None if args.no_data else data_shape(cfg, model))
    if args.json:
        print(json.dumps(pred.to_dict()))
    else:
        print(f"{cfg.model} + {cfg.method_config().method_name}, batch {cfg.train.batch_size} x {cfg.data.max_length} "
              f"tokens, {cfg.train.precision}{', gradient checkpointing' if cfg.train.gradient_checkpointing else ''}:")
        print(pred)
    return 0


def _service(sub: Any) -> None:
    from peftkit.cli import serve

    for register in serve.REGISTER:
        register(sub)


REGISTER = [_train, _generate, _chat, _eval, _compare, _merge, _export, _info, _demo, _inspect_prompt, _memory, _service]
__all__ = ["REGISTER"]
