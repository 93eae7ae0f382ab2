import json

import pytest
import torch

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.config import FORMAT_VERSION

BAD_VALUES = [
    ("param_ratio", 0.0), ("param_ratio", 1.0), ("param_ratio", -0.1), ("param_ratio", float("nan")), ("param_ratio", "0.5"),
    ("allocation", "random"), ("allocation", None),
    ("lowrank_fraction", 1.5), ("lowrank_fraction", -0.01),
    ("sparse_values", "shrunk"), ("sparse_values", None),
    ("target_modules", []), ("target_modules", [""]), ("target_modules", ""), ("target_modules", 3),
    ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [1]),
    ("rpca_lambda", 0.0), ("rpca_lambda", -1.0), ("rpca_lambda", float("inf")),
    ("rpca_max_iter", 0), ("rpca_max_iter", 2.5), ("rpca_max_iter", True),
    ("rpca_tol", 0.0), ("rpca_tol", 1.0),
    ("rpca_rho", 1.0), ("rpca_rho", 0.5), ("rpca_solver", "qr"), ("rpca_solver", None),
    ("rpca_max_rank", 0), ("rpca_max_rank", 2.5), ("rpca_max_rank", True), ("rpca_max_rank", "full"),
    ("sparse_format", "coo"), ("sparse_format", None),
    ("activation_aware", 1), ("activation_aware", "yes"), ("refine_iterations", -1), ("refine_iterations", 1.5),
    ("refine_iterations", "3"), ("sparse_selection", "column"), ("pipeline", "parallel"), ("pipeline", None),
    ("objective", "hessian"), ("objective", None), ("block_matching_steps", -1), ("block_matching_steps", 2.0),
    ("block_matching_steps", "eight"), ("block_matching_steps", None),
    ("cache_dir", ""), ("cache_dir", 3), ("base_model", ""), ("base_model", 3),
    ("evaluation", {"perplexity": float("nan")}), ("evaluation", [1]), ("evaluation", {"ok": True}),
    ("calibration_data", 42), ("calibration_data", [1, 2]), ("calibration_data", []),
    ("calibration_data", torch.zeros(3)), ("calibration_data", torch.zeros(2, 3)),
    ("calibration_seq_len", 1), ("calibration_num_samples", 0),
    ("tokenizer", "gpt2"),
    ("cap_steps", -1), ("cap_samples", 0), ("cap_samples", 1), ("cap_baseline", "mean"), ("cap_batch_size", 0), ("cap_lr", -0.1), ("cap_lr", float("inf")),
    ("cap_baseline_beta", 1.0), ("cap_baseline_beta", -0.5), ("cap_init", "random"), ("cap_init_temperature", 0.0),
    ("cap_rank_by", "cost"), ("cap_gradient", "adam"), ("cap_normalize_advantage", 1),
    ("cap_policy", "per_layer"), ("cap_candidates", "svd"), ("cap_sigma", 0.0), ("cap_sigma", -1.0), ("cap_samples", 3), ("cap_rank_by", "probability"),
    ("cap_refine_iterations", -1), ("cap_refine_iterations", 2.0), ("cap_refine_iterations", 21),
    ("seed", -1), ("seed", 1.0),
    ("factor_dtype", "int8"), ("factor_dtype", torch.float32),
    ("compressed_modules", []), ("compressed_modules", {"a": {"rank": -1, "nnz": 0}}),
    ("compressed_modules", {"a": {"rank": 1}}), ("compressed_modules", {"a": {"rank": 1, "nnz": 2, "size": 3}}),
    ("format_version", FORMAT_VERSION + 1),
    ("quant_method", "gptq"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LowRankSparseConfig(**{field: value})


def test_the_second_moment_objective_needs_calibration_inputs_and_a_refit():
    with pytest.raises(ValueError, match="objective.*activation_aware=False"):
        LowRankSparseConfig(objective="second_moment", activation_aware=False)
    with pytest.raises(ValueError, match='objective.*sparse_selection="allocation"'):
        LowRankSparseConfig(objective="second_moment", sparse_selection="allocation")


def test_every_field_has_a_rejected_value():
    tested = {field for field, _ in BAD_VALUES}
    assert tested == set(LowRankSparseConfig._fields())


def test_defaults_and_accepted_forms():
    cfg = LowRankSparseConfig(
        target_modules=r".*\.mlp\..*", calibration_data="one text", tokenizer=lambda t: t, factor_dtype="bfloat16"
    )
    assert cfg.calibration_data == ["one text"]
    assert LowRankSparseConfig(calibration_data=[[1, 2, 3], [4, 5]]).calibration_data == [[1, 2, 3], [4, 5]]
    ids = torch.ones(2, 8, dtype=torch.long)
    assert LowRankSparseConfig(calibration_data=ids).calibration_data is ids
    assert LowRankSparseConfig().quant_method == "optimum_lrs"


def test_rpca_rank_cap_auto_follows_what_the_allocation_reads():
    """"auto" caps Stage 1 at the uniform rank where the allocation reads no more than that (uniform, CAP on
    refit candidates)."""
    from optimum_lrs.stage1.decompose import rpca_rank_cap

    # 576 x 576 at 50%: 0.2 * (165888 + 1) // (576 + 576) = 28 triplets, what `allocate_uniform` keeps.
    assert rpca_rank_cap(LowRankSparseConfig(), (576, 576), 0.5) == 28
    assert rpca_rank_cap(LowRankSparseConfig(allocation="cap"), (576, 576), 0.5) == 28
    assert rpca_rank_cap(LowRankSparseConfig(allocation="cap", cap_policy="candidate"), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(lowrank_fraction=0.01), (8, 8), 0.1) == 1  # never 0
    assert rpca_rank_cap(LowRankSparseConfig(allocation="global_greedy"), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(allocation="cap", cap_candidates="rpca"), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(sparse_selection="allocation"), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(rpca_max_rank=None), (576, 576), 0.5) is None
    assert rpca_rank_cap(LowRankSparseConfig(rpca_max_rank=7, allocation="global_greedy"), (576, 576), 0.5) == 7


def test_round_trip_is_exact_and_strips_runtime_fields():
    cfg = LowRankSparseConfig(
        param_ratio=0.3, lowrank_fraction=0.25, sparse_values="rpca", target_modules=["q_proj", "v_proj"], modules_to_not_convert=["x"],
        rpca_lambda=0.02, rpca_max_iter=7, rpca_tol=1e-3, rpca_rho=1.7, calibration_data=["secret text"],
        tokenizer=lambda t: t, seed=3, factor_dtype="float16", activation_aware=True, sparse_selection="row", refine_iterations=2,
        cache_dir="/tmp/secret-cache", compressed_modules={"m.a": {"rank": 2, "nnz": 5, "rpca_iterations": 4, "rpca_residual": 1e-5}},
    )
    d = cfg.to_dict()
    assert "calibration_data" not in d and "tokenizer" not in d and "cache_dir" not in d
    assert "secret" not in cfg.to_json_string()
    again = LowRankSparseConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert again == cfg


def test_unknown_keys_rejected():
    d = LowRankSparseConfig().to_dict()
    d["param_ratoi"] = 0.4
    with pytest.raises(ValueError, match="param_ratoi"):
        LowRankSparseConfig.from_dict(d)
    with pytest.raises(TypeError):
        LowRankSparseConfig.from_dict([("param_ratio", 0.5)])


def test_config_json_round_trip(tmp_path, dense_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = LowRankSparseConfig(param_ratio=0.6, rpca_max_iter=30, calibration_data=["not saved, " * 3000],
                              calibration_num_samples=4)
    model = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "optimum_lrs"
    saved = raw["quantization_config"]
    assert "calibration_data" not in saved
    assert LowRankSparseConfig.from_dict(saved).to_dict() == model.config.quantization_config.to_dict()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == raw["lrs_base_model_type"]
    assert LowRankSparseConfig.from_dict(loaded.quantization_config).compressed_modules == saved["compressed_modules"]


def test_a_newly_registered_allocator_is_accepted_by_the_config():
    from optimum_lrs.allocation import ALLOCATORS, register_allocator
    from optimum_lrs.allocation.uniform import allocate_uniform

    register_allocator("uniform_again")(allocate_uniform)
    try:
        assert LowRankSparseConfig(allocation="uniform_again").allocation == "uniform_again"
        assert not LowRankSparseConfig(allocation="uniform_again", activation_aware=False).needs_calibration
    finally:
        del ALLOCATORS["uniform_again"]
    with pytest.raises(ValueError, match="registered methods"):
        LowRankSparseConfig(allocation="uniform_again")
