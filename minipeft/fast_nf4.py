"""The speed seam's 4-bit layers under torch.compile (fast.compile_blocks installs _nf4_forward on each one): how
a QLoRA Block compiles without keeping a dense weight. Part of fast.py's seam, in a file of its own for its
length; tests/test_fast.py checks it against the reference (nf4.NF4LinearFunction, dequantize_nf4)."""

import dataclasses
import functools

import torch


def _nf4_forward(layer, x):
    """Eager: the plain NF4 forward (nf4.NF4LinearFunction). While torch.compile traces, one of two forms:
    - by default y = x W^T + b with W from a checkpointed region that holds only the dequantization. Traced as
      NF4LinearFunction is, the compiler merges the backward's dequantization with the forward's and keeps the
      dense W for backward; ops in a checkpointed region are recomputed in backward instead, so W is rebuilt from
      the 4-bit tensors there, and the matmul stays outside it, saved and differentiated as any linear's.
    - in a checkpointed Block (memory first), nf4_matmul: one op the compiler cannot see into, so exactly one
      dense W is alive at a time (the compiler rebuilt the three MLP weights of a Block's backward together:
      3 x 86 MiB at the 7B shape, most of a QLoRA step's peak above the weights)."""
    if not torch.compiler.is_compiling():
        return type(layer).forward(layer, x)
    from .nf4 import _TENSOR_FIELDS, _dequantize

    q = layer.qweight
    tensors = [getattr(q, f) for f in _TENSOR_FIELDS]
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if layer.__dict__.get("_fast_checkpointed"):  # (set by checkpoint_blocks)
        if torch.is_autocast_enabled(x.device.type):  # autocast's cast for a linear, by hand (the op has none)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = nf4_matmul(x, *tensors, *q.shape, q.blocksize, q.nested_blocksize, False)
        return y if bias is None else y + bias.to(x.dtype)

    def dequantize(*tensors):
        return _dequantize(dataclasses.replace(q, **dict(zip(_TENSOR_FIELDS, tensors))), x.dtype)

    w = torch.utils.checkpoint.checkpoint(dequantize, *tensors, use_reentrant=False)
    return torch.nn.functional.linear(x, w, bias)


# The op is defined with torch.library.Library rather than torch.library.custom_op: both give the compiler an op it
# cannot see into, but custom_op's Python dispatch layers cost the host ~25 us more per call (on an H200's host, at
# the 7B MLP's shape: 65 against 90 us, benchmarks/nf4_op_host.py), and a 7B QLoRA step calls it ~670 times with
# the GPU waiting on the host (7B, 4k tokens: 0.81 -> 0.98x Unsloth's speed). Its gradient comes from _NF4Matmul below
# (an autograd.Function, which the compiler traces into a call of the op in the backward graph).
_LIB = torch.library.Library("minipeft", "DEF")
_LIB.define(
    "nf4_matmul(Tensor x, Tensor packed, Tensor absmax, Tensor? offset, Tensor? nested_absmax, Tensor? nested_code,"
    " int out_features, int in_features, int blocksize, int nested_blocksize, bool transposed) -> Tensor"
)


def _nf4_matmul_impl(x, packed, absmax, offset, nested_absmax, nested_code, out_features, in_features, blocksize,
                     nested_blocksize, transposed):  # fmt: skip
    """x W^T ((..., in) -> (..., out)), or x W with transposed=True ((..., out) -> (..., in): the input's
    gradient), W (out, in) dequantized from its 4-bit tensors inside the op, in x's dtype, and dropped after."""
    w = _dequantizer(x.device)(packed, absmax, offset, nested_absmax, nested_code, (out_features, in_features),
                               blocksize, nested_blocksize, x.dtype)  # fmt: skip
    return x @ w if transposed else torch.nn.functional.linear(x, w)


