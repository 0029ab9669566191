"""Solutions to lesson 06's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def pack_nibbles(codes):
    return (codes[0::2] << 4) | codes[1::2]  # the first code of each pair in the high nibble


def dequantize(packed, absmax_codes, nested_absmax, offset, shape, code, dynamic, blocksize=64, nested_blocksize=256):
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)  # (n,): high nibble first
    absmax = (dynamic[absmax_codes.long()].view(-1, nested_blocksize) * nested_absmax[:, None]).reshape(-1) + offset
    return (code[codes.long()].view(-1, blocksize) * absmax[:, None]).reshape(shape)


def _pack_low_first(codes):  # the first code in the low nibble: the right bytes for the wrong convention
    return codes[0::2] | (codes[1::2] << 4)


def _dequantize_without_offset(packed, absmax_codes, nested_absmax, offset, shape, code, dynamic, blocksize=64,
                               nested_blocksize=256):  # fmt: skip
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)
    absmax = (dynamic[absmax_codes.long()].view(-1, nested_blocksize) * nested_absmax[:, None]).reshape(-1)
    return (code[codes.long()].view(-1, blocksize) * absmax[:, None]).reshape(
        shape
    )  # the centred absmax: forgot +offset


MISTAKES = {"pack_nibbles": _pack_low_first, "dequantize": _dequantize_without_offset}
