import inspect
import json
import logging
import re
from dataclasses import dataclass

import pytest
import torch

from optimum_lrs import (CalibrationConfig, CapAllocation, FactorQuantization, GlobalGreedyAllocation,
                         LowRankSparseConfig, RefitConfig, RPCAConfig, UniformAllocation)
from optimum_lrs.config import FORMAT_VERSION, QUANTIZED_FORMAT_VERSION, READABLE_FORMATS

# (where, value): a constructor keyword, or "group.field" of a nested config ("cap." is CapAllocation's,
# "allocation." UniformAllocation's), or "saved.key" of config.json's dict only `from_dict` reads.
BAD_VALUES = [
    ("param_ratio", 0.0), ("param_ratio", 1.0), ("param_ratio", -0.1), ("param_ratio", float("nan")), ("param_ratio", "0.5"),
    ("allocation", "random"), ("allocation", None), ("allocation", {"steps": 2}), ("allocation", 3),
    ("target_modules", []), ("target_modules", [""]), ("target_modules", ""), ("target_modules", 3),
    ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [1]),
    ("activation_aware", 1), ("activation_aware", "yes"),
    ("sparse_format", "coo"), ("sparse_format", None),
    ("factor_dtype", "int8"), ("factor_dtype", torch.float32),
    ("seed", -1), ("seed", 1.0),
    ("rpca", "fast"), ("refit", 3), ("calibration", [512]),
    ("calibration_data", 42), ("calibration_data", [1, 2]), ("calibration_data", []),
    ("calibration_data", torch.zeros(3)), ("calibration_data", torch.zeros(2, 3)),
    ("tokenizer", "gpt2"), ("cache_dir", ""), ("cache_dir", 3),
    ("allocation.lowrank_fraction", 1.5), ("allocation.lowrank_fraction", -0.01),
    ("cap.steps", -1), ("cap.samples", 0), ("cap.samples", 3), ("cap.batch_size", 0), ("cap.lr", -0.1),
    ("cap.lr", float("inf")), ("cap.policy", "per_layer"), ("cap.candidates", "svd"), ("cap.sigma", 0.0),
    ("cap.sigma", -1.0), ("cap.refine_iterations", -1), ("cap.refine_iterations", 2.0), ("cap.refine_iterations", 21),
    ("cap.lowrank_fraction", 2.0),
    ("rpca.l1_weight", 0.0), ("rpca.l1_weight", -1.0), ("rpca.l1_weight", float("inf")),
    ("rpca.max_iter", 0), ("rpca.max_iter", 2.5), ("rpca.max_iter", True), ("rpca.tol", 0.0), ("rpca.tol", 1.0),
    ("rpca.rho", 1.0), ("rpca.rho", 0.5), ("rpca.solver", "qr"), ("rpca.solver", None),
    ("rpca.max_rank", 0), ("rpca.max_rank", 2.5), ("rpca.max_rank", True), ("rpca.max_rank", "full"),
    ("refit.selection", "column"), ("refit.values", "shrunk"), ("refit.values", None),
    ("refit.iterations", -1), ("refit.iterations", 1.5), ("refit.iterations", "3"),
    ("refit.objective", "hessian"), ("refit.objective", None), ("refit.block_matching_steps", -1),
    ("refit.block_matching_steps", 2.0), ("refit.block_matching_steps", "eight"), ("refit.block_matching_steps", None),
    ("calibration.seq_len", 1), ("calibration.num_samples", 0), ("calibration.pipeline", "parallel"),
    ("calibration.pipeline", None),
    ("quantization", "int4"), ("quantization", True), ("quantization.bits", 3), ("quantization.bits", 16),
    ("quantization.bits", "4"), ("quantization.group_size", 33), ("quantization.group_size", 0),
    ("quantization.error_feedback", 1), ("quantization.refit_scales", "yes"), ("quantization.match_scales", 0),
    ("quantization.rounding", "stochastic"), ("byte_ratio", 0.0), ("byte_ratio", 1.5), ("byte_ratio", "small"),
    ("saved.format_version", max(READABLE_FORMATS) + 1), ("saved.quant_method", "gptq"), ("saved.compressed", []),
    ("compressed.modules", []), ("compressed.modules", {"a": {"rank": -1, "nnz": 0}}),
    ("compressed.modules", {"a": {"rank": 1}}), ("compressed.modules", {"a": {"rank": 1, "nnz": 2, "size": 3}}),
    ("compressed.evaluation", {"perplexity": float("nan")}), ("compressed.evaluation", [1]),
    ("compressed.evaluation", {"ok": True}), ("compressed.base_model", ""),
]
OWNERS = {"": "LowRankSparseConfig", "allocation": "UniformAllocation", "cap": "CapAllocation", "rpca": "RPCAConfig",
          "refit": "RefitConfig", "calibration": "CalibrationConfig", "quantization": "FactorQuantization",
          "saved": "LowRankSparseConfig",
          "compressed": "LowRankSparseConfig.compressed"}
