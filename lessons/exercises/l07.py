"""Checks for lesson 07's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft's LoraLayer around an NF4Linear, nf4.memory_report, LoraLayer.merged_linear); it raises
AssertionError saying what differs, never what the answer is."""

import torch
from common import check_close
from torch import nn


def _qlora_layer(weight, A, B, lora_alpha, blocksize=64, double_quant=True):
    """minipeft's QLoRA layer: LoraLayer(NF4Linear) holding `weight` in 4 bits and the adapter (A, B)."""
    from minipeft import nf4
    from minipeft.lora import LoraConfig, LoraLayer

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = LoraLayer(nf4.NF4Linear.from_linear(linear, blocksize, double_quant))
    layer.update_layer("default", LoraConfig(r=A.shape[0], lora_alpha=lora_alpha))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def check_lora_on_dequantized(lora_on_dequantized):
    """Two layers (64 -> 48 -> 32) with a tanh between, loss = sum of squares, in float64: your dense forward
    against minipeft's LoraLayer(NF4Linear): the loss, and the gradients of x and of both adapters."""
    g = torch.Generator().manual_seed(0)
    dims, r, alpha = [(48, 64), (32, 48)], 4, 8.0  # scaling alpha / r = 2
    weights = [torch.randn(o, i, generator=g, dtype=torch.float64) * 0.1 for o, i in dims]
    adapters = [(torch.randn(r, i, generator=g, dtype=torch.float64) * 0.1,
                 torch.randn(o, r, generator=g, dtype=torch.float64) * 0.1) for o, i in dims]  # fmt: skip
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)

    layers = [_qlora_layer(w, A, B, alpha) for w, (A, B) in zip(weights, adapters)]
    x_ref = x.clone().requires_grad_(True)
    loss_ref = (layers[1](torch.tanh(layers[0](x_ref))) ** 2).sum()
    loss_ref.backward()
    expected = [x_ref.grad] + [p.grad for layer in layers for p in (layer.lora_A["default"].weight,
                                                                   layer.lora_B["default"].weight)]  # fmt: skip

    x_ours = x.clone().requires_grad_(True)
    ours_adapters = [(A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for A, B in adapters]
    h = lora_on_dequantized(x_ours, weights[0].clone(), *ours_adapters[0], alpha / r)
    assert isinstance(h, torch.Tensor), f"expected a tensor, got {type(h).__name__}"
    assert h.shape == (3, 5, 48), f"first layer: output shape {tuple(h.shape)}, expected (3, 5, 48)"
    y = lora_on_dequantized(torch.tanh(h), weights[1].clone(), *ours_adapters[1], alpha / r)
    loss = (y**2).sum()
    check_close("the loss", loss.detach(), loss_ref.detach(), rtol=1e-12, atol=1e-12)
    assert loss.requires_grad, "no gradient reaches your result: keep x, A and B in the computation"
    loss.backward()
    names = ["dL/dx", "dL/dA (layer 1)", "dL/dB (layer 1)", "dL/dA (layer 2)", "dL/dB (layer 2)"]
    ours = [x_ours.grad] + [t.grad for pair in ours_adapters for t in pair]
    for name, got, want in zip(names, ours, expected):
        assert got is not None, f"{name}: no gradient (is it part of your result's computation?)"
        check_close(name, got, want, rtol=1e-10, atol=1e-12)


def check_nf4_bytes(nf4_bytes):
    """Against nf4.memory_report(...)["code_bytes"] + ["stats_bytes"] of real NF4Linear layers (double
    quantization), for shapes with an odd number of weights, a partial block and a partial group of 256 blocks."""
    from minipeft import nf4

    torch.manual_seed(0)
    for out_f, in_f, blocksize in [(704, 256, 64), (100, 64, 64), (33, 7, 64), (300, 200, 128), (640, 512, 64)]:
        layer = nf4.quantize_model(nn.Linear(in_f, out_f, bias=False), blocksize=blocksize, double_quant=True)
        report = nf4.memory_report(layer)
        ours = nf4_bytes(out_f, in_f, blocksize)
        assert isinstance(ours, int), (
            f"nf4_bytes({out_f}, {in_f}, {blocksize}): return an int, got {type(ours).__name__}"
        )
        expected = report["code_bytes"] + report["stats_bytes"]
        assert ours == expected, (
            f"nf4_bytes({out_f}, {in_f}, {blocksize}): {'too many' if ours > expected else 'too few'} bytes "
            f"({out_f * in_f} weights)"
        )


def check_merge_requantize(merge_requantize):
    """merged against minipeft's LoraLayer(NF4Linear).merged_linear() (the dequantized base plus s B A);
    requantized against a round trip of your merged weight through quantize_nf4/dequantize_nf4 with q's settings,
    for (block size 64, double quantization) and (128, without)."""
    from minipeft import nf4

    g = torch.Generator().manual_seed(1)
    for blocksize, double_quant in [(64, True), (128, False)]:
        w = torch.randn(48, 96, generator=g) * 0.02
        A, B = torch.randn(4, 96, generator=g) * 0.1, torch.randn(48, 4, generator=g) * 0.05
        layer = _qlora_layer(w, A, B, lora_alpha=6.0, blocksize=blocksize, double_quant=double_quant)  # s = 1.5
        q = layer.base_layer.qweight
        out = merge_requantize(q, A.clone(), B.clone(), layer.scaling["default"])
        assert isinstance(out, tuple) and len(out) == 2, "return a tuple (merged, requantized)"
        merged, requantized = out
        with torch.no_grad():
            library = layer.merged_linear().weight
        check_close(f"merged (block size {blocksize})", merged, library, rtol=1e-6, atol=1e-7)
        expected = nf4.dequantize_nf4(nf4.quantize_nf4(merged.detach(), blocksize, double_quant))
        check_close(f"requantized (block size {blocksize}, double quantization {double_quant})", requantized,
                    expected, rtol=0, atol=0)  # fmt: skip


CHECKS = {
    "lora_on_dequantized": check_lora_on_dequantized,
    "nf4_bytes": check_nf4_bytes,
    "merge_requantize": check_merge_requantize,
}
