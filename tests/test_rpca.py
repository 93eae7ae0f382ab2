import pytest
import torch

from optimum_lrs import robust_pca
from optimum_lrs.rpca import default_lambda


def planted(m: int, n: int, rank: int, density: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    sparse = torch.zeros(m * n)
    idx = torch.randperm(m * n, generator=g)[: int(density * m * n)]
    sparse[idx] = 10 * torch.randn(idx.numel(), generator=g)
    return low, sparse.view(m, n)


@pytest.mark.parametrize(("m", "n"), [(120, 90), (90, 120)])
def test_recovers_planted_low_rank_plus_sparse(m, n):
    low, sparse = planted(m, n, rank=4, density=0.05)
    res = robust_pca(low + sparse, tol=1e-6, max_iter=200)
    assert res.converged and res.residual < 1e-6
    assert res.rank == 4
    assert torch.linalg.matrix_norm(res.low_rank - low) / torch.linalg.matrix_norm(low) < 1e-4
    assert torch.linalg.matrix_norm(res.sparse - sparse) / torch.linalg.matrix_norm(sparse) < 1e-4
    support = sparse != 0
    assert torch.equal(res.sparse.abs() > 1e-3, support)


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