MODULES = {"m.a": {"rank": 2, "nnz": 5, "rpca_iterations": 4, "rpca_residual": 1e-5}}


def build(where: str, value):
    group, _, key = where.rpartition(".")
    if group == "saved":
        return LowRankSparseConfig.from_dict({**LowRankSparseConfig().to_dict(), key: value})
    if group == "compressed":
        return LowRankSparseConfig.from_dict({"compressed": {"modules": MODULES, key: value}})
    if group in ("allocation", "cap"):
        return LowRankSparseConfig(allocation={"method": "uniform" if group == "allocation" else "cap", key: value})
    return LowRankSparseConfig(**({group: {key: value}} if group else {key: value}))


@pytest.mark.parametrize(("where", "value"), BAD_VALUES)
def test_a_bad_value_names_its_config_and_field(where, value):
    group, _, key = where.rpartition(".")
    with pytest.raises(ValueError, match=re.escape(f"{OWNERS[group]}.{key}")):
        build(where, value)


def test_every_field_has_a_rejected_value():
    tested = {where for where, _ in BAD_VALUES}
    for name in LowRankSparseConfig._fields():
        assert name in tested, name
    for group, cls in (("allocation", UniformAllocation), ("cap", CapAllocation), ("rpca", RPCAConfig),
                       ("refit", RefitConfig), ("calibration", CalibrationConfig), ("quantization", FactorQuantization)):
        for name in inspect.signature(cls).parameters:
            assert f"{group}.{name}" in tested, (group, name)


def test_the_constructor_is_small():
    """The recipe's top level stays a handful of fields, the rest lives in the nested configs, and the run's
    inputs (never saved) are keyword-only, apart from it."""
    parameters = inspect.signature(LowRankSparseConfig).parameters.values()
    recipe = [p.name for p in parameters if p.kind is not p.KEYWORD_ONLY]
    inputs = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    assert len(recipe) + len(inputs) <= 16, recipe + inputs
    assert inputs == ["calibration_data", "tokenizer", "cache_dir"]


def test_the_second_moment_objective_needs_calibration_inputs_and_a_refit():
    with pytest.raises(ValueError, match="refit.objective.*activation_aware=False"):
        LowRankSparseConfig(activation_aware=False, refit=RefitConfig(objective="second_moment"))
    with pytest.raises(ValueError, match='RefitConfig.objective.*selection="allocation"'):
        RefitConfig(objective="second_moment", selection="allocation")


def test_nested_configs_validate_where_they_are_written():
    with pytest.raises(ValueError, match=re.escape("RPCAConfig.tol must be")):
        RPCAConfig(tol=2.0)
    with pytest.raises(ValueError, match=re.escape("CapAllocation.samples must be even")):
        CapAllocation(samples=3)
    with pytest.raises(ValueError, match=re.escape("CapAllocation.refine_iterations must be at most")):
        LowRankSparseConfig(allocation=CapAllocation(refine_iterations=6), refit=RefitConfig(iterations=4))


def test_defaults_and_accepted_forms():
    cfg = LowRankSparseConfig(target_modules=r".*\.mlp\..*", calibration_data="one text", tokenizer=lambda t: t,
                              factor_dtype="bfloat16")
    assert cfg.inputs.calibration_data == ["one text"]
    assert LowRankSparseConfig(calibration_data=[[1, 2, 3], [4, 5]]).inputs.calibration_data == [[1, 2, 3], [4, 5]]
    ids = torch.ones(2, 8, dtype=torch.long)
    assert LowRankSparseConfig(calibration_data=ids).inputs.calibration_data is ids
    assert LowRankSparseConfig().quant_method == "optimum_lrs"
    # a method's name, its config, and its dict form are the same allocation
    assert (LowRankSparseConfig(allocation="cap") == LowRankSparseConfig(allocation=CapAllocation())
            == LowRankSparseConfig(allocation={"method": "cap"}))
    assert LowRankSparseConfig(rpca={"tol": 1e-3}).rpca == RPCAConfig(tol=1e-3)
    cap = CapAllocation(steps=3)
    LowRankSparseConfig(allocation=cap)
    assert cap.refine_iterations is None  # the caller's config is not changed by the parent's defaults
    assert LowRankSparseConfig().rpca.tol == 1e-2 and LowRankSparseConfig(
        refit=RefitConfig(selection="allocation")).rpca.tol == 1e-4


