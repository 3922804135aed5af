"""Combining LoRA adapters (peftkit.core.combine, peftkit.methods.lora_combine): exactness of cat/linear, SVD rank
and optimality, TIES and DARE on small hand-computed tensors, stacking, the errors, and real PEFT's
``add_weighted_adapter`` as the oracle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.core.adapter import adapter_parameters
from peftkit.core.combine import COMBINATIONS, check_adapter_files, load_sources
from peftkit.core.identity import SIDECAR_NAME
from peftkit.errors import AdapterFileError, ConfigError
from peftkit.methods.lora import LoraLayer
from peftkit.methods.lora_combine import combine_adapters, low_rank, magnitude_trim, random_drop, ties_merge
from tests.tiny import make_tiny, perturb_adapters

ATOL = 1e-5


# -- helpers ------------------------------------------------------------------------------------------------------
def two_adapters(model: nn.Module, a: dict, b: dict) -> nn.Module:
    """``model`` with LoRA adapters "a" and "b" (random weights), "a" active."""
    peftkit.inject(model, peftkit.LoraConfig(**a), "a")
    peftkit.inject(model, peftkit.LoraConfig(**b), "b")
    perturb_adapters(model, "a", seed=1)
    perturb_adapters(model, "b", seed=2)
    return model


def deltas(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Module name -> the adapter's weight delta in the stored layout of the wrapped weight."""
    return {name: layer.delta_weight(adapter).detach().clone()
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer)
            and adapter in layer.scaling}


def base_plus(build, *weighted: tuple[float, dict[str, torch.Tensor]]) -> nn.Module:
    """A fresh base with Σ w·delta added to its weights by hand."""
    model = build()
    with torch.no_grad():
        for w, d in weighted:
            for name, delta in d.items():
                model.get_submodule(name).weight.add_(w * delta)
    return model


def out_with(tiny, model: nn.Module, active) -> torch.Tensor:
    peftkit.set_active(model, active)
    return tiny.run(model)


# -- stacking -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_stacking_two_active_adapters_adds_both_deltas(kind: str) -> None:
    tiny = make_tiny(kind)
    targets = ["q_proj", "v_proj", "up_proj"] if kind == "llama" else ["c_attn", "c_fc"]
    model = two_adapters(tiny.build(), {"r": 2, "target_modules": targets},
                         {"r": 3, "alpha": 5, "use_rslora": True, "target_modules": targets[:2]})
    only_a, only_b = out_with(tiny, model, "a"), out_with(tiny, model, "b")
    stacked = out_with(tiny, model, ["a", "b"])
    assert (stacked - only_a).abs().max() > 1e-2 and (stacked - only_b).abs().max() > 1e-2
    expected = tiny.run(base_plus(tiny.build, (1.0, deltas(model, "a")), (1.0, deltas(model, "b"))))
    torch.testing.assert_close(stacked, expected, rtol=0, atol=ATOL)
    peftkit.merge(model)  # both merged into the base: the same model
    torch.testing.assert_close(tiny.run(model), expected, rtol=0, atol=ATOL)


