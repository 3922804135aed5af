import pytest

from peftkit.errors import ConfigError
from peftkit.methods.lora import LoraConfig
from peftkit.runs.config import RunConfig, apply_override, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: smollm2-135m\nmethod: {name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}\n"
                    "train: {max_steps: 200, batch_size: 8, lr: 2.0e-4}\noutput_dir: runs/x\n")
    cfg = load_config(path, ["method.r=16", "train.max_steps=100", "train.lr=1e-3", "data.packing=true"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 100 and cfg.train.lr == 1e-3 and cfg.data.packing is True
    m = cfg.method_config()
    assert isinstance(m, LoraConfig) and m.r == 16 and m.alpha == 16 and m.target_modules == ["q_proj", "v_proj"]


def test_method_as_plain_name_and_switch():
    cfg = load_config(None, ["method=lora", "method.r=4"])
    assert cfg.method_config().r == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_step=5"], r"unknown config key 'train\.max_step'; did you mean 'train\.max_steps'"),
        (["trian.lr=1"], r"unknown config key 'trian'; did you mean 'train'"),
        (["method.rank=4"], r"unknown config key 'method\.rank'"),
        (["method.name=lorra"], r"unknown method 'lorra' \(did you mean 'lora'\?\)"),
        (["train.batch_size=abc"], r"train\.batch_size must be int, got 'abc'"),
        (["train.batch_size=0"], r"train\.batch_size must be > 0"),
        (["train.fused_loss=maybe"], r"train\.fused_loss must be bool, got 'maybe'"),
        (["method.r=-1"], r"method\.r must be a positive integer"),
        (["data.format=xml"], r"data\.format must be one of"),
        (["noequals"], r"is not key=value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_fused_loss_setting():
    assert load_config(None).train.fused_loss is True
    assert load_config(None, ["train.fused_loss=false"]).train.fused_loss is False
    from peftkit.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.fused_loss must be true or false, got 'no'"):
        TrainConfig(fused_loss="no")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntrain: {max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst)


def test_apply_override_nested():
    d = {}
    apply_override(d, "method.target_modules=[q_proj, v_proj]")
    assert d == {"method": {"target_modules": ["q_proj", "v_proj"]}}


@pytest.mark.parametrize("name", ["lora-rotten-tomatoes.yaml", "chatterbot-alpaca.yaml"])
def test_shipped_examples_are_valid(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "examples" / name)
    assert cfg.method_config().method_name == "lora"


def test_demo_matches_shipped_example():
    from pathlib import Path

    from peftkit.runs.demo import demo_config

    example = load_config(Path(__file__).parents[2] / "examples" / "lora-rotten-tomatoes.yaml")
    demo = demo_config(example.output_dir, example.train.max_steps)
    assert demo.method_config() == example.method_config()
    assert demo.train == example.train and demo.data == example.data


@pytest.mark.parametrize("method, lr", [("lora", 2e-4), ("prompt_tuning", 3e-2), ("p_tuning", 1e-2), ("full", 5e-5)])
def test_lr_defaults_to_the_methods_own(method: str, lr: float) -> None:
    assert load_config(None, [f"method.name={method}"]).train.lr == lr
    assert load_config(None, [f"method.name={method}", "train.lr=0.5"]).train.lr == 0.5


def test_method_is_resolved_once_and_round_trips_through_yaml(tmp_path):
    from peftkit.runs.config import dump_config, resume_changes

    cfg = load_config(None, ["method.name=ia3", "method.init=random"])
    assert cfg.method_config() is cfg.method and cfg.method.method_name == "ia3"
    assert cfg.train.lr == cfg.method.default_lr == 1e-2  # train.lr: null is the method's own
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and resume_changes(cfg, again) == ({}, {})
    assert RunConfig(method={"name": "lora", "r": 4}).method == LoraConfig(r=4)  # a mapping given in code
