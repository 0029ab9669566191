"""Checks for lesson 06's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/nf4.py's quantize_nf4 / dequantize_nf4, which equal bitsandbytes byte for byte); it raises
AssertionError saying what differs, never what the answer is."""

import torch


def _weight(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def check_pack_nibbles(pack_nibbles):
    """The codes of a quantized weight, packed by you, against the library's packed bytes."""
    from minipeft import nf4

    w = _weight((32, 64), 1)
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=False)
    # the codes, recovered from the dequantized weight (the level nearest to w_hat / absmax), not from the bytes
    w_hat = nf4.dequantize_nf4(q).reshape(-1, 64)
    codes = (w_hat[..., None] - nf4.NF4_CODE * q.absmax[:, None, None]).abs().argmin(-1).reshape(-1).to(torch.uint8)
    ours = pack_nibbles(codes.clone())
    assert isinstance(ours, torch.Tensor), f"expected a tensor, got {type(ours).__name__}"
    assert ours.dtype == torch.uint8, f"dtype {ours.dtype}, expected torch.uint8 (one byte each)"
    assert ours.shape == q.packed.shape, f"shape {tuple(ours.shape)}, expected {tuple(q.packed.shape)}: n/2 bytes"
    wrong = (ours != q.packed).nonzero().reshape(-1)
    assert wrong.numel() == 0, (
        f"{wrong.numel()} of {ours.numel()} bytes differ from the library's, the first at byte {wrong[0].item()}"
    )


def check_dequantize(dequantize):
    """Against minipeft.nf4.dequantize_nf4 on a double-quantized weight of three nested blocks, bit for bit."""
    from minipeft import nf4

    w = _weight((96, 512), 2)  # 49152 weights: 768 blocks of 64, 3 blocks of 256 absmax values
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    expected = nf4.dequantize_nf4(q)
    ours = dequantize(q.packed.clone(), q.absmax.clone(), q.nested_absmax.clone(), q.offset.clone(), tuple(w.shape),
                      nf4.NF4_CODE.clone(), nf4.DYNAMIC_MAP.clone())  # fmt: skip
    assert isinstance(ours, torch.Tensor), f"expected a tensor, got {type(ours).__name__}"
    assert ours.shape == expected.shape, f"shape {tuple(ours.shape)}, expected {tuple(expected.shape)}"
    assert ours.dtype == expected.dtype, f"dtype {ours.dtype}, expected {expected.dtype}"
    if not torch.equal(ours, expected):
        diff = (ours - expected).abs().reshape(-1)
        first = (diff > 0).nonzero()[0].item()
        raise AssertionError(
            f"{int((diff > 0).sum())} of {ours.numel()} weights differ from the library's, by up to "
            f"{diff.max().item():.2e} (the first at flat index {first}, in block {first // 64} of 64 weights)"
        )


CHECKS = {"pack_nibbles": check_pack_nibbles, "dequantize": check_dequantize}
