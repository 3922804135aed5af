"""Multi-task runs (``data.tasks``): mixed and sequential schedules through the real training entry point,
per-task eval loss, resume, the end-of-run ``eval`` section, and config errors. Tiny Llama + small JSONL files."""

import json
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peftkit.errors import ConfigError
from peftkit.runs.config import load_config
from peftkit.runs.run import train_run
from peftkit.train.loop import Trainer

COLORS = [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]
COLOR_ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c} for w, c in COLORS] * 6
COUNT_ROWS = [{"prompt": f"Count on from {a}:", "completion": f" {b} {c}"}
              for a, b, c in [("one", "two", "three"), ("two", "three", "four"), ("five", "six", "seven")]] * 4


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def task_files(tmp_path) -> dict[str, str]:
    return {
        "color": write(tmp_path / "color.jsonl", COLOR_ROWS),
        "color_val": write(tmp_path / "color_val.jsonl", COLOR_ROWS[:4]),
        "count": write(tmp_path / "count.jsonl", COUNT_ROWS),
        "count_val": write(tmp_path / "count_val.jsonl", COUNT_ROWS[:3]),
    }


def tasks_override(f: dict[str, str], color: str = "", count: str = "") -> str:
    return ("data.tasks=["
            f"{{name: color, train: {f['color']}, validation: {f['color_val']}, weight: 3, "
            f"instruction: 'Answer with one word.'{color}}}, "
            f"{{name: count, train: {f['count']}, validation: {f['count_val']}, template: none{count}}}]")


def overrides(model_dir: Path, files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", tasks_override(files), f"output_dir={out}", "train.max_steps=6", "train.batch_size=4",
            "train.eval_every=3", "train.save_every=0", "train.log_every=1", "train.lr=3e-2", "train.warmup_steps=0",
            "train.threads=1", "method.r=4", *extra]


