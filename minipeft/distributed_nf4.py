"""The 4-bit layers under FSDP2 (distributed.shard calls _shard_nf4 on each NF4Linear): how a QLoRA base's codes
and quantization state are sharded, gathered and read like parameters. Part of distributed.py's FSDP2, in a file of
its own for its length; tests/test_distributed.py checks it against one process (the QLoRA and QDoRA runs)."""

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .nf4 import _TENSOR_FIELDS, _dequantize, dequantize_nf4

# FSDP2 shards and all-gathers nn.Parameters only, while NF4Linear keeps its 4-bit tensors (packed codes, absmax,
# double quantization's offset, nested_absmax and nested_code) in a plain NF4Weight. So each becomes a frozen
# parameter of the layer, `qweight_<field>`: its bytes, flat, each byte held as a bfloat16 NUMBER (0 to 255, all
# exact in bf16). Not as uint8: torch before 2.13 makes every sharded parameter with requires_grad=True first, which
# a uint8 tensor refuses ("only Tensors of floating point dtype can require gradients": seen on torch 2.11 + CUDA);
# not as float32: the bf16 policy would round it; and not two bytes to a bf16 (the bits as they are): a pair of
# bytes can read as a NaN, and on CUDA such a NaN came back from FSDP2 as the one pattern a trip through float32
# makes (0x7FFF; which copy does it was not traced; seen on two H200s: about 1 in 2,000 code bytes and 1 in 300
# scale bytes changed, weights 5-11% off). A number 0..255 is finite and exact in bf16 and float32 alike, so no copy
# or cast can change it; the price is two bytes per byte while sharded. Each rank keeps 1/N of every one; inside its
# Block's forward and backward FSDP2 has gathered them whole, and the layer's forward (and dequantize, for DoRA)
# read them from there, as bytes again. qweight itself keeps only the shapes and dtypes (on the meta device): the
# 4-bit bytes live in the parameters alone.


def _shard_nf4(layer):
    q = layer.qweight
    for f in _nf4_fields(q):
        t = getattr(q, f).reshape(-1).view(torch.uint8).to(torch.bfloat16)  # (bytes,), each a number: see above
        layer.register_parameter(f"qweight_{f}", torch.nn.Parameter(t, requires_grad=False))
    layer.qweight = q.to("meta")
    layer.forward = functools.partial(_nf4_forward, layer)
    layer.dequantize = functools.partial(_nf4_dequantize, layer)
    layer._apply = functools.partial(_nf4_apply, layer)


def _nf4_apply(layer, fn, recurse=True):  # .to(), .to_empty(): the parameters move; qweight stays on meta
    return torch.nn.Module._apply(layer, fn, recurse)


def _nf4_fields(q):  # the tensors this NF4Weight holds (offset and nested_* only when double-quantized)
    return [f for f in _TENSOR_FIELDS if getattr(q, f) is not None]


def _nf4_whole(layer, tensors):  # qweight with its tensors from `tensors` (field -> its bytes as bf16 numbers)
    q = layer.qweight

    def view(f):  # the field's bytes as its own dtype and shape
        like = getattr(q, f)
        return tensors[f].to(torch.uint8).view(like.dtype).reshape(like.shape)

    views = {f: view(f) for f in _nf4_fields(q)}
    return dataclasses.replace(q, **views)


def _held(layer):  # the layer's qweight_<field> parameters: whole inside its Block's forward and backward
    return [getattr(layer, f"qweight_{f}") for f in _nf4_fields(layer.qweight)]


def _as_nf4(layer, held):  # qweight with its tensors from the held parameters' numbers, as bytes again
    return _nf4_whole(layer, dict(zip(_nf4_fields(layer.qweight), held)))


def _gathered_nf4(layer):
    return _as_nf4(layer, _held(layer))


class _HeldNF4Linear(torch.autograd.Function):
    """nf4.NF4LinearFunction on the held parameters: it saves them (which FSDP2 frees after the Block's forward
    and gathers again for its backward), not the bytes made from them, so no layer's 4-bit tensors stay whole
    between forward and backward."""

    @staticmethod
    def forward(ctx, x, bias, layer, *held):
        ctx.save_for_backward(*held)
        ctx.layer = layer
        return F.linear(x, _dequantize(_as_nf4(layer, held), x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ _dequantize(_as_nf4(ctx.layer, ctx.saved_tensors), grad_out.dtype)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None, *[None] * len(ctx.saved_tensors)


def _nf4_forward(layer, x):  # NF4Linear.forward, on the held parameters
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return _HeldNF4Linear.apply(x, bias, layer, *_held(layer))


def _nf4_dequantize(layer):
    return dequantize_nf4(_gathered_nf4(layer))
