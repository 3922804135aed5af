"""``train_run`` end to end on the tiny Llama: the end-of-run line names what the run wrote (issue #17)."""

import json
from pathlib import Path

import pytest

from peftkit.runs.config import load_config
from peftkit.runs.run import train_run

ROWS = [{"instruction": f"Say the color of {w}", "input": "", "output": c}
        for w, c in [("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black")]] * 2


@pytest.mark.parametrize("method, folder, other", [("full", "model", "adapter"), ("lora", "adapter", "model")])
def test_done_line_names_what_the_run_wrote(method, folder, other, tiny_lm_dir, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / method
    cfg = load_config(None, [f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", f"method.name={method}",
                             "train.max_steps=1", "train.batch_size=4", "train.eval_every=0", "train.save_every=0",
                             "train.threads=1", "train.precision=fp32"])
    lines: list[str] = []
    summary = train_run(cfg, show_progress=False, log=lines.append)
    done = [line for line in lines if line.startswith("done:")]
    assert len(done) == 1 and f", {folder} saved to {out / folder};" in done[0], done
    assert f"{other} saved" not in done[0]
    assert summary["output_kind"] == folder and (out / folder).is_dir() and not (out / other).exists()
