"""The CLI with the module-wrapper methods: chosen by ``method.name``, counted by ``info``, trained, and a clear
one-line refusal to merge the ones that cannot be merged."""

from __future__ import annotations

import json

import pytest

from peftkit.cli.main import main


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("PEFTKIT_TENSORBOARD", "0")


@pytest.mark.parametrize("args, trainable", [
    (["method.name=ia3"], 2 * (16 + 16 + 64)),  # k_proj, v_proj outputs; down_proj input
    (["method.name=dora", "method.r=4"], 2 * ((32 * 4 + 4 * 32 + 32) + (32 * 4 + 4 * 16 + 16))),  # q, v + magnitudes
    (["method.name=bottleneck_adapter", "method.size=8"], 4 * (32 * 8 + 8 + 8 * 32 + 32)),
    (["method.name=bottleneck_adapter", "method.size=8", "method.placement=ffn"], 2 * (32 * 8 + 8 + 8 * 32 + 32)),
    (["method.name=llama_adapter", "method.adapter_len=10", "method.adapter_layers=1"], 10 * 32 + 1),
])
def test_info_counts_each_method(args: list[str], trainable: int, tiny_lm_dir, capsys) -> None:
    assert main(["info", f"model={tiny_lm_dir}", *args]) == 0
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_bottleneck_adapter_trains_generates_and_refuses_to_merge(tiny_lm_dir, tmp_path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "input": "", "output": w}) + "\n"
                            for w in ("red", "green", "blue", "white") * 4))
    out = tmp_path / "run"
    assert main(["train", f"model={tiny_lm_dir}", f"data.train={data}", f"output_dir={out}", "train.max_steps=4",
                 "train.batch_size=4", "train.eval_every=0", "train.save_every=0", "method.name=bottleneck_adapter",
                 "method.size=8"]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peftkit_method"] == "bottleneck_adapter" and cfg["size"] == 8
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_lm_dir), "--adapter", str(out / "adapter"), "--prompt", "Say red",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    code = main(["merge", "--model", str(tiny_lm_dir), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "(bottleneck_adapter) cannot be merged into the base weights" in err[0], err
    assert not (tmp_path / "m").exists()