def test_rpca_rank_cap_auto_follows_what_the_allocation_reads():
    """"auto" caps Stage 1 at the uniform rank where the allocation reads no more than that (uniform, CAP on
    refit candidates)."""
    from optimum_lrs.stage1.decompose import rpca_rank_cap

    # 576 x 576 at 50%: 0.2 * (165888 + 1) // (576 + 576) = 28 triplets, what `allocate_uniform` keeps.
    assert rpca_rank_cap(LowRankSparseConfig(), (576, 576), 0.5) == 28
    assert rpca_rank_cap(LowRankSparseConfig(allocation="cap"), (576, 576), 0.5) == 28
    assert rpca_rank_cap(LowRankSparseConfig(allocation=CapAllocation(policy="candidate")), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(allocation=UniformAllocation(lowrank_fraction=0.01)), (8, 8), 0.1) == 1  # never 0
    assert rpca_rank_cap(LowRankSparseConfig(allocation="global_greedy"), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(allocation=CapAllocation(candidates="rpca")), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(refit=RefitConfig(selection="allocation")), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(rpca=RPCAConfig(max_rank=None)), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(allocation="global_greedy", rpca=RPCAConfig(max_rank=7)), (576, 576), 0.5) == 7


def test_round_trip_is_exact_and_leaves_the_run_inputs_out():
    cfg = LowRankSparseConfig(
        param_ratio=0.3, allocation=GlobalGreedyAllocation(lowrank_fraction=0.25), target_modules=["q_proj", "v_proj"],
        modules_to_not_convert=["x"], seed=3, factor_dtype="float16",
        rpca=RPCAConfig(l1_weight=0.02, max_iter=7, tol=1e-3, rho=1.7), refit=RefitConfig(values="rpca", iterations=2),
        calibration=CalibrationConfig(seq_len=64, pipeline="sequential"),
        calibration_data=["secret text"], tokenizer=lambda t: t, cache_dir="/tmp/secret-cache")
    d = cfg.to_dict()
    assert set(d) == {"quant_method", "format_version", "param_ratio", "allocation", "target_modules",
                      "modules_to_not_convert", "activation_aware", "sparse_format", "factor_dtype", "seed", "rpca",
                      "refit", "calibration", "compressed"}
    assert d["format_version"] == FORMAT_VERSION and d["compressed"] is None
    assert d["allocation"] == {"method": "global_greedy", "lowrank_fraction": 0.25}
    assert "secret" not in cfg.to_json_string()
    again = LowRankSparseConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d and again == cfg
    assert again.inputs.calibration_data is None
    d["compressed"] = {"modules": MODULES, "base_model": "org/dense", "evaluation": {"perplexity": 12.5},
                       "block_matching": {"m": {"before": 0.07, "after": 0.05, "step": 0.005}}}
    done = LowRankSparseConfig.from_dict(d)
    assert done.is_compressed and done.compressed.modules == MODULES and done.to_dict() == d
    assert done.compressed.blocks_gained == 1
    for bad in ({"m": {"before": 0.07}}, {"m": {"before": 0.07, "after": "low", "step": 0.0}}, ["m"]):
        d["compressed"]["block_matching"] = bad
        with pytest.raises(ValueError, match="compressed.block_matching must be None or a dict of block name"):
            LowRankSparseConfig.from_dict(d)


def test_unknown_keys_are_refused_at_every_level():
    d = LowRankSparseConfig().to_dict()
    for edit, name in ((lambda c: c.update(param_ratoi=0.4), "param_ratoi"),
                       (lambda c: c["rpca"].update(tolerance=0.1), "tolerance"),
                       (lambda c: c["allocation"].update(steps=2), "steps"),
                       (lambda c: c.update(compressed={"modules": {}, "when": "today"}), "when")):
        bad = json.loads(json.dumps(d))
        edit(bad)
        with pytest.raises(ValueError, match=f"unknown keys \\['{name}'\\]"):
            LowRankSparseConfig.from_dict(bad)
    with pytest.raises(TypeError):
        LowRankSparseConfig.from_dict([("param_ratio", 0.5)])


