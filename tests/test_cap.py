"""CAP (loss-driven global allocation) on tiny models, and its exact budget projection."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrs import CapAllocation, compress_, LowRankSparseConfig, LowRankSparseLinear, RefitConfig, RPCAConfig
from optimum_lrs.allocation.cap import project_to_budget
from optimum_lrs.allocation.cap.candidates import CandidatePool, RowLevels
from optimum_lrs.allocation.cap.masked import MaskedLinear, NextTokenLoss
from optimum_lrs.allocation.cap.policy import Indexed, Prefix
from optimum_lrs.stage1.decompose import decompose

from .conftest import tiny_llama

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))


def cap_config(policy: str = "layer", steps: int = 6, **kw):
    allocation = CapAllocation(steps=steps, samples=4, batch_size=2, policy=policy)
    return LowRankSparseConfig(**{"param_ratio": 0.5, "calibration_data": CALIB, **kw}, allocation=allocation)


def compressed_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}


def compressed_params(model):
    return {n: m.num_parameters for n, m in compressed_layers(model).items()}


@pytest.mark.parametrize("policy", ["layer", "candidate"])
def test_cap_meets_budget_and_is_deterministic(policy):
    a, b = compress_(tiny_llama(), cap_config(policy)), compress_(tiny_llama(), cap_config(policy))
    kept = compressed_params(a)
    dense = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if n in kept)
    assert abs(sum(kept.values()) - 0.5 * dense) <= 1e-3 * 0.5 * dense
    assert kept == compressed_params(b)
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.quantization_config.compressed.modules == b.config.quantization_config.compressed.modules


def markov_tokens(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """Text from a fixed first-order Markov chain: each token has 4 successors (probabilities .6 .25 .1 .05).
    The next token depends on the current one only, so a model needs its MLPs, not attention."""
    successors = torch.randint(0, 256, (256, 4), generator=torch.Generator().manual_seed(123))
    probs, g = torch.tensor([0.6, 0.25, 0.1, 0.05]), torch.Generator().manual_seed(seed)
    out = torch.empty(rows, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(0, 256, (rows,), generator=g)
    for t in range(1, seq_len):
        out[:, t] = successors[out[:, t - 1], torch.multinomial(probs, rows, replacement=True, generator=g)]
    return out


@pytest.fixture(scope="module")
def trained_llama_state():
    """tiny_llama trained on the Markov text (loss 5.5 -> about 1.15, the chain's entropy is about 1.0):
    a random model's loss does not prefer its own weights, so it cannot tell a good allocation from a bad one."""
    model = tiny_llama().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        tokens = markov_tokens(16, 32, step)
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.4
    return model.state_dict()


@pytest.mark.parametrize("sparse_values", ["residual", "rpca"])
def test_cap_moves_budget_to_the_layers_the_loss_depends_on(trained_llama_state, sparse_values):
    """On a model that has learned a Markov chain, CAP's allocation has a lower held-out loss than uniform and
    gives the MLPs (which carry the chain) more than the attention projections (which it does not need).
    Zero steps are exactly uniform, so both checks fail if the allocation ignores the loss."""

    def trained():
        model = tiny_llama()
        model.load_state_dict(trained_llama_state)
        return model.eval()

    kw = dict(param_ratio=0.3, refit=RefitConfig(values=sparse_values), calibration_data=markov_tokens(16, 32, 10_000))
    uniform = compress_(trained(), LowRankSparseConfig(**kw))
    cap = compress_(trained(), LowRankSparseConfig(**kw, allocation=CapAllocation(steps=16, samples=8, batch_size=4, lr=0.05)))
    held_out = markov_tokens(32, 32, 20_000)
    with torch.no_grad():
        loss_uniform, loss_cap = (m(held_out, labels=held_out).loss.item() for m in (uniform, cap))
    assert loss_cap < loss_uniform - 0.03, (loss_cap, loss_uniform)
    dense = {n: m.weight.numel() for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    shares = {n: kept / dense[n] for n, kept in compressed_params(cap).items()}
    mlp = [v for n, v in shares.items() if ".mlp." in n]
    attention = [v for n, v in shares.items() if ".self_attn." in n]
    assert sum(mlp) / len(mlp) > sum(attention) / len(attention) + 0.05, shares


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    costs=st.lists(st.integers(1, 50), min_size=5, max_size=5),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_projection_onto_budget_is_exact(sizes, costs, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(n, generator=g) * 2 for n in sizes]
    c = [float(x) for x in costs[: len(sizes)]]
    total = sum(ci * t.numel() for t, ci in zip(z, c))
    if total == 0:
        return
    budget = fraction * total
    original = [t.clone() for t in z]
    nu = project_to_budget(z, c, budget)
    spent = sum(ci * t.sum().item() for t, ci in zip(z, c))
    assert spent == pytest.approx(budget, abs=1e-4 * total + 1e-6)
    for t, o, ci in zip(z, original, c):
        assert torch.all((t >= 0) & (t <= 1))
        assert torch.allclose(t, (o - nu * ci).clamp(0, 1), atol=1e-6)


def test_projection_rejects_impossible_budget():
    with pytest.raises(ValueError, match="outside"):
        project_to_budget([torch.zeros(3)], [2.0], 7.0)


def _counts(model):
    return {n: (e["rank"], e["nnz"]) for n, e in model.config.quantization_config.compressed.modules.items()}


def test_the_layer_policy_with_no_steps_is_the_uniform_allocation():
    """The layer policy's starting point is exactly the uniform allocation, rank/sparse split included: whatever
    CAP changes is the policy gradient's doing. It splits the same number of refits between its candidates and
    the final layers, so each layer's error is uniform's (one exact SVD fit in between can only lower it);
    started over from Stage 1 instead of from the candidates, its last 5 refits would be far worse."""
    # the refits then fit W itself; both from the same (uncapped) Stage 1: "auto" caps each at its own uniform rank
    kw = dict(param_ratio=0.5, calibration_data=CALIB, activation_aware=False, rpca=RPCAConfig(max_rank=None))
    uniform = compress_(tiny_llama(), LowRankSparseConfig(**kw))
    cap = compress_(tiny_llama(), cap_config(steps=0, **kw, refit=RefitConfig(block_matching_steps=0)))
    assert _counts(cap) == _counts(uniform)
    dense = tiny_llama()
    for name, u in compressed_layers(uniform).items():
        w, c = dense.get_submodule(name).weight, cap.get_submodule(name)
        error_uniform, error_cap = (torch.linalg.matrix_norm(w - m.dense_weight()).item() for m in (u, c))
        assert error_cap <= error_uniform * (1 + 1e-3) + 1e-7, name


def test_a_search_that_ends_at_the_uniform_allocation_says_so(caplog):
    """Steps too small to move any count leave CAP's allocation uniform: a WARNING names it with the losses; a
    search that moves logs nothing of the kind, nor does `steps=0` (asked for)."""
    def run(**kw):
        caplog.clear()
        with caplog.at_level("WARNING", logger="optimum_lrs"):
            model = compress_(tiny_llama(), LowRankSparseConfig(
                param_ratio=0.5, calibration_data=CALIB, refit=RefitConfig(block_matching_steps=0),
                allocation=CapAllocation(samples=4, batch_size=2, **kw)))
        return model, [r.getMessage() for r in caplog.records if "ended at the uniform allocation" in r.getMessage()]

    stuck, warned = run(steps=2, lr=1e-9)
    uniform = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=CALIB,
                                                          refit=RefitConfig(block_matching_steps=0)))
    assert _counts(stuck) == _counts(uniform)
    assert len(warned) == 1 and warned[0].startswith("CAP's 2 steps ended at the uniform allocation (mean sampled loss")
    moved, warned = run(steps=6)
    assert _counts(moved) != _counts(uniform) and not warned
    assert not run(steps=0)[1]