_LIB.impl("nf4_matmul", _nf4_matmul_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("minipeft::nf4_matmul", lib=_LIB)
def _(x, packed, absmax, offset, nested_absmax, nested_code, out_features, in_features, blocksize, nested, transposed):
    return x.new_empty(*x.shape[:-1], in_features if transposed else out_features)


class _NF4Matmul(torch.autograd.Function):
    """The op with its gradient: dL/dx = dL/dy W; nothing for the 4-bit tensors (frozen)."""

    @staticmethod
    def forward(ctx, x, *args):
        ctx.save_for_backward(*args[:5])
        ctx.meta = args[5:9]
        return torch.ops.minipeft.nf4_matmul(x, *args)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.minipeft.nf4_matmul(grad, *ctx.saved_tensors, *ctx.meta, True), *[None] * 10


def nf4_matmul(x, packed, absmax, offset, nested_absmax, nested_code, out_features, in_features, blocksize,
               nested_blocksize, transposed):  # fmt: skip
    """torch.ops.minipeft.nf4_matmul with its gradient for x (see _nf4_matmul_impl)."""
    return _NF4Matmul.apply(x, packed, absmax, offset, nested_absmax, nested_code, out_features, in_features,
                            blocksize, nested_blocksize, transposed)  # fmt: skip


def _dequantize_from(packed, absmax, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype):
    from .nf4 import NF4Weight, _dequantize

    q = NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize, offset, nested_absmax, nested_code,
                  nested_blocksize)  # fmt: skip
    return _dequantize(q, dtype)


def _dequantizer(device):
    """On a GPU with Triton, one kernel (_triton_dequantize: no float32 temporaries as large as W, which the plain
    formulation makes eagerly); otherwise the plain formulation. (torch.compile of the plain one, called inside
    the op, made kernels for dynamic shapes once a second weight shape came: 6x slower than this kernel.)"""
    if device.type == "cuda" and _triton_kernel() is not None:
        return _triton_dequantize
    return _dequantize_from


def _triton_dequantize(packed, absmax, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype):
    """dequantize_nf4 bit for bit in one kernel launch (the op runs ~700 times in a 7B step: a host that launched
    the block scales' few small kernels too was slower than the GPU). Each byte -> its two code values times its
    block's float32 scale, rounded once to dtype; double quantization's scale, nested_code[absmax] *
    nested_absmax + offset, rounded after the product and after the sum as _block_absmax (no fused multiply-add)."""
    import triton

    from .nf4 import NF4_CODE

    out = torch.empty(shape, dtype=dtype, device=packed.device)
    code = _CODES.get(packed.device)
    if code is None:
        code = _CODES[packed.device] = NF4_CODE.to(packed.device, torch.float32)
    nested = offset is not None
    n_bytes, block = packed.numel(), 1024
    _triton_kernel()[(triton.cdiv(n_bytes, block),)](
        packed, absmax, *((nested_absmax, nested_code, offset) if nested else (absmax,) * 3), code, out, n_bytes,
        out.numel(), BLOCK=block, HALF_BLOCKSIZE=blocksize // 2, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


_CODES = {}  # device -> the 16 NF4 values there (a host copy per call would wait for the GPU)


@functools.cache
def _triton_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(packed, absmax, nested_absmax, nested_code, offset, code, out, n_bytes, n, BLOCK: tl.constexpr,
               HALF_BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):  # fmt: skip
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # BLOCK bytes -> 2 * BLOCK values
        mask = offs < n_bytes
        byte = tl.load(packed + offs, mask=mask, other=0).to(tl.int32)
        blk = offs // HALF_BLOCKSIZE  # a byte's two values are in one block (block sizes are even)
        if NESTED:  # absmax holds 8-bit codes of the scales, in blocks of NESTED_BLOCKSIZE
            c = tl.load(nested_code + tl.load(absmax + blk, mask=mask, other=0).to(tl.int32), mask=mask, other=0.0)
            scale = c * tl.load(nested_absmax + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0) + tl.load(offset)
        else:
            scale = tl.load(absmax + blk, mask=mask, other=0.0)
        hi, lo = tl.load(code + (byte >> 4)) * scale, tl.load(code + (byte & 15)) * scale  # float32, as bnb
        o = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + o, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=o < n)

    return kernel
