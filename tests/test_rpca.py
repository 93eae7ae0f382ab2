import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrs import robust_pca
from optimum_lrs.stage1.rpca import alternating_refit, best_low_rank, default_lambda, largest_entries, top_triplets


def planted(m: int, n: int, rank: int, density: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    sparse = torch.zeros(m * n)
    idx = torch.randperm(m * n, generator=g)[: int(density * m * n)]
    sparse[idx] = 10 * torch.randn(idx.numel(), generator=g)
    return low, sparse.view(m, n)


@pytest.mark.parametrize("solver", ["gram", "svd"])
@pytest.mark.parametrize(("m", "n"), [(120, 90), (90, 120)])
def test_recovers_planted_low_rank_plus_sparse(m, n, solver):
    low, sparse = planted(m, n, rank=4, density=0.05)
    res = robust_pca(low + sparse, tol=1e-6, max_iter=200, solver=solver)
    assert res.converged and res.residual < 1e-6
    assert res.rank == 4
    assert torch.linalg.matrix_norm(res.low_rank - low) / torch.linalg.matrix_norm(low) < 1e-4
    assert torch.linalg.matrix_norm(res.sparse - sparse) / torch.linalg.matrix_norm(sparse) < 1e-4
    support = sparse != 0
    assert torch.equal(res.sparse.abs() > 1e-3, support)


def weight_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A trained-weight-like matrix: power-law spectrum over four decades plus a few large outliers."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    left, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    right, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    w = (left * torch.logspace(0, -4, k)) @ right.t()
    outliers = torch.randperm(m * n, generator=g)[: m * n // 200]
    w.view(-1)[outliers] += 0.05 * torch.randn(outliers.numel(), generator=g)
    return w


@pytest.mark.parametrize(("m", "n"), [(192, 64), (64, 192), (96, 96)])
def test_gram_solver_follows_the_svd_solver(m, n):
    """The fast path (eigendecomposition of the Gram matrix) must give the exact solver's split."""
    w = weight_like(m, n)
    exact = robust_pca(w, solver="svd")
    fast = robust_pca(w, solver="gram")
    assert exact.converged and fast.converged
    # Squaring in the Gram matrix blurs singular values below ~sqrt(eps) sigma_max: with four decades of
    # spectrum a few tiny triplets near the threshold come and go, nothing else moves.
    assert abs(fast.iterations - exact.iterations) <= 1
    def significant(res):
        return int((res.s > 1e-3 * exact.s[0]).sum())

    assert significant(fast) == significant(exact) > 5
    scale = torch.linalg.matrix_norm(w)
    assert torch.linalg.matrix_norm(fast.low_rank - exact.low_rank) / scale < 5e-4
    assert torch.linalg.matrix_norm(fast.sparse - exact.sparse) / scale < 5e-4
    top = significant(exact)
    assert torch.allclose(fast.s[:top], exact.s[:top], rtol=1e-2, atol=1e-4 * exact.s[0].item())
    # The significant triplets are orthonormal singular vectors, not only a product that reconstructs L.
    u, vh, eye = fast.u[:, :top], fast.vh[:top], torch.eye(top)
    assert torch.allclose(u.t() @ u, eye, atol=1e-3) and torch.allclose(vh @ vh.t(), eye, atol=1e-3)


@pytest.mark.parametrize("solver", ["gram", "svd"])
@pytest.mark.parametrize("max_rank", [4, 9])
def test_capped_rpca_recovers_planted_low_rank_plus_sparse(max_rank, solver):
    """The truncated SVT (top triplets by warm subspace iteration, far below min(m, n) / 4) must find the exact
    solver's split wherever the true rank fits under the cap."""
    low, sparse = planted(240, 180, rank=4, density=0.05)
    exact = robust_pca(low + sparse, tol=1e-6, max_iter=200, solver=solver)
    capped = robust_pca(low + sparse, tol=1e-6, max_iter=200, solver=solver, max_rank=max_rank)
    assert capped.converged and capped.residual < 1e-6 and capped.rank == 4
    assert abs(capped.iterations - exact.iterations) <= 1
    for res in (capped, exact):
        assert torch.linalg.matrix_norm(res.low_rank - low) / torch.linalg.matrix_norm(low) < 1e-4
        assert torch.linalg.matrix_norm(res.sparse - sparse) / torch.linalg.matrix_norm(sparse) < 1e-4
    assert torch.allclose(capped.s, exact.s, rtol=1e-4)
    eye = torch.eye(4)
    assert torch.allclose(capped.u.t() @ capped.u, eye, atol=1e-4) and torch.allclose(capped.vh @ capped.vh.t(), eye, atol=1e-4)


def test_cap_below_the_rank_keeps_the_split_exact():
    """A cap under W's rank is a different decomposition, not a lossy one: L has at most `max_rank` triplets,
    the top ones of L's own SVD, and S takes the rest so that W = L + S to the tolerance."""
    w = weight_like(200, 160, seed=3)
    res = robust_pca(w, tol=1e-3, max_rank=6)
    assert res.converged and res.residual < 1e-3 and 1 <= res.rank <= 6
    recon = res.low_rank + res.sparse
    assert (torch.linalg.matrix_norm(w - recon) / torch.linalg.matrix_norm(w)).item() == pytest.approx(res.residual, rel=1e-3)
    assert torch.allclose(torch.linalg.svdvals(res.low_rank)[: res.rank], res.s, rtol=1e-3)
    with pytest.raises(ValueError, match="max_rank must be None or >= 1"):
        robust_pca(w, max_rank=0)


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        robust_pca(torch.ones(3, 3), solver="qr")


def test_residual_below_tol_and_factorisation_consistent():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    res = robust_pca(w, tol=1e-4)
    assert res.converged and res.residual < 1e-4
    recon = res.low_rank + res.sparse
    assert (torch.linalg.matrix_norm(w - recon) / torch.linalg.matrix_norm(w)).item() == pytest.approx(res.residual, rel=1e-3)
    assert torch.all(res.s[:-1] >= res.s[1:])


def test_unconverged_run_says_so():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    res = robust_pca(w, max_iter=2, tol=1e-8)
    assert res.iterations == 2 and not res.converged and res.residual > 1e-8


def test_lambda_default_and_edge_inputs():
    assert default_lambda((100, 400)) == pytest.approx(0.05)
    zero = robust_pca(torch.zeros(5, 7))
    assert zero.rank == 0 and zero.converged and zero.sparse.shape == (5, 7)
    with pytest.raises(ValueError, match="NaN or infinite"):
        robust_pca(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        robust_pca(torch.ones(3))


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), frac=st.floats(0, 1), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_largest_entries_counts_exactly(rows, cols, frac, seed):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    count = round(frac * rows * cols)
    for per_row in (False, True):
        pos = largest_entries(m, count, per_row)
        assert pos.numel() == count and pos.unique().numel() == count
    per_row_counts = torch.bincount(largest_entries(m, count, True) // cols, minlength=rows)
    assert per_row_counts.max() - per_row_counts.min() <= 1
    flat = m.abs().flatten()
    chosen = largest_entries(m, count, False)
    if 0 < count < flat.numel():
        rest = torch.ones_like(flat, dtype=torch.bool)
        rest[chosen] = False
        assert flat[chosen].min() >= flat[rest].max()


@pytest.mark.parametrize("per_row", [False, True])
def test_largest_entries_with_ties_counts_exactly(per_row):
    """Zero columns (dead input features) and repeated values tie at the threshold; counts stay exact."""
    m = torch.randint(-2, 3, (30, 17), generator=torch.Generator().manual_seed(0)).float()
    m[:, 3] = 0
    for count in (0, 1, 29, 30, 31, 250, 30 * 17):
        pos = largest_entries(m, count, per_row)
        assert pos.numel() == pos.unique().numel() == count
        rest = torch.ones(m.numel(), dtype=torch.bool)
        rest[pos] = False
        if per_row:
            per = torch.bincount(pos // 17, minlength=30)
            assert per.max() - per.min() <= 1
        elif 0 < count < m.numel():
            assert m.abs().flatten()[pos].min() >= m.abs().flatten()[rest].max()


def test_alternating_refit_never_increases_the_error():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(40, 30, generator=g) @ torch.randn(30, 30, generator=g) / 5
    target[torch.rand(40, 30, generator=g) < 0.05] += 8.0
    u0, v0 = torch.randn(40, 3, generator=g), torch.randn(3, 30, generator=g)

    def error(u, v, pos):
        s = torch.zeros(40 * 30)
        s[pos] = (target - u @ v).flatten()[pos]
        return torch.linalg.matrix_norm(target - u @ v - s.view(40, 30)).item()

    for per_row in (False, True):
        for solver in ("svd", "gram"):
            errors = [error(*alternating_refit(target, u0, v0, 120, it, per_row, solver)) for it in range(4)]
            assert all(b <= a + 1e-4 for a, b in zip(errors, errors[1:])), errors
            assert errors[-1] < 0.8 * errors[0]


@pytest.mark.parametrize(("m", "n", "rank"), [(200, 120, 5), (120, 200, 20), (96, 96, 40), (64, 64, 0)])
def test_fast_best_low_rank_is_as_good_as_the_svd(m, n, rank):
    """The subspace-iteration path (small ranks) and the Gram path (large ones) against a full SVD."""
    w = weight_like(m, n, seed=rank)
    exact_u, exact_v = best_low_rank(w, rank, solver="svd")
    best = torch.linalg.matrix_norm(w - exact_u @ exact_v)
    # Cold start and warm start from a perturbed optimum.
    warm = exact_v + 0.1 * torch.randn(exact_v.shape, generator=torch.Generator().manual_seed(1))
    for start in (None, warm):
        u, v = best_low_rank(w, rank, warm=start, solver="gram")
        assert u.shape == (m, rank) and v.shape == (rank, n)
        assert torch.linalg.matrix_norm(w - u @ v) <= best * (1 + 1e-3) + 1e-6


@pytest.mark.parametrize(("m", "n", "rank", "warm_rows"), [(200, 120, 12, 12), (120, 200, 20, 8), (96, 96, 20, 0)])
def test_top_triplets_match_the_svd(m, n, rank, warm_rows):
    """Subspace iteration with a Rayleigh-Ritz step from the float64 Gram (CAP's candidate triplets, warm from a
    lower-rank factor): orthonormal vectors, the SVD's singular values, and every prefix as good as the SVD's."""
    w = weight_like(m, n, seed=rank)
    eu, es, evh = torch.linalg.svd(w, full_matrices=False)
    warm = evh[:warm_rows] + 0.05 * torch.randn(warm_rows, n, generator=torch.Generator().manual_seed(2))
    u, s, vh = top_triplets(w, rank, warm=warm if warm_rows else None, power_steps=4)
    eye = torch.eye(rank)
    assert torch.allclose(u.t() @ u, eye, atol=1e-4) and torch.allclose(vh @ vh.t(), eye, atol=1e-4)
    assert torch.allclose(s, es[:rank], rtol=1e-3)
    assert torch.all(s[:-1] >= s[1:])
    for k in range(1, rank + 1):
        exact = torch.linalg.matrix_norm(w - (eu[:, :k] * es[:k]) @ evh[:k])
        assert torch.linalg.matrix_norm(w - (u[:, :k] * s[:k]) @ vh[:k]) <= exact * (1 + 1e-3) + 1e-6, k
