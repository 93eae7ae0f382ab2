"""torch.compile on compressed models: the bitmask kernels as operators that dynamo traces (optimum_lrs/nn/ops.py),
one graph for the forward (`fullgraph=True`), for `generate`'s own compilation and for the training path."""

import pytest
import torch
from transformers import CompileConfig

from optimum_lrs import LowRankSparseConfig, LowRankSparseLinear, compress_
from optimum_lrs.nn import kernel_library, kernels, ops
from optimum_lrs.nn.storage import pack_bits

from .conftest import tiny_llama

pytestmark = pytest.mark.skipif(kernel_library.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def compressed():
    windows = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=windows))
    assert {m.sparse_format for m in model.modules() if isinstance(m, LowRankSparseLinear)} == {"bitmask"}
    return model


def _operands(rows=20, cols=37, rank=3, dtype=torch.float32, tokens=11):
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(rows, cols, generator=g) < 0.4
    s = (torch.randn(rows, cols, generator=g) * keep).to(dtype)
    u, v = torch.randn(rows, rank, generator=g).to(dtype), torch.randn(rank, cols, generator=g).to(dtype)
    return torch.randn(tokens, cols, generator=g), u, v, torch.randn(rows, generator=g), pack_bits(keep), s[keep]


@pytest.mark.parametrize("tokens", [1, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_operators_pass_torch_library_opcheck(tokens, dtype):
    """Schema, fake implementation against the real one, and autograd registration, as torch.library checks them."""
    x, u, v, bias, mask, values = _operands(dtype=dtype, tokens=tokens)
    torch.library.opcheck(ops._lowrank_bitmask_linear_op, (x, u, v, bias, mask, values))
    torch.library.opcheck(ops._lowrank_bitmask_linear_op, (x, u, v, None, mask, values))
    torch.library.opcheck(ops.bitmask_matmul, (x.clone().requires_grad_(), mask, values))
    torch.library.opcheck(ops._bitmask_to_dense_op, (mask, values, 37))


def test_compiled_forward_is_one_graph_and_matches_eager(compressed, input_ids):
    torch._dynamo.reset()
    with torch.no_grad():
        eager = compressed(input_ids).logits
        compiled = torch.compile(compressed, fullgraph=True)(input_ids).logits  # a graph break would raise
        one_token = torch.compile(compressed, fullgraph=True)(input_ids[:, :1]).logits  # the fused decoding path
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_token, compressed(input_ids[:, :1]).logits, rtol=1e-5, atol=1e-5)


def test_generate_compiles_itself_with_a_static_cache_and_gives_the_eager_tokens(compressed, input_ids):
    """transformers compiles the forward inside `generate` only where the quantizer says it can (`is_compileable`)."""
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "cache_implementation": "static"}
    eager = compressed.generate(input_ids, disable_compile=True, **settings)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compressed.generate(input_ids, compile_config=config, **settings)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "generate did not compile"
    assert torch.equal(compiled, eager)


def test_training_path_compiles_with_the_input_gradient():
    """Under autograd the layer runs x S^T by the `bitmask_matmul` operator, whose gradient is registered."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(20, 37, generator=g) * (torch.rand(20, 37, generator=g) < 0.4)
    layer = LowRankSparseLinear.from_factors(torch.randn(20, 3, generator=g), torch.randn(3, 37, generator=g), s,
                                             torch.randn(20, generator=g)).with_sparse_format("bitmask")
    x = torch.randn(13, 37, generator=g)
    grads = []
    for run in (layer, torch.compile(layer, fullgraph=True)):
        inputs = x.clone().requires_grad_()
        run(inputs).square().sum().backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    expected = 2 * (x @ layer.dense_weight().t() + layer.bias) @ layer.dense_weight()
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-3)