# -- cat / linear: exact ------------------------------------------------------------------------------------------
CAT_CASES = {
    # different ranks and alphas, rsLoRA on one side, per-module rank/alpha patterns, an embedding, Conv1D
    "llama-mixed": ("llama", {"r": 2, "alpha": 3, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
                              "rank_pattern": {"v_proj": 4}},
                    {"r": 3, "alpha": 7, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
                     "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 2.0}}),
    "gpt2-conv1d": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_proj"]},
                    {"r": 2, "alpha": 16, "use_rslora": True, "target_modules": ["c_attn", "c_proj"]}),
}


@pytest.mark.parametrize("case", CAT_CASES, ids=str)
def test_cat_equals_stacking_exactly(case: str) -> None:
    kind, a, b = CAT_CASES[case]
    tiny = make_tiny(kind)
    model = two_adapters(tiny.build(), a, b)
    stacked = out_with(tiny, model, ["a", "b"])
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", "c")
    assert (stacked - tiny.run(tiny.build())).abs().max() > 1e-2
    torch.testing.assert_close(out_with(tiny, model, "c"), stacked, rtol=0, atol=ATOL)


@pytest.mark.parametrize("combination", ["cat", "linear"])
def test_weighted_sum_of_deltas_is_exact(combination: str) -> None:
    tiny = make_tiny("llama")
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    model = two_adapters(tiny.build(), {"r": 2, "alpha": 3, "target_modules": targets, "rank_pattern": {"k_proj": 1}},
                         {"r": 4, "alpha": 2, "use_rslora": True, "target_modules": targets})
    da, db = deltas(model, "a"), deltas(model, "b")
    combine_adapters(model, ["a", "b"], [0.7, -0.3], combination, "c")
    dc = deltas(model, "c")
    assert sorted(dc) == sorted(da)
    for name in dc:
        torch.testing.assert_close(dc[name], 0.7 * da[name] - 0.3 * db[name], rtol=0, atol=ATOL)
    config = model.peftkit_state.configs["c"]
    layer = model.get_submodule("model.layers.0.self_attn.k_proj")
    assert (config.r, config.alpha, config.use_rslora) == (6, 6.0, False)
    assert layer.lora_A["c"].weight.shape == (5, 32) and layer.scaling["c"] == 1.0  # k_proj: 1 + 4 via rank_pattern
    assert config.rank_pattern == {f"model.layers.{i}.self_attn.k_proj": 5 for i in (0, 1)}
    expected = tiny.run(base_plus(tiny.build, (0.7, da), (-0.3, db)))
    torch.testing.assert_close(out_with(tiny, model, "c"), expected, rtol=0, atol=ATOL)
    assert not any(p.requires_grad for _, p in adapter_parameters(model, "c"))


def test_combining_leaves_the_rest_of_the_model_alone() -> None:
    tiny = make_tiny("llama")
    model = two_adapters(tiny.build(), {"target_modules": ["q_proj"]}, {"target_modules": ["q_proj"]})
    peftkit.set_active(model, "b")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = tiny.run(model)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", "c")
    assert model.peftkit_state.active == ["b"]  # the new adapter is added inactive
    assert {n: p.requires_grad for n, p in model.named_parameters() if ".c." not in n and not n.endswith(".c")} == grads
    torch.testing.assert_close(tiny.run(model), before, rtol=0, atol=0)


# -- svd ----------------------------------------------------------------------------------------------------------
def test_svd_has_the_rank_asked_and_is_the_best_rank_k_approximation() -> None:
    tiny = make_tiny("llama")
    targets = ["q_proj", "v_proj"]
    model = two_adapters(tiny.build(), {"r": 2, "alpha": 4, "target_modules": targets},
                         {"r": 3, "alpha": 3, "target_modules": targets})
    da, db = deltas(model, "a"), deltas(model, "b")
    combine_adapters(model, ["a", "b"], [1.0, 0.5], "svd", "c", rank=3)
    combine_adapters(model, ["a", "b"], [1.0, 0.5], "svd", "full", rank=5)  # rank of the exact sum: exact
    dc, dfull = deltas(model, "c"), deltas(model, "full")
    for name, delta in dc.items():
        exact = da[name] + 0.5 * db[name]
        layer = model.get_submodule(name)
        assert layer.lora_A["c"].weight.shape == (3, 32) and torch.linalg.matrix_rank(delta) == 3
        S = torch.linalg.svdvals(exact)
        tail = S[3:].square().sum().sqrt()
        assert tail > 1e-3  # the truncation really drops something
        assert math.isclose(torch.linalg.norm(exact - delta), tail, rel_tol=1e-4)  # Eckart-Young optimum
        # no other rank-3 update of the same layout does better: e.g. keeping "a" whole and the best rank-1 of "b"
        other = da[name] + torch.mm(*low_rank(0.5 * db[name], 1))
        assert torch.linalg.norm(exact - other) > tail
        torch.testing.assert_close(dfull[name], exact, rtol=0, atol=ATOL)
    combine_adapters(model, ["a", "b"], [1.0, 0.5], "svd", "default")  # default rank: the largest source rank (3)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].weight.shape == (3, 32)


def test_svd_rank_is_capped_by_the_matrix_size(tiny_mlp) -> None:
    model = two_adapters(tiny_mlp.build(), {"r": 4, "target_modules": ["fc2", "out"]},
                         {"r": 6, "target_modules": ["fc2", "out"]})
    da, db = deltas(model, "a"), deltas(model, "b")
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "svd", "c", rank=20)  # out: 8 x 32, at most rank 8
    assert model.get_submodule("out").lora_A["c"].weight.shape == (8, 32)
    assert model.get_submodule("fc2").lora_A["c"].weight.shape == (10, 32)  # the exact sum has rank <= 4 + 6
    assert model.peftkit_state.configs["c"].rank_pattern == {"out": 8}
    torch.testing.assert_close(deltas(model, "c")["out"], da["out"] + db["out"], rtol=0, atol=ATOL)