def test_overrides_reach_nested_fields_and_refuse_bad_keys():
    cfg = LowRankSparseConfig.from_overrides(
        ["allocation=cap", "allocation.steps=3", "rpca.tol=1e-3", "calibration.pipeline=sequential",
         'target_modules=["q_proj"]'], param_ratio=0.4)
    assert cfg.allocation == CapAllocation(steps=3, refine_iterations=5) and cfg.rpca.tol == 1e-3
    assert (cfg.calibration.pipeline, cfg.target_modules, cfg.param_ratio) == ("sequential", ["q_proj"], 0.4)
    assert LowRankSparseConfig.from_overrides(["allocation.steps=2"], allocation="cap").allocation.steps == 2
    assert LowRankSparseConfig.from_overrides(["cap.steps=16"]).allocation == CapAllocation(steps=16, refine_iterations=5)
    assert LowRankSparseConfig.from_overrides(["cap.lr=0.1", "cap.steps=2"], allocation="cap").allocation.lr == 0.1
    for pairs, message in ((["rpca"], "expected KEY=VALUE"), (["rpca.=1"], "expected KEY=VALUE"),
                           (["seed=1", "seed.value=1"], "seed is not a nested config"),
                           (["refit.colour=red"], "LowRankSparseConfig.refit got unknown keys ['colour']"),
                           (["allocation.steps=2"], "UniformAllocation got unknown keys ['steps']"),
                           (["allocation=uniform", "cap.steps=2"], "allocation is 'uniform': drop that allocation"),
                           (["cap.colour=red"], "CapAllocation got unknown keys ['colour']")):
        with pytest.raises(ValueError, match=re.escape(message)):
            LowRankSparseConfig.from_overrides(pairs)


def test_format_one_names_still_read_with_a_warning(caplog):
    """A format-2 dict with a format-1 key (an old `--set cap_steps=4`) reads into today's field, and says so."""
    with caplog.at_level(logging.WARNING, logger="optimum_lrs.io.format1"):
        cfg = LowRankSparseConfig.from_overrides(["allocation=cap", "cap_steps=4", "rpca_tol=1e-3"])
    assert cfg.allocation.steps == 4 and cfg.rpca.tol == 1e-3
    assert "allocation.steps" in caplog.text and "rpca.tol" in caplog.text


def test_config_json_round_trip(tmp_path, dense_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = LowRankSparseConfig(param_ratio=0.6, calibration_data=["not saved, " * 3000], rpca=RPCAConfig(max_iter=30),
                              calibration=CalibrationConfig(num_samples=4))
    model = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "optimum_lrs"
    saved = raw["quantization_config"]
    assert "not saved" not in json.dumps(saved) and saved["format_version"] == FORMAT_VERSION
    assert LowRankSparseConfig.from_dict(saved).to_dict() == model.config.quantization_config.to_dict()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == raw["lrs_base_model_type"]
    assert LowRankSparseConfig.from_dict(loaded.quantization_config).compressed.modules == saved["compressed"]["modules"]
    assert cfg.compressed is None  # the caller's config describes the recipe, not this model


def test_a_newly_registered_allocator_is_accepted_by_the_config():
    from optimum_lrs.allocation import ALLOCATION_CONFIGS, ALLOCATORS, AllocationConfig, register_allocator
    from optimum_lrs.allocation.uniform import allocate_uniform

    @dataclass
    class UniformAgain(AllocationConfig):
        name = "uniform_again"

    register_allocator(UniformAgain)(allocate_uniform)
    try:
        cfg = LowRankSparseConfig(allocation="uniform_again", activation_aware=False)
        assert isinstance(cfg.allocation, UniformAgain) and not cfg.needs_calibration
        assert LowRankSparseConfig.from_dict(cfg.to_dict()) == cfg
    finally:
        del ALLOCATORS[UniformAgain], ALLOCATION_CONFIGS["uniform_again"]
    with pytest.raises(ValueError, match="registered methods"):
        LowRankSparseConfig(allocation="uniform_again")
    with pytest.raises(ValueError, match="UniformAgain has no registered allocator"):
        LowRankSparseConfig(allocation=UniformAgain())


def test_one_budget_and_the_bitmask_with_byte_ratio():
    cfg = LowRankSparseConfig(byte_ratio=0.27, quantization=4)
    assert (cfg.param_ratio, cfg.byte_ratio, cfg.budget_setting) == (None, 0.27, "byte_ratio=0.27")
    assert LowRankSparseConfig.from_dict(cfg.to_dict()) == cfg
    assert "byte_ratio" not in LowRankSparseConfig().to_dict() and LowRankSparseConfig().param_ratio == 0.5
    with pytest.raises(ValueError, match=r"byte_ratio must be None where param_ratio is given .* got 0.3"):
        LowRankSparseConfig(param_ratio=0.5, byte_ratio=0.3)
    with pytest.raises(ValueError, match=r"sparse_format must be \"bitmask\" with byte_ratio .* got 'csr'"):
        LowRankSparseConfig(byte_ratio=0.3, sparse_format="csr")
    assert LowRankSparseConfig.from_overrides(["byte_ratio=0.3"]).byte_ratio == 0.3
