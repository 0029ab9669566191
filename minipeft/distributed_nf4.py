"""The 4-bit layers under FSDP2 (distributed.shard calls _shard_nf4 on each NF4Linear): how a QLoRA base's codes
and quantization state are sharded, gathered and read like parameters. Part of distributed.py's FSDP2, in a file of
its own for its length; tests/test_distributed.py checks it against one process (the QLoRA and QDoRA runs)."""

import dataclasses
import functools

import torch

from .nf4 import _TENSOR_FIELDS, dequantize_nf4

# FSDP2 shards and all-gathers nn.Parameters only, while NF4Linear keeps its 4-bit tensors (packed codes, absmax,
# double quantization's offset, nested_absmax and nested_code) in a plain NF4Weight. So each becomes a frozen
# parameter of the layer, `qweight_<field>`: its bytes, flat, held two by two in a bfloat16 tensor. Not
# as uint8: torch before 2.13 makes every sharded parameter with requires_grad=True first, which a uint8 tensor
# refuses ("only Tensors of floating point dtype can require gradients": seen on torch 2.11 + CUDA); and not as
# float32: the bf16 policy would round it. bf16 is the policy's own dtype, so FSDP2 never casts it, and its
# all-gather copies the bits as they are (a pattern that reads as NaN is never computed with: the layer views the
# bytes back as uint8 codes and float32 absmax before any arithmetic). Each rank keeps 1/N of every one; inside
# its Block's forward and backward FSDP2 has gathered them whole, and the layer's forward (and dequantize, for
# DoRA) read them from there. qweight itself keeps only
# the shapes and dtypes (on the meta device): the 4-bit bytes live in the parameters alone.


def _shard_nf4(layer):
    q = layer.qweight
    for f in _nf4_fields(q):
        t = getattr(q, f).reshape(-1).view(torch.uint8)  # (bytes,); a 0-dim offset becomes its 4 bytes
        t = torch.cat([t, t.new_zeros(t.numel() % 2)]).view(torch.bfloat16)  # (bytes / 2,): see the note above
        layer.register_parameter(f"qweight_{f}", torch.nn.Parameter(t, requires_grad=False))
    layer.qweight = q.to("meta")
    layer.forward = functools.partial(_nf4_forward, layer)
    layer.dequantize = functools.partial(_nf4_dequantize, layer)
    layer._apply = functools.partial(_nf4_apply, layer)


def _nf4_apply(layer, fn, recurse=True):  # .to(), .to_empty(): the parameters move; qweight stays on meta
    return torch.nn.Module._apply(layer, fn, recurse)


def _nf4_fields(q):  # the tensors this NF4Weight holds (offset and nested_* only when double-quantized)
    return [f for f in _TENSOR_FIELDS if getattr(q, f) is not None]


def _nf4_whole(layer, tensors):  # qweight with its tensors from the bytes in `tensors` (field -> bf16-held bytes)
    q = layer.qweight

    def view(f):  # the field's bytes (the pad byte dropped) as its own dtype and shape
        like = getattr(q, f)
        return tensors[f].view(torch.uint8)[: like.numel() * like.element_size()].view(like.dtype).reshape(like.shape)

    views = {f: view(f) for f in _nf4_fields(q)}
    return dataclasses.replace(q, **views)


def _gathered_nf4(layer):  # inside the Block's forward or backward, where FSDP2 holds the parameters whole
    return _nf4_whole(layer, {f: getattr(layer, f"qweight_{f}") for f in _nf4_fields(layer.qweight)})


def _nf4_forward(layer, x):  # NF4Linear.forward on the gathered tensors
    meta, layer.qweight = layer.qweight, _gathered_nf4(layer)
    try:
        return type(layer).forward(layer, x)
    finally:
        layer.qweight = meta


def _nf4_dequantize(layer):
    return dequantize_nf4(_gathered_nf4(layer))
