"""Solutions to lesson 07's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch.nn.functional as F

from minipeft import nf4


def lora_on_dequantized(x, weight, A, B, scaling):
    w_hat = nf4.dequantize_nf4(nf4.quantize_nf4(weight, blocksize=64, double_quant=True))  # (out, in), float64
    return F.linear(x, w_hat) + scaling * (x @ A.T) @ B.T


def nf4_bytes(out_features, in_features, blocksize=64):
    n = out_features * in_features
    n_blocks = -(-n // blocksize)
    codes = (n + 1) // 2  # two codes a byte; an odd count pads one
    return codes + n_blocks + 4 * -(-n_blocks // 256) + 4  # uint8 absmax per block, float32 per 256, the offset


def merge_requantize(q, A, B, scaling):
    merged = nf4.dequantize_nf4(q) + scaling * B @ A  # (out, in): W_hat + s B A
    requantized = nf4.dequantize_nf4(nf4.quantize_nf4(merged, q.blocksize, q.nested))
    return merged, requantized


def _lora_on_original(x, weight, A, B, scaling):  # LoRA on W itself: what QLoRA does NOT train
    return F.linear(x, weight) + scaling * (x @ A.T) @ B.T


def _nf4_bytes_whole_groups(out_features, in_features, blocksize=64):  # drops the partial group of 256 blocks
    n = out_features * in_features
    n_blocks = -(-n // blocksize)
    return (n + 1) // 2 + n_blocks + 4 * (n_blocks // 256) + 4


def _merge_requantize_unscaled(q, A, B, scaling):  # B A without the scaling s = alpha / r
    merged = nf4.dequantize_nf4(q) + B @ A
    return merged, nf4.dequantize_nf4(nf4.quantize_nf4(merged, q.blocksize, q.nested))


MISTAKES = {
    "lora_on_dequantized": _lora_on_original,
    "nf4_bytes": _nf4_bytes_whole_groups,
    "merge_requantize": _merge_requantize_unscaled,
}
