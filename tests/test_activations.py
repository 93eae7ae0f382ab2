"""Activation statistics for activation-aware Stage 1."""

import pytest
import torch

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.stage1.activations import InputStatistics, input_rms
from optimum_lrs.targets import find_target_modules

from .conftest import tiny_llama, tiny_qwen2


def test_rms_matches_a_direct_computation_and_skips_the_lm_head():
    """The pass runs the decoder without the LM head (memory) and must still see every target's inputs."""
    for build in (tiny_llama, tiny_qwen2):
        model = build()
        targets = find_target_modules(model, LowRankSparseConfig())
        windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
        inputs = {name: [] for name in targets}
        handles = [m.register_forward_pre_hook(lambda _m, a, n=name, store=inputs: store[n].append(a[0].reshape(-1, a[0].shape[-1])))
                   for name, m in targets.items()]
        with torch.no_grad():
            model(windows)
        for h in handles:
            h.remove()
        head_calls = []
        model.lm_head.register_forward_pre_hook(lambda *_, calls=head_calls: calls.append(1))
        scales = input_rms(model, targets, windows, batch_size=4)
        assert not head_calls
        for name in targets:
            direct = torch.cat(inputs[name]).double().square().mean(0).sqrt().float()
            assert torch.allclose(scales[name], direct.clamp_min(1e-3 * direct.mean()), rtol=1e-4), name


def test_second_moments_alone_equal_those_kept_beside_the_rms():
    """`rms=False` (the fitted codes' statistics) skips the squares, not a bit of the second moments."""
    model = tiny_llama()
    targets = find_target_modules(model, LowRankSparseConfig())
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    moments = []
    for rms in (True, False):
        with torch.no_grad(), InputStatistics(targets, True, sink_weighted=frozenset(list(targets)[:3]), rms=rms) as stats:
            model(windows)
        moments.append(stats.second_moments())
    assert all(torch.equal(moments[0][name], moments[1][name]) for name in targets)
    with pytest.raises(RuntimeError, match="rms=False"):
        stats.scales()