# -- TIES and DARE on small known tensors -------------------------------------------------------------------------
D1 = torch.tensor([[1.0, 2.0], [-3.0, -6.0]])  # = B1·A1 with B1 = [1, -3]ᵀ, A1 = [1, 2]
D2 = torch.tensor([[-2.0, 0.5], [-1.0, 0.25]])  # = B2·A2 with B2 = [2, 1]ᵀ, A2 = [-1, 0.25]


def test_magnitude_trim_keeps_the_largest_entries() -> None:
    torch.testing.assert_close(magnitude_trim(D1, 0.5), torch.tensor([[0.0, 0.0], [-3.0, -6.0]]))
    torch.testing.assert_close(magnitude_trim(D2, 0.25), torch.tensor([[-2.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(magnitude_trim(D2, 1.0), D2)


def test_ties_by_hand() -> None:
    # trimmed to half: D1 -> [[0, 0], [-3, -6]], D2 -> [[-2, 0], [-1, 0]]; summed [[-2, 0], [-4, -6]]
    # elected signs [[-, +], [-, -]]; agreeing weighted entries averaged (zeros never count)
    trimmed = [magnitude_trim(D1, 0.5), magnitude_trim(D2, 0.5)]
    torch.testing.assert_close(ties_merge(trimmed, [1.0, 1.0]), torch.tensor([[-2.0, 0.0], [-2.0, -6.0]]))
    torch.testing.assert_close(ties_merge(trimmed, [0.5, 2.0]), torch.tensor([[-4.0, 0.0], [-1.75, -3.0]]))
    # total mass vs majority count: one big positive against two small negatives
    three = [torch.tensor([[5.0]]), torch.tensor([[-1.0]]), torch.tensor([[-2.0]])]
    assert ties_merge(three, [1.0, 1.0, 1.0], "total").item() == 5.0
    assert ties_merge(three, [1.0, 1.0, 1.0], "frequency").item() == -1.5


def tiny_2x2(factors: list[tuple[list[float], list[float]]]) -> nn.Module:
    """One bias-free 2x2 linear layer "0" with rank-1 LoRA adapters a, b, ... of the given B, A (scaling 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    for name, (B, A) in zip("abcd", factors):
        peftkit.inject(model, peftkit.LoraConfig(r=1, alpha=1, target_modules=["0"]), name)
        layer = model.get_submodule("0")
        with torch.no_grad():
            layer.lora_B[name].weight.copy_(torch.tensor(B).view(2, 1))
            layer.lora_A[name].weight.copy_(torch.tensor(A).view(1, 2))
    return model


def test_ties_adapter_by_hand() -> None:
    model = tiny_2x2([([1.0, -3.0], [1.0, 2.0]), ([2.0, 1.0], [-1.0, 0.25])])
    torch.testing.assert_close(model.get_submodule("0").delta_weight("a"), D1)
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "ties", "t", density=0.5)  # default rank 1 + 1 = 2: exact
    torch.testing.assert_close(model.get_submodule("0").delta_weight("t"), torch.tensor([[-4.0, 0.0], [-1.75, -3.0]]),
                               rtol=0, atol=ATOL)


def test_random_drop_keeps_or_rescales_each_entry() -> None:
    d = torch.arange(1.0, 10001.0).view(100, 100)
    dropped = random_drop(d, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(dropped[kept], d[kept] / 0.3)
    # unbiased: the mean over many draws is the delta itself
    gen = torch.Generator().manual_seed(1)
    mean = torch.stack([random_drop(D1, 0.5, gen) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, D1, rtol=0.1, atol=0.1)
    assert torch.equal(random_drop(D1, 1.0, gen), D1)


def test_dare_adapter_entries_are_rescaled_kept_sums() -> None:
    model = tiny_2x2([([1.0, -3.0], [1.0, 2.0]), ([2.0, 1.0], [-1.0, 0.25])])
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "dare", "d", density=0.5, seed=3)
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "dare", "d_again", density=0.5, seed=3)
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "dare", "d_other", density=0.5, seed=4)
    layer = model.get_submodule("0")
    d = layer.delta_weight("d")
    # each entry is 0.5·m1·D1/0.5 + 2·m2·D2/0.5 for some keep flags m1, m2 in {0, 1}
    for i in range(2):
        for j in range(2):
            options = torch.tensor([m1 * D1[i, j] + 4 * m2 * D2[i, j] for m1 in (0, 1) for m2 in (0, 1)])
            assert (options - d[i, j]).abs().min() < ATOL, (i, j, d[i, j], options)
    torch.testing.assert_close(layer.delta_weight("d_again"), d, rtol=0, atol=0)  # seeded
    assert not torch.allclose(layer.delta_weight("d_other"), d)
    # density 1 drops nothing: DARE is the weighted sum, DARE-TIES is TIES without trimming
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "dare", "d1", density=1.0)
    torch.testing.assert_close(layer.delta_weight("d1"), 0.5 * D1 + 2 * D2, rtol=0, atol=ATOL)
    combine_adapters(model, ["a", "b"], [0.5, 2.0], "dare_ties", "dt1", density=1.0)
    torch.testing.assert_close(layer.delta_weight("dt1"), ties_merge([D1, D2], [0.5, 2.0]), rtol=0, atol=ATOL)


# -- real PEFT as the oracle --------------------------------------------------------------------------------------
@pytest.fixture
def both_tools(hf_base_dir, tmp_path):
    """Adapters a (r 2, alpha 4) and b (r 4, alpha 2) saved by peftkit; a PeftModel and a peftkit model with both."""
    tiny = make_tiny("llama")
    load = lambda: AutoModelForCausalLM.from_pretrained(hf_base_dir("llama")).eval()  # noqa: E731
    targets = ["q_proj", "v_proj", "up_proj"]
    ours = two_adapters(load(), {"r": 2, "alpha": 4, "target_modules": targets},
                        {"r": 4, "alpha": 2, "target_modules": targets})
    for name in ("a", "b"):
        peftkit.save_adapter(ours, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return tiny, ours, theirs


@pytest.mark.parametrize("combination, peft_name, kw", [
    ("cat", "cat", {}),
    ("svd", "svd", {"rank": 3}),
    ("ties", "ties_svd", {"density": 0.4, "rank": 5}),
    ("ties", "ties_svd", {"density": 0.4, "rank": 2, "majority_sign_method": "frequency"}),
    ("dare", "dare_linear_svd", {"density": 0.5, "rank": 6, "seed": 7}),
    ("dare_ties", "dare_ties_svd", {"density": 0.5, "rank": 6, "seed": 7}),
])
def test_same_as_peft_add_weighted_adapter(both_tools, combination, peft_name, kw) -> None:
    tiny, ours, theirs = both_tools
    weights = [0.8, -0.6]
    combine_adapters(ours, ["a", "b"], weights, combination, "c", **kw)
    peft_kw = {"svd_rank": kw["rank"]} if "rank" in kw else {}
    peft_kw.update({k: kw[k] for k in ("density", "majority_sign_method") if k in kw})
    # PEFT's DARE draws its masks from the global generator (after initialising the new adapter): give it a
    # generator seeded as ours; it draws in the same order (modules in model order, adapters in order)
    gen, bernoulli = torch.Generator().manual_seed(kw.get("seed", 0)), torch.bernoulli
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", lambda p, *args, **kwargs: bernoulli(p, generator=gen))
        theirs.add_weighted_adapter(["a", "b"], weights, "c", combination_type=peft_name, **peft_kw)
    theirs.set_adapter("c")
    expected = tiny.run(theirs)
    assert (expected - out_with(tiny, ours, "a")).abs().max() > 1e-2
    torch.testing.assert_close(out_with(tiny, ours, "c"), expected, rtol=0, atol=1e-4)


def test_combined_adapter_with_rank_pattern_loads_in_peft_and_peftkit(hf_base_dir, tmp_path) -> None:
    tiny = make_tiny("llama")
    load = lambda: AutoModelForCausalLM.from_pretrained(hf_base_dir("llama")).eval()  # noqa: E731
    targets = ["q_proj", "k_proj", "embed_tokens"]
    model = two_adapters(load(), {"r": 2, "target_modules": targets, "rank_pattern": {"k_proj": 1}},
                         {"r": 3, "use_rslora": True, "target_modules": targets})
    combine_adapters(model, ["a", "b"], [1.0, 0.5], "cat", "c")
    expected = out_with(tiny, model, "c")
    peftkit.save_adapter(model, tmp_path / "c", "c")
    saved = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert saved["r"] == 5 and saved["lora_alpha"] == 5 and not saved["use_rslora"]
    assert saved["rank_pattern"] == {f"model.layers.{i}.self_attn.k_proj": 4 for i in (0, 1)}
    theirs = peft.PeftModel.from_pretrained(load(), tmp_path / "c").eval()
    torch.testing.assert_close(tiny.run(theirs), expected, rtol=0, atol=ATOL)
    again = peftkit.load_adapter(load(), tmp_path / "c")
    torch.testing.assert_close(tiny.run(again), expected, rtol=0, atol=ATOL)
    merged = peftkit.unload(again, merge=True)  # into the base: a plain model with the same output
    torch.testing.assert_close(tiny.run(merged), expected, rtol=0, atol=ATOL)


# -- errors -------------------------------------------------------------------------------------------------------
def lora_pair():
    return two_adapters(make_tiny("llama").build(), {"target_modules": ["q_proj", "v_proj"]},
                        {"target_modules": ["q_proj", "v_proj"]})


@pytest.mark.parametrize("args, kw, message", [
    (["a", "b"], {"weights": [1.0]}, "1 weights for 2 adapters"),
    (["a", "b"], {"combination": "sum"}, "unknown combination 'sum'; valid: " + ", ".join(COMBINATIONS)),
    (["a", "b"], {"combination": "ties"}, "'ties' needs a density"),
    (["a", "b"], {"combination": "ties", "density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    (["a", "b"], {"combination": "dare", "density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
    (["a", "b"], {"combination": "cat", "density": 0.5}, "density applies to ties, dare, dare_ties, not to 'cat'"),
    (["a", "b"], {"combination": "svd", "rank": 0}, "rank must be an integer >= 1, got 0"),
    (["a", "b"], {"combination": "linear", "rank": 4}, "'linear' is exact"),
    (["a", "b"], {"majority_sign_method": "mean"}, "majority_sign_method must be 'total' or 'frequency'"),
    (["a", "zz"], {}, "no adapter named 'zz'; loaded adapters: a, b"),
    (["a", "a"], {}, "listed twice"),
    (["a", "b"], {"new_name": "b"}, "already has an adapter named 'b'"),
    ([], {"weights": []}, "at least one adapter"),
])
def test_bad_requests_are_one_line_config_errors(args, kw, message) -> None:
    model = lora_pair()
    call = {"weights": [1.0] * len(args), "combination": "cat", "new_name": "c", **kw}
    with pytest.raises(ConfigError, match=message) as e:
        combine_adapters(model, args, call.pop("weights"), call.pop("combination"), call.pop("new_name"), **call)
    assert "\n" not in str(e.value)
    assert "c" not in model.peftkit_state.configs


def test_different_targets_name_the_modules_only_in_one() -> None:
    model = two_adapters(make_tiny("llama").build(), {"target_modules": ["q_proj", "v_proj"]},
                         {"target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match=r"adapters 'a' and 'b' adapt different modules: only 'a' adapts "
                                          r"model\.layers\.0\.self_attn\.v_proj, model\.layers\.1\.self_attn\.v_proj"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", "c")


@pytest.mark.parametrize("method, config, message", [
    ("dora", lambda: peftkit.DoraConfig(target_modules=["q_proj", "v_proj"]), "'b' is dora: only plain LoRA"),
    ("ia3", lambda: peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
     "'b' is ia3: only plain LoRA"),
    ("bias", lambda: peftkit.LoraConfig(target_modules=["q_proj", "v_proj"], bias="all"),
     "'b' also trains base tensors"),
])
def test_non_lora_sources_are_refused(method, config, message) -> None:
    model = make_tiny("llama").build()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["q_proj", "v_proj"]), "a")
    peftkit.inject(model, config(), "b")
    with pytest.raises(ConfigError, match=message):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", "c")


# -- adapter folders ----------------------------------------------------------------------------------------------
def saved_pair(tmp_path: Path, a: dict | None = None, b: dict | None = None, sidecar: bool = True) -> list[Path]:
    """Adapters a and b saved to folders, with ``a``/``b`` merged into their adapter_config.json (peftkit.json: the
    base identity sidecar, removed without ``sidecar`` as in PEFT's folders)."""
    model = lora_pair()
    paths = [tmp_path / "a", tmp_path / "b"]
    for path, name, extra in zip(paths, "ab", (a, b)):
        peftkit.save_adapter(model, path, name)
        edit_json(path / "adapter_config.json", extra or {})
        if not sidecar:
            (path / SIDECAR_NAME).unlink()
    return paths


def edit_json(file: Path, changes: dict) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_folders_of_different_bases_are_refused(tmp_path) -> None:
    paths = saved_pair(tmp_path, {"base_model_name_or_path": "org/model"}, {"base_model_name_or_path": "other/model"},
                       sidecar=False)
    with pytest.raises(AdapterFileError, match=r"b: made for base model 'other/model', but .*a for 'org/model'"):
        check_adapter_files(paths)
    assert len(check_adapter_files(saved_pair(tmp_path / "same", {"base_model_name_or_path": "org/model"},
                                              {"base_model_name_or_path": "org/model"}, sidecar=False))) == 2


def test_the_base_fingerprint_decides_when_both_have_one(tmp_path) -> None:
    name = {"base_model_name_or_path": "org/model"}
    other_weights = saved_pair(tmp_path / "1", name, name)
    edit_json(other_weights[1] / SIDECAR_NAME, {"base_fingerprint": "f00d" * 16})
    with pytest.raises(AdapterFileError, match="b: made for another base model than .*a .base_fingerprint 'f00df00d"):
        check_adapter_files(other_weights)
    # the same weights under another name (e.g. a local copy of a hub model): combinable
    renamed = saved_pair(tmp_path / "2", name, {"base_model_name_or_path": "/copy/of/model"})
    edit_json(renamed[1] / SIDECAR_NAME, {"base_model_name_or_path": "/copy/of/model"})
    assert len(check_adapter_files(renamed)) == 2
    # a fingerprint-like key in adapter_config.json counts too
    in_config = saved_pair(tmp_path / "3", {"base_fingerprint_v2": "1"}, {"base_fingerprint_v2": "2"}, sidecar=False)
    with pytest.raises(AdapterFileError, match="base_fingerprint_v2 '2' vs '1'"):
        check_adapter_files(in_config)


def test_non_lora_folder_is_refused_before_loading(tmp_path) -> None:
    model = make_tiny("llama").build()
    peftkit.inject(model, peftkit.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    peftkit.save_adapter(model, tmp_path / "ia3")
    paths = saved_pair(tmp_path)
    with pytest.raises(AdapterFileError, match=r"ia3: a IA3 adapter; only plain LoRA adapters can be combined"):
        check_adapter_files([paths[0], tmp_path / "ia3"])
    fresh = make_tiny("llama").build()
    assert load_sources(fresh, paths) == ["a", "b"]
    assert list(fresh.peftkit_state.configs) == ["a", "b"]


def test_the_methods_that_combine_say_so_on_their_config():
    """Which methods combine is a declared fact of their config (``combinable``), not a list of names in core."""
    from peftkit.core.registry import METHODS, list_methods

    list_methods()  # registers the built-in methods
    assert {n for n, m in METHODS.items() if m.config_cls.combinable} == {"lora", "qlora"}
