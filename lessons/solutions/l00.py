"""Solutions to lesson 00's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def rms_norm_half(x, weight, eps=1e-5):
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_adjacent(x, pos, inv_freq):
    angle = pos[:, None].to(inv_freq.dtype) * inv_freq  # (T, hd/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # channel 2i pairs with 2i + 1
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def kv_cache_bytes(config, n_tokens, bytes_per_number=2):
    # keys and values, in every layer, for the key/value heads only (GQA), head_dim numbers each
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * n_tokens * bytes_per_number


def _rms_norm_no_upcast(x, weight, eps=1e-5):  # the mean of squares in 16 bits: inf for large inputs
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope_halves(x, pos, inv_freq):  # Hugging Face's layout (channel i with i + hd/2), not the paper's
    angle = pos[:, None].to(inv_freq.dtype) * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _kv_cache_bytes_query_heads(config, n_tokens, bytes_per_number=2):  # as if every query head had its own k, v
    return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * n_tokens * bytes_per_number


MISTAKES = {
    "rms_norm_half": _rms_norm_no_upcast,
    "rope_adjacent": _rope_halves,
    "kv_cache_bytes": _kv_cache_bytes_query_heads,
}
