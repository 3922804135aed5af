"""The config parser, attacked: random bytes and text, hostile YAML (deep nesting, alias bombs, tags,
non-string keys), wrong types, empty strings, missing and unknown keys, random ``key=value`` overrides.
Every case ends in a valid config (that dumps and reloads to itself) or a one-line ConfigError; through
the CLI, exit code 2 with one line and no file written."""

from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from peftkit.cli.main import main
from peftkit.errors import ConfigError
from peftkit.runs.config import DataConfig, RunConfig, dump_config, load_config
from peftkit.train.config import TrainConfig
from tests.fuzz.common import FUZZ, assert_cli_error, fresh_dir, run_cli, succeeds_or_clean_error

SECTIONS = {"data": list(DataConfig.__dataclass_fields__), "train": list(TrainConfig.__dataclass_fields__),
            "method": ["name", "r", "alpha", "dropout", "target_modules", "exclude", "layers", "init", "bias", "rank_pattern"]}
TOP = list(RunConfig.__dataclass_fields__)
DOTTED = TOP + [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]

text = st.text(max_size=30)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), text,
                    st.sampled_from(["lora", "auto", "chat", "cosine", "fsdp", "skip", "all-linear", "", "q_proj"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
section = lambda name: st.dictionaries(st.sampled_from(SECTIONS[name]) | text, values, max_size=4)  # noqa: E731
config = st.fixed_dictionaries({}, optional={
    "model": scalars, "output_dir": scalars, "overwrite": scalars, "trust_remote_code": scalars,
    "method": section("method") | scalars, "data": section("data") | scalars, "train": section("train") | scalars,
}) | st.dictionaries(text | st.integers() | st.none(), values, max_size=3)
override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED) | text, text | scalars.map(str)) | text


def write(data: bytes) -> Path:
    path = fresh_dir() / "config.yaml"
    path.write_bytes(data)
    return path


def check(path: Path | None, overrides=()) -> None:
    """load_config succeeds (and its dump reloads to the same config) or raises one clean line."""
    cfg = succeeds_or_clean_error(lambda: load_config(path, list(overrides)))
    if isinstance(cfg, RunConfig):
        again = write(dump_config(cfg).encode())
        assert load_config(again).to_dict() == cfg.to_dict()


@FUZZ
@given(data=st.binary(max_size=2000))
@example(data=b"\xff\xfe" + "model: x".encode("utf-16-le"))
@example(data=b"")
@example(data=b"\x00\x01\x02")
def test_random_bytes(data):
    check(write(data))


@FUZZ
@given(doc=st.text(max_size=300))
@example(doc="[" * 1_000)
@example(doc="a: &a [" + ", ".join(["*a"] * 3) + "]")
@example(doc="x: !!python/object/apply:os.system ['touch /tmp/peftkit-pwned']")
@example(doc="? [1, 2]\n: 3\n")
@example(doc="{1: 2}")
@example(doc="{null: 1, train: {max_steps: 1}}")
@example(doc="train: {lr: .inf}")
@example(doc="train: {lr: .nan, threads: 99999999999999999999}")
@example(doc="model: ''")
@example(doc="output_dir: '  '")
@example(doc="method: 7")
@example(doc="method: {r: 4}")
@example(doc="train: [1, 2]")
@example(doc='data: {train: "\\0evil"}')
@example(doc="\n".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)).replace("*l0", "x"))
def test_random_yaml_text(doc):
    check(write(doc.encode("utf-8", "surrogatepass")))


@FUZZ
@given(cfg=config)
@example(cfg={"train": {"max_steps": 0}})
@example(cfg={"train": {"batch_size": True}})
@example(cfg={"method": {"name": "lora", "r": 2**40}})
@example(cfg={"method": {"name": "lora", "target_modules": [[["q"]]]}})
@example(cfg={"unknown": 1})
@example(cfg={"data": {"max_length": -1, "extra_key": 1}})
def test_structured_configs(cfg):
    try:
        doc = yaml.safe_dump(cfg, allow_unicode=True)
    except yaml.YAMLError:
        return
    check(write(doc.encode("utf-8", "surrogatepass")))


@FUZZ
@given(overrides=st.lists(override, max_size=4))
@example(overrides=["train.lr=" + "[" * 1000])
@example(overrides=["method.name.x=1"])
@example(overrides=["=1", ".=1", "train.=3", "train..lr=1"])
@example(overrides=["method=lora", "method.r=0"])
def test_random_overrides(overrides):
    check(None, overrides)


@given(doc=st.text(max_size=200) | config.map(lambda c: yaml.safe_dump(c) if _dumpable(c) else ""),
       overrides=st.lists(override, max_size=2))
@FUZZ.__class__(FUZZ, max_examples=30)
def test_cli_never_tracebacks_or_writes(capsys, doc, overrides):
    """The real command with a fuzzed config: the data file is missing (appended last, so it wins), so
    every case must end in exit code 2 with one line, before anything is written."""
    path = write(doc.encode("utf-8", "surrogatepass"))
    out = path.parent / "out"
    code = main(["train", str(path), *overrides, f"output_dir={out}", f"data.train={path.parent / 'missing.jsonl'}"])
    assert_cli_error(code, capsys.readouterr().err)
    assert not out.exists()


def _dumpable(c) -> bool:
    try:
        yaml.safe_dump(c)
        return True
    except yaml.YAMLError:
        return False


@pytest.mark.parametrize("doc", ["[" * 50_000 + "\xff", "a: !!python/name:os.system\n"])
def test_cli_subprocess_exit_code(tmp_path, doc):
    path = tmp_path / "c.yaml"
    path.write_bytes(doc.encode("latin-1"))
    r = run_cli(["train", str(path), f"output_dir={tmp_path / 'out'}"], str(tmp_path))
    assert "Traceback" not in r.stderr
    assert_cli_error(r.returncode, r.stderr)
    assert not (tmp_path / "out").exists()


def test_yaml_python_tags_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "c.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    assert not marker.exists()
