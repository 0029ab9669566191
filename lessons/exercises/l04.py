"""Checks for lesson 04's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/prefix.py's PrefixEncoder, the model run on [p; x]); it raises AssertionError saying what
differs, never what the answer is."""

import torch
from common import check_close


def _tiny_model():
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=6)  # fmt: skip
    return Transformer(cfg).double()


def check_prefix_table(prefix_table):
    """Against the library's PrefixEncoder with prefix_projection=True (PEFT's MLP): the table, and its gradient
    with respect to the embedding (your function must be built from differentiable torch operations)."""
    from minipeft.peft import get_peft_model
    from minipeft.prefix import PrefixTuningConfig

    model = _tiny_model()
    L, K, hd = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    P = 5
    torch.manual_seed(1)
    peft_model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                          encoder_hidden_size=7))  # fmt: skip
    enc = peft_model.prompt_encoder["default"]
    emb = enc.embedding.weight  # (P, K * hd)
    first, last = enc.transform[0], enc.transform[2]
    expected = enc.prefix().view(P, 2 * L, K, hd)
    ours = prefix_table(emb, first.weight, first.bias, last.weight, last.bias, L, K)
    check_close("the table (P, 2L, K, hd)", ours, expected.detach(), rtol=1e-12, atol=1e-12)
    assert ours.requires_grad, "your table has no gradient: build it from the parameters with torch operations"
    direction = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g_ref,) = torch.autograd.grad((expected * direction).sum(), emb)
    (g_ours,) = torch.autograd.grad((ours * direction).sum(), emb)
    check_close("the gradient pulled back to the embedding", g_ours, g_ref, rtol=1e-10, atol=1e-12)


def check_cache_to_table(cache_to_table):
    """Load your table into the library's prefix (no MLP) of a small float64 model: on x it must give the logits
    of the plain model on [p; x] at x's positions, p the tokens whose cache you were given."""
    from minipeft.peft import get_peft_model
    from minipeft.prefix import PrefixTuningConfig

    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    p, x = torch.randint(0, 64, (1, 4), generator=g), torch.randint(0, 64, (1, 9), generator=g)
    P = p.size(1)
    with torch.no_grad():
        cache = model(p, use_cache=True).past_key_values  # L pairs (k, v), each (1, K, P, hd)
        expected = model(torch.cat([p, x], dim=1)).logits[:, P:]
        table = cache_to_table([(k.clone(), v.clone()) for k, v in cache])
    peft_model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P))  # after the plain runs above
    weight = peft_model.prompt_encoder["default"].embedding.weight
    assert isinstance(table, torch.Tensor), f"expected a tensor, got {type(table).__name__}"
    assert table.shape == weight.shape, f"table shape {tuple(table.shape)}, expected {tuple(weight.shape)}"
    with torch.no_grad():
        weight.copy_(table)
        ours = peft_model(x).logits
    check_close("the logits of x after your prefix", ours, expected, rtol=1e-9, atol=1e-10)


CHECKS = {"prefix_table": check_prefix_table, "cache_to_table": check_cache_to_table}
