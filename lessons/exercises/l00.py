"""Checks for lesson 00's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/model.py, float64 arithmetic, complex numbers, a real KV cache); it raises AssertionError
saying what differs, never what the answer is."""

import math

import torch
from common import check_close


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def check_rms_norm_half(rms_norm_half):
    """Against float64 arithmetic and minipeft.model.RMSNorm, in float64, float32, bfloat16 and float16; the float16
    input is large enough that its squares overflow 16 bits (65504 is float16's largest number)."""
    from minipeft.model import RMSNorm

    g = _gen(0)
    D = 48
    weight64 = 1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    cases = [  # (input, its dtype's tolerance)
        (torch.randn(3, 5, D, generator=g, dtype=torch.float64), 1e-12),
        (torch.randn(3, 5, D, generator=g), 1e-5),
        ((300 * torch.randn(3, 5, D, generator=g)).bfloat16(), 2e-2),
        ((300 * torch.randn(3, 5, D, generator=g)).half(), 2e-3),  # squares of ~300 overflow float16
    ]
    for x, tol in cases:
        weight, eps = weight64.to(x.dtype), 1e-5
        ours = rms_norm_half(x, weight, eps)
        name = f"{x.dtype} input"
        assert isinstance(ours, torch.Tensor), f"{name}: expected a tensor, got {type(ours).__name__}"
        assert ours.dtype == x.dtype, f"{name}: your result is {ours.dtype}; RMSNorm returns the input's dtype"
        x64 = x.double()
        exact = weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        check_close(name + " (against float64 arithmetic)", ours, exact.to(x.dtype), rtol=tol, atol=tol)
        norm = RMSNorm(D, eps).to(x.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            check_close(name + " (against minipeft.model.RMSNorm)", ours, norm(x), rtol=tol, atol=tol)


def check_rope_adjacent(rope_adjacent):
    """Against the complex-number form of the RoPE paper (as Meta's Llama code writes it): channels (2i, 2i+1) are
    one complex number, multiplied by e^(i m theta_i) at position m."""
    g = _gen(1)
    hd, T = 16, 7
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    x = torch.randn(2, 3, T, hd, generator=g, dtype=torch.float64)  # (B, heads, T, hd)
    pos = torch.arange(5, 5 + T)
    ours = rope_adjacent(x, pos, inv_freq)
    angle = pos[:, None].double() * inv_freq  # (T, hd/2)
    z = torch.view_as_complex(x.reshape(2, 3, T, hd // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    check_close("rope_adjacent(x, pos, inv_freq)", ours, torch.view_as_real(z).reshape(x.shape), 1e-12, 1e-12)
    e0 = torch.zeros(1, hd, dtype=torch.float64)
    e0[0, 0] = 1.0
    turned = rope_adjacent(e0, torch.tensor([1]), inv_freq)[0]
    assert abs(turned[1].item() - math.sin(inv_freq[0].item())) < 1e-12, (
        "channel 0 at position 1 should turn towards channel 1 (adjacent pairs), by +sin(theta_0)"
    )


def check_kv_cache_bytes(kv_cache_bytes):
    """Against the cache a real minipeft Transformer returns (use_cache=True), for several shapes of attention:
    grouped-query, plain multi-head, and a head_dim that is not hidden_size / heads."""
    from minipeft.model import ModelConfig, Transformer

    def config(layers, hidden, heads, kv_heads, head_dim=None):
        return ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)  # fmt: skip

    configs = [config(3, 48, 6, 2), config(2, 32, 4, 4), config(1, 32, 4, 1, head_dim=12)]
    probe = 5
    for i, cfg in enumerate(configs):
        torch.manual_seed(0)
        with torch.no_grad():
            cache = Transformer(cfg).eval()(torch.zeros(1, probe, dtype=torch.long), use_cache=True).past_key_values
        numbers = sum(k.numel() + v.numel() for k, v in cache) // probe  # per token
        for n_tokens, nbytes in [(1, 2), (2048, 2), (100, 4)]:
            ours = kv_cache_bytes(cfg, n_tokens, nbytes)
            expected = numbers * n_tokens * nbytes
            assert isinstance(ours, int), f"expected an int, got {type(ours).__name__}"
            assert ours == expected, (
                f"config {i} (layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads}, kv heads "
                f"{cfg.num_key_value_heads}, head_dim {cfg.head_dim}), {n_tokens} tokens of {nbytes} bytes: "
                f"{ours:,d} bytes is {ours / expected:.3g} times the real cache"
            )


CHECKS = {
    "rms_norm_half": check_rms_norm_half,
    "rope_adjacent": check_rope_adjacent,
    "kv_cache_bytes": check_kv_cache_bytes,
}
