"""The bitmask kernels as torch operators (`torch.ops.optimum_lrs.*`), so that `torch.compile` traces a
compressed model in one graph.

Dynamo cannot trace a ctypes call: without these operators every compressed layer splits the compiled graph in
two (and `fullgraph=True` fails). Each operator has a fake implementation (the output's shape and dtype) for
tracing; `bitmask_matmul` also has its gradient for the input, for LoRA training under compile. In eager mode the
layers call the kernels directly where no gradient is needed, as an operator's dispatch costs about 15 us per
call, which decoding would pay once per layer per token (docs/design.md, "Forward").
"""

from __future__ import annotations

import torch

from . import kernels


@torch.library.custom_op("optimum_lrs::lowrank_bitmask_linear", mutates_args=(), device_types="cpu")
def _lowrank_bitmask_linear_op(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor,
                               bias: torch.Tensor | None, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _lowrank_bitmask_linear(x, lowrank_u, lowrank_v, bias, mask, values)


@_lowrank_bitmask_linear_op.register_fake
def _(x, lowrank_u, lowrank_v, bias, mask, values):
    return x.new_empty(x.shape[0], lowrank_u.shape[0], dtype=torch.float32)


def _lowrank_bitmask_linear(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor,
                            bias: torch.Tensor | None, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if 1 <= x.shape[0] <= kernels.few_tokens():
        return kernels.lowrank_bitmask_few(x, lowrank_u, lowrank_v, bias, mask, values)
    return kernels.lowrank_bitmask_matmul(x, lowrank_u, lowrank_v, bias, mask, values)


def lowrank_bitmask_linear(x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor,
                           bias: torch.Tensor | None, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (T, n) (U V + S)^T + bias in float32, no gradient: up to `kernels.few_tokens()` rows (decoding) in one
    fused call, more rows in one tiled call. The registered operator while torch.compile traces, the kernels
    directly otherwise."""
    if torch.compiler.is_compiling():
        return _lowrank_bitmask_linear_op(x, lowrank_u, lowrank_v, bias, mask, values)
    return _lowrank_bitmask_linear(x, lowrank_u, lowrank_v, bias, mask, values)


@torch.library.custom_op("optimum_lrs::quantized_bitmask_linear", mutates_args=(), device_types="cpu")
def _quantized_bitmask_linear_op(x: torch.Tensor, u_codes: torch.Tensor, u_scales: torch.Tensor, v_codes: torch.Tensor,
                                 v_scales: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                                 s_codes: torch.Tensor, s_scales: torch.Tensor, nnz: int, bits: int,
                                 group_size: int) -> torch.Tensor:
    return kernels.quantized_bitmask_few(x, (u_codes, u_scales), (v_codes, v_scales), bias, mask, (s_codes, s_scales),
                                         nnz, bits, group_size)


@_quantized_bitmask_linear_op.register_fake
def _(x, u_codes, u_scales, v_codes, v_scales, bias, mask, s_codes, s_scales, nnz, bits, group_size):
    return x.new_empty(x.shape[0], mask.shape[0], dtype=torch.float32)


def quantized_bitmask_linear(x: torch.Tensor, u: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor],
                             bias: torch.Tensor | None, mask: torch.Tensor, values: tuple[torch.Tensor, torch.Tensor],
                             nnz: int, bits: int, group_size: int) -> torch.Tensor:
    """`kernels.quantized_bitmask_few` (x (U V + S)^T + bias from the factors' codes, up to `kernels.few_tokens()`
    rows): the registered operator while torch.compile traces, the kernel directly otherwise."""
    if torch.compiler.is_compiling():
        return _quantized_bitmask_linear_op(x, *u, *v, bias, mask, *values, nnz, bits, group_size)
    return kernels.quantized_bitmask_few(x, u, v, bias, mask, values, nnz, bits, group_size)


@torch.library.custom_op("optimum_lrs::bitmask_matmul", mutates_args=(), device_types="cpu")
def bitmask_matmul(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (T, n) S^T in float32 for a frozen bitmask-coded S: differentiable in x only (the training path)."""
    out = torch.zeros(x.shape[0], mask.shape[0], dtype=torch.float32)
    return kernels.bitmask_addmm_(out, x, mask, values)


@bitmask_matmul.register_fake
def _(x, mask, values):
    return x.new_empty(x.shape[0], mask.shape[0], dtype=torch.float32)


@torch.library.custom_op("optimum_lrs::bitmask_matmul_t", mutates_args=(), device_types="cpu")
def _bitmask_matmul_t(grad: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    out = torch.zeros(grad.shape[0], cols, dtype=torch.float32)
    return kernels.bitmask_addmm_t_(out, grad, mask, values)


@_bitmask_matmul_t.register_fake
def _(grad, mask, values, cols):
    return grad.new_empty(grad.shape[0], cols, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, mask, values = inputs
    ctx.save_for_backward(mask, values)
    ctx.cols, ctx.input_dtype = x.shape[1], x.dtype


def _backward(ctx, grad):
    mask, values = ctx.saved_tensors
    return _bitmask_matmul_t(grad.contiguous(), mask, values, ctx.cols).to(ctx.input_dtype), None, None


bitmask_matmul.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("optimum_lrs::bitmask_to_dense", mutates_args=(), device_types="cpu")
def _bitmask_to_dense_op(mask: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    return kernels.bitmask_to_dense(mask, values, cols)


@_bitmask_to_dense_op.register_fake
def _(mask, values, cols):
    return mask.new_empty(mask.shape[0], cols, dtype=torch.float32)


def bitmask_to_dense(mask: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    """S as a dense float32 (rows, cols) tensor (the registered operator while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return _bitmask_to_dense_op(mask, values, cols)
    return kernels.bitmask_to_dense(mask, values, cols)