@pytest.mark.parametrize("steps", [0, 2])
def test_the_candidate_policys_global_ranking_meets_the_budget(steps):
    """From its magnitude start (steps=0) and after policy-gradient steps, the one global ranking by keep
    probability fills the budget."""
    model = compress_(tiny_llama(), cap_config("candidate", steps))
    kept = compressed_params(model)
    dense = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if n in kept)
    assert abs(sum(kept.values()) - 0.5 * dense) <= 1e-3 * 0.5 * dense


@pytest.mark.parametrize("residual_values", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_prefix_masks_build_the_same_weight_as_indexed_masks(residual_values, scaled):
    """The count policies' fast path (a comparison with a dense order map) against the indexed one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16, bias=False)
    c = decompose("layer", linear, LowRankSparseConfig(), torch.rand(24) + 0.5 if scaled else None)
    indexed, prefix = CandidatePool(c), CandidatePool(c)
    rank, nnz = 3, indexed.positions.numel() // 2
    assert nnz > 10
    prefix.use_prefixes()
    expected = MaskedLinear(linear, indexed, residual_values).indexed_weight(Indexed(torch.arange(rank), indexed.positions[:nnz]))
    assert torch.allclose(MaskedLinear(linear, prefix, residual_values).prefix_weight(Prefix(rank, nnz)), expected, atol=1e-6)


@pytest.mark.parametrize("scaled", [False, True])
def test_row_levels_keep_every_prefix_of_the_per_row_order(scaled):
    """The 2-byte level map against the order written out: level j = every row's (j+1)-th largest |R|, levels in
    turn, within a level the rows by that value (ties by row), for every prefix length."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 12, 20
    weight, u, v = torch.randn(rows, cols, generator=g), torch.randn(rows, 3, generator=g), torch.randn(3, cols, generator=g)
    scale = torch.rand(cols, generator=g) + 0.5 if scaled else None
    magnitude = ((weight if scale is None else weight * scale) - u @ v).abs()
    values, idx = magnitude.sort(dim=1, descending=True)
    by_level = values.t().argsort(dim=1, descending=True, stable=True)  # level j: rows by their (j+1)-th value
    order = (idx + torch.arange(rows)[:, None] * cols).t().gather(1, by_level).flatten()
    levels = RowLevels.from_magnitude(magnitude, rows * cols, weight, scale, u, v)
    assert levels.level.dtype == torch.int16
    for nnz in range(rows * cols + 1):
        expected = torch.zeros(rows * cols, dtype=torch.bool)
        expected[order[:nnz]] = True
        assert torch.equal(levels.kept(nnz).flatten(), expected), nnz


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_chunked_loss_is_the_mean_next_token_cross_entropy(architecture):
    """Llama's head is a plain linear map of the last hidden state: chunked through the head. Gemma 2 soft-caps
    its logits: the check must see that and fall back to the model's own logits."""
    if architecture == "llama":
        model = tiny_llama()
    else:
        config = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)
        model = Gemma2ForCausalLM(config).eval()
    batch = CALIB[:2]
    with torch.no_grad():
        logits = model(batch).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = NextTokenLoss(model, batch[:1, :8], chunk_floats=5 * model.config.vocab_size)
        assert loss.chunk == 5 and (loss.split is not None) == (architecture == "llama")
        assert loss(batch) == pytest.approx(expected.item(), rel=1e-5)
