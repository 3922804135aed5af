"""Unit tests of :mod:`peftkit.serve.jobs`: a create-job request checked field by field (the bad field named in
``param``), "auto" resolved, the run config a job trains with, the fine-tuned model's name."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftkit.errors import ConfigError
from peftkit.serve.jobs import JobSpec, RequestError, auto_epochs, fine_tuned_name, parse_request, run_config


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "training_file": "file-abc", **fields}


def refused(request: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(request)
    return info.value


# -- parse_request: required fields and defaults -------------------------------------------------------
def test_a_minimal_request_gets_the_defaults():
    spec = parse_request(body())
    assert (spec.model, spec.training_file, spec.validation_file, spec.suffix, spec.metadata) == (
        "tiny", "file-abc", None, None, None)
    assert spec.hyperparameters == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert spec.method == {"name": "lora"} and spec.settings == {}
    assert isinstance(spec.seed, int) and 0 <= spec.seed <= 2_147_483_647  # a random one, as OpenAI does


def test_a_request_error_is_a_config_error():
    assert issubclass(RequestError, ConfigError)
    e = RequestError("bad", "x", "y")
    assert (str(e), e.param, e.code) == ("bad", "x", "y")
    assert (RequestError("bad").param, RequestError("bad").code) == (None, None)


@pytest.mark.parametrize("request_body", [None, [], "model=tiny", 3])
def test_the_body_must_be_an_object(request_body):
    e = refused(request_body)
    assert (str(e), e.param, e.code) == ("the request body must be a JSON object", None, None)


@pytest.mark.parametrize("name", ["model", "training_file"])
@pytest.mark.parametrize("value", ["<absent>", "", None, 5, ["x"]])
def test_model_and_training_file_are_required(name, value):
    request = body()
    if value == "<absent>":
        del request[name]
    else:
        request[name] = value
    e = refused(request)
    assert (str(e), e.param, e.code) == (f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def test_model_is_checked_before_training_file():
    assert refused({}).param == "model"


def test_the_full_request_is_kept():
    spec = parse_request(body(validation_file="file-v", suffix="my-model.v1_2", seed=7, metadata={"team": "a"}))
    assert (spec.validation_file, spec.suffix, spec.seed, spec.metadata) == ("file-v", "my-model.v1_2", 7,
                                                                              {"team": "a"})


# -- suffix, seed, validation_file, metadata -----------------------------------------------------------
@pytest.mark.parametrize("suffix", ["a", "A9", "x" * 64, "0.a_b-c"])
def test_good_suffixes(suffix):
    assert parse_request(body(suffix=suffix)).suffix == suffix


@pytest.mark.parametrize("suffix", ["", "-x", ".x", "_x", "x" * 65, "a b", "a:b", "a/b", "é", 5, ["a"]])
def test_bad_suffixes(suffix):
    e = refused(body(suffix=suffix))
    assert e.param == "suffix" and e.code is None
    assert str(e) == "suffix must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def test_a_suffix_ending_in_a_newline_is_refused():
    assert refused(body(suffix="abc\n")).param == "suffix"


@pytest.mark.parametrize("seed", [0, 1, 2_147_483_647])
def test_good_seeds(seed):
    assert parse_request(body(seed=seed)).seed == seed


@pytest.mark.parametrize("seed", [-1, 2_147_483_648, True, False, 1.0, "5", [1]])
def test_bad_seeds(seed):
    e = refused(body(seed=seed))
    assert (str(e), e.param) == ("seed must be an integer in 0..2147483647", "seed")


@pytest.mark.parametrize("value", [5, ["file-a"], {"id": "file-a"}])
def test_validation_file_must_be_an_id(value):
    e = refused(body(validation_file=value))
    assert (str(e), e.param) == ("validation_file must be a file id", "validation_file")


def test_metadata_at_the_limits_is_kept_as_a_copy():
    meta = {f"k{i}".ljust(64, "x"): "v" * 512 for i in range(16)}
    spec = parse_request(body(metadata=meta))
    assert spec.metadata == meta and spec.metadata is not meta


@pytest.mark.parametrize("meta", [
    {f"k{i}": "v" for i in range(17)},
    {"k": 1},
    {"k": None},
    {"k" * 65: "v"},
    {"k": "v" * 513},
    [["k", "v"]],
    "k=v",
])
def test_bad_metadata(meta):
    e = refused(body(metadata=meta))
    assert e.param == "metadata"
    assert str(e) == "metadata must be at most 16 string pairs (keys up to 64 characters, values up to 512)"


# -- hyperparameters -----------------------------------------------------------------------------------
def method(**hyper: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"hyperparameters": hyper}}


def test_method_hyperparameters_fill_in_auto():
    spec = parse_request(body(method=method(n_epochs=2, batch_size=4)))
    assert spec.hyperparameters == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}


def test_the_deprecated_hyperparameters_field_is_read():
    spec = parse_request(body(hyperparameters={"learning_rate_multiplier": 2}))
    assert spec.hyperparameters == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": 2.0}
    assert isinstance(spec.hyperparameters["learning_rate_multiplier"], float)


@pytest.mark.parametrize("m", [{"type": "supervised"}, {"type": "supervised", "supervised": None},
                               {"type": "supervised", "supervised": {}},
                               {"type": "supervised", "supervised": {"hyperparameters": None}}])
def test_a_supervised_method_without_hyperparameters_is_all_auto(m):
    assert set(parse_request(body(method=m)).hyperparameters.values()) == {"auto"}


@pytest.mark.parametrize(("m", "shown"), [({"type": "reinforcement"}, "'reinforcement'"), ({}, "None"),
                                          ("supervised", "'supervised'"), ({"type": None}, "None")])
def test_only_supervised_and_dpo_jobs_are_taken(m, shown):
    e = refused(body(method=m))
    assert (str(e), e.param) == (f"method.type {shown} is not supported here (use supervised, dpo)", "method.type")


def test_dpo_jobs_take_beta_and_train_with_the_dpo_objective(tmp_path):
    spec = parse_request(body(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}}))
    assert spec.kind == "dpo" and spec.hyperparameters["beta"] == 0.3
    assert spec.resolve(40)["beta"] == 0.3
    assert parse_request(body(method={"type": "dpo"})).resolve(40)["beta"] == 0.1  # "auto"
    e = refused(body(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}))
    assert e.param == "method.dpo.hyperparameters.beta"
    e = refused(body(method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}))
    assert "beta is not a hyperparameter" in str(e)


@pytest.mark.parametrize("supervised", [[1], "x"])
def test_a_supervised_section_that_is_not_an_object_is_a_request_error(supervised):
    e = refused(body(method={"type": "supervised", "supervised": supervised}))
    assert e.param is not None and e.param.startswith("method.supervised")


@pytest.mark.parametrize(("request_body", "param"), [
    (body(method={"type": "supervised", "supervised": {"hyperparameters": [1]}}), "method.supervised.hyperparameters"),
    (body(hyperparameters="fast"), "hyperparameters"),
])
def test_hyperparameters_must_be_an_object(request_body, param):
    e = refused(request_body)
    assert (str(e), e.param) == (f"{param} must be an object", param)


def test_an_unknown_hyperparameter_is_named():
    e = refused(body(method=method(n_epochs=2, warmup=3, beta=1)))
    assert e.param == "method.supervised.hyperparameters"
    assert str(e) == ("method.supervised.hyperparameters.beta is not a hyperparameter "
                      "(use n_epochs, batch_size, learning_rate_multiplier)")


@pytest.mark.parametrize(("key", "value", "kept"), [
    ("n_epochs", 1, 1), ("n_epochs", 50, 50), ("n_epochs", 3.0, 3),
    ("batch_size", 1, 1), ("batch_size", 256, 256),
    ("learning_rate_multiplier", 10, 10.0), ("learning_rate_multiplier", 0.001, 0.001),
    ("learning_rate_multiplier", "auto", "auto"),
])
def test_good_hyperparameter_values(key, value, kept):
    got = parse_request(body(method=method(**{key: value}))).hyperparameters[key]
    assert got == kept and type(got) is type(kept)


@pytest.mark.parametrize(("key", "value", "span"), [
    ("n_epochs", 0, "an integer in 1..50"), ("n_epochs", 51, "an integer in 1..50"),
    ("n_epochs", 2.5, "an integer in 1..50"), ("n_epochs", True, "an integer in 1..50"),
    ("n_epochs", "3", "an integer in 1..50"), ("n_epochs", None, "an integer in 1..50"),
    ("batch_size", 0, "an integer in 1..256"), ("batch_size", 257, "an integer in 1..256"),
    ("learning_rate_multiplier", 0, "in (0.0, 10.0]"), ("learning_rate_multiplier", -1.0, "in (0.0, 10.0]"),
    ("learning_rate_multiplier", 10.5, "in (0.0, 10.0]"), ("learning_rate_multiplier", math.nan, "in (0.0, 10.0]"),
    ("learning_rate_multiplier", math.inf, "in (0.0, 10.0]"), ("learning_rate_multiplier", False, "in (0.0, 10.0]"),
])
def test_bad_hyperparameter_values(key, value, span):
    e = refused(body(method=method(**{key: value})))
    assert e.param == f"method.supervised.hyperparameters.{key}"
    assert str(e) == f"method.supervised.hyperparameters.{key} must be \"auto\" or {span}, got {value!r}"


def test_the_deprecated_field_names_its_own_param():
    e = refused(body(hyperparameters={"batch_size": 0}))
    assert e.param == "hyperparameters.batch_size"
    assert str(e) == "hyperparameters.batch_size must be \"auto\" or an integer in 1..256, got 0"


def test_a_huge_integer_hyperparameter_is_a_request_error():
    e = refused(body(method=method(n_epochs=10**400)))
    assert e.param == "method.supervised.hyperparameters.n_epochs"


# -- peftkit's own part --------------------------------------------------------------------------------
def test_peftkit_method_and_settings_are_kept():
    spec = parse_request(body(peftkit={"method": {"name": "dora", "r": 16}, "settings": {"data.max_length": 512}}))
    assert spec.method == {"name": "dora", "r": 16} and spec.settings == {"data.max_length": 512}


def test_a_method_named_by_a_string():
    assert parse_request(body(peftkit={"method": "ia3"})).method == {"name": "ia3"}


@pytest.mark.parametrize("extra", [[], "lora", {"method": "lora", "other": 1}])
def test_peftkit_must_be_an_object_of_method_and_settings(extra):
    e = refused(body(peftkit=extra))
    assert (str(e), e.param) == ("peftkit must be an object with 'method' and/or 'settings'", "peftkit")


@pytest.mark.parametrize(("m", "message"), [
    ({"name": "nope"}, "unknown method 'nope'"),
    ({"name": "lora", "r": "x"}, "peftkit.method.r must be int, got 'x'"),
    ([1], "peftkit.method must be a mapping, got [1]"),
])
def test_a_bad_peft_method_is_named(m, message):
    e = refused(body(peftkit={"method": m}))
    assert e.param == "peftkit.method" and str(e).startswith(message)


@pytest.mark.parametrize("settings", [["data.max_length"], "data.max_length=5"])
def test_settings_must_be_a_mapping(settings):
    e = refused(body(peftkit={"settings": settings}))
    assert (str(e), e.param) == ("peftkit.settings must map dotted config keys to values", "peftkit.settings")


@pytest.mark.parametrize("key", ["model", "output_dir", "overwrite", "method", "method.r", "data.train",
                                 "data.validation", "train.seed", "train.max_steps", "train.batch_size"])
def test_settings_the_job_owns_are_refused(key):
    e = refused(body(peftkit={"settings": {"data.max_length": 64, key: 1}}))
    assert (str(e), e.param) == (f"peftkit.settings: {key} is set by the job itself", "peftkit.settings")


def test_other_settings_are_allowed():
    settings = {"data.max_length": 64, "train.lr": 0.01, "train.grad_accum": 2, "data.template": "chat"}
    assert parse_request(body(peftkit={"settings": settings})).settings == settings


# -- resolve and auto_epochs ---------------------------------------------------------------------------
@pytest.mark.parametrize(("examples", "epochs"), [
    (0, 25), (1, 25), (3, 25), (4, 25), (5, 20), (10, 10), (33, 4), (34, 3), (100, 3), (8333, 3), (8334, 2),
    (12_500, 2), (12_501, 1), (30_000, 1), (10**7, 1),
])
def test_auto_epochs_follows_openais_rule(examples, epochs):
    assert auto_epochs(examples) == epochs


def spec(**hyper: Any) -> JobSpec:
    return parse_request(body(method=method(**hyper)))


@pytest.mark.parametrize(("examples", "batch"), [(0, 1), (1, 1), (15, 1), (16, 2), (63, 7), (64, 8), (10_000, 8)])
def test_auto_batch_size(examples, batch):
    assert spec().resolve(examples)["batch_size"] == batch


def test_resolve_replaces_every_auto_and_keeps_given_values():
    s = spec()
    assert s.resolve(24) == {"n_epochs": 5, "batch_size": 3, "learning_rate_multiplier": 1.0}
    assert set(s.hyperparameters.values()) == {"auto"}  # the spec itself is left as asked
    given = spec(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5)
    assert given.resolve(24) == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}


# -- run_config ----------------------------------------------------------------------------------------
def job(n_epochs: int = 3, batch_size: int = 8, lr: float = 1.0, validation: str | None = None,
        peft: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        id="ftjob-1", training_file="file-t", validation_file=validation, seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}}},
        peftkit={"method": peft or {"name": "lora"}, "settings": settings or {}})


def test_run_config_of_a_job(tmp_path: Path):
    cfg = run_config(job(n_epochs=3, batch_size=8, lr=2.0, peft={"name": "lora", "r": 4}), tmp_path, "/bases/tiny",
                     1000)
    assert cfg["model"] == "/bases/tiny" and cfg["method"] == {"name": "lora", "r": 4}
    assert cfg["output_dir"] == str(tmp_path / "jobs" / "ftjob-1" / "run") and cfg["overwrite"] is True
    assert cfg["data"] == {"train": str(tmp_path / "files" / "file-t.jsonl"), "validation_fraction": 0.0,
                           "max_train_examples": None}
    # 1000 / 8 -> 125 steps an epoch, 375 in all; a checkpoint every 37 steps (a tenth), a log line every 3
    assert cfg["train"] == {"max_steps": 375, "batch_size": 8, "seed": 11, "save_every": 37, "keep_checkpoints": 3,
                            "log_every": 3, "eval_every": 0, "lr": pytest.approx(4e-4)}


def test_run_config_checkpoints_every_epoch_when_epochs_are_short(tmp_path: Path):
    cfg = run_config(job(n_epochs=10, batch_size=4), tmp_path, "b", 10)  # 3 steps an epoch, 30 in all
    assert (cfg["train"]["max_steps"], cfg["train"]["save_every"], cfg["train"]["log_every"]) == (30, 3, 1)
    cfg = run_config(job(n_epochs=1, batch_size=4), tmp_path, "b", 5)  # 2 steps
    assert (cfg["train"]["max_steps"], cfg["train"]["save_every"], cfg["train"]["log_every"]) == (2, 1, 1)


def test_run_config_with_a_validation_file_evaluates_every_epoch(tmp_path: Path):
    cfg = run_config(job(n_epochs=2, batch_size=5, validation="file-v"), tmp_path, "b", 23)
    assert cfg["data"]["validation"] == str(tmp_path / "files" / "file-v.jsonl")
    assert (cfg["train"]["max_steps"], cfg["train"]["eval_every"]) == (10, 5)


@pytest.mark.parametrize(("name", "lr"), [("lora", 2e-4), ("ia3", 1e-2), ("full", 5e-5)])
def test_run_config_scales_the_methods_default_learning_rate(tmp_path: Path, name, lr):
    cfg = run_config(job(lr=0.5, peft={"name": name}), tmp_path, "b", 100)
    assert cfg["train"]["lr"] == pytest.approx(0.5 * lr)


def test_run_config_applies_the_settings_last(tmp_path: Path):
    settings = {"data.max_length": 512, "train.lr": 0.5, "train.grad_accum": 2, "eval.forgetting_text": "a: b"}
    cfg = run_config(job(settings=settings), tmp_path, "b", 100)
    assert cfg["data"]["max_length"] == 512 and cfg["train"]["lr"] == 0.5 and cfg["train"]["grad_accum"] == 2
    assert cfg["eval"] == {"forgetting_text": "a: b"}  # a string stays a string, not YAML


def test_run_config_is_a_valid_run_config(tmp_path: Path):
    from peftkit.core.config import from_dict
    from peftkit.runs.config import RunConfig

    cfg = from_dict(RunConfig, run_config(job(n_epochs=2, batch_size=4, settings={"data.max_length": 128}),
                                          tmp_path, "/bases/tiny", 16))
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed, cfg.data.max_length) == (8, 4, 11, 128)
    assert cfg.output_dir == str(tmp_path / "jobs" / "ftjob-1" / "run")


def test_run_config_keeps_characters_outside_the_bmp(tmp_path: Path):
    cfg = run_config(job(settings={"eval.forgetting_text": "smile 😀"}), tmp_path, "b", 100)
    assert cfg["eval"]["forgetting_text"] == "smile 😀"


# -- fine_tuned_name -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("suffix", "name"), [("colours", "ft:tiny:colours:ftjob-1"), (None, "ft:tiny::ftjob-1"),
                                              ("", "ft:tiny::ftjob-1")])
def test_fine_tuned_name(suffix, name):
    assert fine_tuned_name("tiny", suffix, "ftjob-1") == name