@pytest.fixture(autouse=True)
def _no_tensorboard(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


def run(args: list[str], **kw) -> dict:
    return train_run(load_config(None, args), show_progress=False, log=lambda *a: None, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_mixed_run_logs_per_task_eval_loss_equal_to_evaluating_each_task_alone(tiny_lm_dir, task_files, tmp_path,
                                                                               monkeypatch, native_bf16):
    """Run as on either kind of CPU (``train.precision: auto`` follows the feature check, patched here; a CPU
    without native bf16 emulates it, slowly but the same numbers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit.train.precision as precision
    from peftkit.core.io import load_adapter
    from peftkit.runs.multitask import build_tasks
    from peftkit.train.loss import evaluate_loss

    monkeypatch.setattr(precision, "native_bf16", lambda device: native_bf16)
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_lm_dir, task_files, out))
    assert cfg.train.precision == "auto"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "precision=bf16 on a CPU without native bf16")
        summary = train_run(cfg, show_progress=False, log=lambda *a: None)
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["eval_loss"] == pytest.approx((r["eval_loss/color"] + r["eval_loss/count"]) / 2)
    assert [t["name"] for t in summary["tasks"]] == ["color", "count"]
    assert summary["tasks"][0]["probability"] == pytest.approx(0.75)

    # the logged per-task loss equals scoring that task's validation set alone with the final adapter
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    load_adapter(model, out / "adapter")
    tasks = build_tasks(cfg, tok).tasks
    assert tasks[0].val.examples and tasks[1].val.examples
    assert tasks[0].template.kind == "chat" and tasks[1].template.kind == "none"  # each task its own template
    # Scored as the run scores it: the same batches (4) and precision. ``auto`` is bf16 autocast on a CPU with
    # native bf16 (AVX512-BF16/AMX) and fp32 elsewhere; scoring in fp32 a run that evaluated in bf16 differs by
    # bf16 rounding (2^-8 relative per op: 10.5815 vs 10.5856 on such a CPU), not by a bug. With the same
    # weights, batches, precision and kernels the arithmetic is the same; abs 1e-5 (1e-6 of a ~10 loss) leaves
    # room for nothing but fp32 rounding of the mean over a few batches (~10 ulp of 10 = 1e-5).
    for task in tasks:
        alone = evaluate_loss(model, task.val.examples, 4, tok.pad_token_id, precision=cfg.train.precision)
        assert alone == pytest.approx(evals[-1][f"eval_loss/{task.name}"], abs=1e-5)
    # the instruction reached the tokens the model trained on
    assert "Answer with one word." in tok.decode(tasks[0].train.examples[0]["input_ids"])


def test_sequential_run_sees_only_the_first_task_first(tiny_lm_dir, task_files, tmp_path, monkeypatch):
    seen: list[tuple[int, list[int]]] = []  # (optimizer step being computed, example indices of the batch)
    real = Trainer._next_batch

    def spy(self):
        seen.append((self.state.step, list(self._batches[self.state.batch_in_epoch])
                     if self.state.batch_in_epoch < len(self._batches) else None))
        return real(self)

    monkeypatch.setattr(Trainer, "_next_batch", spy)
    out = tmp_path / "seq"
    summary = run(overrides(tiny_lm_dir, task_files, out, "data.mix=sequential", "train.grad_accum=2",
                            "train.max_steps=5"))
    n_color = summary["tasks"][0]["train_examples"]
    assert [t["steps"] for t in summary["tasks"]] == [4, 1]  # 5 steps split 3:1 by weight (largest remainder)
    assert len(seen) == 5 * 2
    for step, batch in seen:
        if step < 4:
            assert batch is not None and all(i < n_color for i in batch), (step, batch)
        else:
            assert all(i >= n_color for i in (batch or [n_color])), (step, batch)
    # the end of phase 1 is the end of an "epoch": the next batch starts task 2's phase
    assert seen[8][1] is None and [r["epoch"] for r in metrics(out) if "loss" in r][-1] == 1


def test_sequential_steps_given_per_task(tiny_lm_dir, task_files, tmp_path):
    files = task_files
    args = overrides(tiny_lm_dir, files, tmp_path / "o", "data.mix=sequential", "train.max_steps=4")
    args[1] = tasks_override(files, color=", steps: 1", count=", steps: 3")
    cfg = load_config(None, args)
    assert cfg.task_steps() == [1, 3]


class Killed(BaseException):
    """Stands in for a SIGKILL right after a checkpoint is complete."""


def test_mixed_run_resumes_to_the_same_adapter(tiny_lm_dir, task_files, tmp_path, monkeypatch):
    args = ["train.save_every=3", "train.max_steps=7", "method.dropout=0.1", "train.eval_every=0"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    run(overrides(tiny_lm_dir, task_files, ref_out, *args))

    real_save = Trainer.save

    def save_then_die(self):
        path = real_save(self)
        if self.state.step == 3:
            raise Killed
        return path

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        run(overrides(tiny_lm_dir, task_files, out, *args))
    monkeypatch.setattr(Trainer, "save", real_save)
    assert not (out / "adapter").exists()
    run(overrides(tiny_lm_dir, task_files, out, *args), resume=True)
    a = load_file(str(ref_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    ref_losses = [r["loss"] for r in metrics(ref_out) if "loss" in r]
    assert [r["loss"] for r in metrics(out) if "loss" in r] == pytest.approx(ref_losses, abs=1e-6)


def test_eval_section_writes_task_metrics_and_forgetting(tiny_lm_dir, task_files, tmp_path):
    files = dict(task_files, count_test=write(tmp_path / "count_test.jsonl", COUNT_ROWS[:2]))
    out = tmp_path / "ev"
    args = overrides(tiny_lm_dir, files, out, "eval.task_metrics=true", "eval.limit=2", "eval.forgetting=true",
                     "eval.forgetting_tasks=[]", "eval.forgetting_tokens=64", "train.max_steps=2")
    args[1] = tasks_override(files, count=f", test: {files['count_test']}")
    summary = run(args)
    # only the task with a test split is scored; generation -> ROUGE-L
    assert list(summary["task_metrics"]) == ["count"]
    assert summary["task_metrics"]["count"]["metric"] == "rougeL" and summary["task_metrics"]["count"]["n"] == 2
    assert json.loads((out / "task_metrics.json").read_text())["count"]["value"] == summary["task_metrics"]["count"]["value"]
    report = json.loads((out / "forgetting.json").read_text())
    score = report["scores"]["perplexity/hamlet"]
    assert score["tokens"] == 63 and score["delta"] == pytest.approx(score["after"] - score["before"])
    assert summary["forgetting"]["perplexity/hamlet"]["forgetting"] == pytest.approx(score["forgetting"])


def test_a_bad_forgetting_task_does_not_lose_the_run(tiny_lm_dir, task_files, tmp_path):
    out = tmp_path / "bad"
    summary = run(overrides(tiny_lm_dir, task_files, out, "eval.forgetting=true", "eval.forgetting_tasks=[no-such-task]",
                            "eval.forgetting_tokens=16", "train.max_steps=1", "train.eval_every=0"))
    assert "no-such-task" in summary["forgetting"]["error"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("override, message", [
    ("data.tasks=[{train: a.jsonl}, {train: b.jsonl, weight: 0}]", "data.tasks[1].weight must be > 0, got 0.0"),
    ("data.tasks=[{train: a.jsonl, weight: -2}]", "data.tasks[0].weight must be > 0"),
    ("data.tasks=[{train: a.jsonl, wieght: 2}]", "unknown config key 'data.tasks[0].wieght'; did you mean 'data.tasks[0].weight'?"),
    ("data.tasks=[{train: a.jsonl}, {train: x/a.jsonl}]", "data.tasks[1].name 'a' is already the name of data.tasks[0]"),
    ("data.tasks=[{name: 'a b', train: a.jsonl}]", "data.tasks[0].name must be letters"),
    ("data.tasks=[{weight: 2}]", "data.tasks[0].train must name a built-in dataset or a data file"),
    ("data.tasks=[{train: a.jsonl, steps: 5}]", "data.tasks[0].steps applies to data.mix=sequential only"),
    ("data.tasks=[{train: a.jsonl, steps: 0}]", "data.tasks[0].steps must be > 0"),
    ("data.tasks=[{train: a.jsonl, template: fancy}]", "data.tasks[0].template must be one of"),
    ("data.tasks=[{train: a.jsonl, instruction: ''}]", "data.tasks[0].instruction must not be empty"),
    ("data.tasks=[{train: a.jsonl}]\ndata.test=t.jsonl", "data.train / data.validation / data.test do not apply"),
    ("data.temperature=0", "data.temperature must be a finite number > 0"),
    ("data.mix=interleaved", "data.mix must be one of"),
    ("eval.limit=0", "eval.limit must be > 0"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split("\n"))
    assert message in str(e.value)


def test_sequential_steps_must_fit_max_steps():
    with pytest.raises(ConfigError, match=r"data.tasks: the tasks' steps add up to 7 but train.max_steps is 10"):
        load_config(None, ["data.mix=sequential", "train.max_steps=10",
                           "data.tasks=[{train: a.jsonl, steps: 3}, {train: b.jsonl, steps: 4}]"])
    with pytest.raises(ConfigError, match=r"train.max_steps=2 leaves 0 step\(s\) for 1 task\(s\) without steps"):
        load_config(None, ["data.mix=sequential", "train.max_steps=2",
                           "data.tasks=[{train: a.jsonl, steps: 2}, {train: b.jsonl}]"])


def test_task_data_errors_name_the_task(tiny_lm_dir, task_files, tmp_path):
    from peftkit.errors import DataError

    args = overrides(tiny_lm_dir, task_files, tmp_path / "x")
    args[1] = f"data.tasks=[{{train: {task_files['color']}}}, {{name: chat, train: {tmp_path / 'missing.jsonl'}}}]"
    with pytest.raises(DataError, match=r"data.tasks\[1\] \(chat\): data file not found"):
        run(args)


def test_single_dataset_config_is_unchanged():
    cfg = load_config(None, [])
    assert cfg.data.tasks == [] and cfg.data.train == "rotten-tomatoes" and cfg.data.mix == "mixed"
    assert cfg.eval.forgetting is False and cfg.eval.task_metrics is False
