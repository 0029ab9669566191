"""Checks for lesson 02's exercises: each calls your function on fixed inputs and compares it with an independent
reference (PeftModel.add_weighted_adapter, float64 autograd, minipeft's DoRA merge); it raises AssertionError
saying what differs, never what the answer is."""

import copy

import torch
from common import check_close


def _small_model():
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Transformer(cfg).double()


def check_cat_combine(cat_combine):
    """Against closed-form arithmetic (the weighted sum of the two deltas) and against minipeft's
    PeftModel.add_weighted_adapter(..., combination_type="cat"), on q_proj (32 -> 32) and v_proj (32 -> 16)."""
    from minipeft.lora import LoraConfig
    from minipeft.peft import get_peft_model

    torch.manual_seed(1)
    targets = ["q_proj", "v_proj"]
    pm = get_peft_model(_small_model(), LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=3, lora_alpha=3, use_rslora=True, target_modules=targets, init_lora_weights=False))
    weights = [0.7, -1.2]
    pm.add_weighted_adapter(["default", "b"], weights, "combined", combination_type="cat")
    for name in ("q_proj", "v_proj"):
        layer = pm.base_model.model.layers[0].self_attn.get_submodule(name)
        adapters = [(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(), layer.scaling[a])
                    for a in ("default", "b")]  # fmt: skip
        out = cat_combine(adapters, weights)
        assert isinstance(out, tuple) and len(out) == 2, "return a tuple (A, B)"
        A, B = out
        r = sum(a.shape[0] for a, _, _ in adapters)
        assert A.shape == (r, layer.in_features), f"{name}: A is {tuple(A.shape)}, expected (r_1 + r_2, in)"
        assert B.shape == (layer.out_features, r), f"{name}: B is {tuple(B.shape)}, expected (out, r_1 + r_2)"
        exact = sum(w * s * b @ a for (a, b, s), w in zip(adapters, weights))
        check_close(f"{name}: B @ A against the weighted sum of the deltas", B @ A, exact, rtol=1e-10, atol=1e-12)
        library = layer.delta_weight("combined").detach()  # the combined adapter's s B A, s = 1
        check_close(f"{name}: B @ A against add_weighted_adapter(cat)", B @ A, library, rtol=1e-10, atol=1e-12)


def _dora_case(seed=2):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, r, s = 6, 5, 2, 1.5
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    m = (W + s * B @ A).norm(dim=1) * (1 + 0.3 * torch.rand(out_f, generator=g, dtype=torch.float64))
    G = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)  # dL/dW'
    return G, W, A, B, s, m


def check_dora_grads_through_norm(dora_grads_through_norm):
    """Against float64 autograd through W' = m * V / ||V||_row, V = W + s B A, with the norm NOT detached: the loss
    sum(G * W') has dL/dW' = G, so autograd's gradients of m, A and B are the ones asked for."""
    G, W, A, B, s, m = _dora_case()
    Ar, Br, mr = (t.clone().requires_grad_(True) for t in (A, B, m))
    V = W + s * Br @ Ar
    (G * (mr[:, None] * V / V.norm(dim=1, keepdim=True))).sum().backward()
    out = dora_grads_through_norm(G, W, A, B, s, m)
    assert isinstance(out, tuple) and len(out) == 3, "return a tuple (dL/dm, dL/dA, dL/dB)"
    for name, ours, expected in zip(("dL/dm", "dL/dA", "dL/dB"), out, (mr.grad, Ar.grad, Br.grad)):
        check_close(name, ours, expected, rtol=1e-10, atol=1e-12)


def check_dora_unmerge(dora_unmerge):
    """Against the weight before the merge: a minipeft DoRA layer (magnitude moved away from its init, B non-zero)
    is merged with LoraLayer.merge(), which keeps n = ||W + sBA||_row in layer.dora_norm; your function must give
    the original W back from the merged weight."""
    from minipeft.lora import LoraConfig, LoraLayer

    torch.manual_seed(3)
    base = torch.nn.Linear(5, 6, bias=False).double()
    layer = LoraLayer(base)
    layer.update_layer("default", LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.7, 1.6, 6, dtype=torch.float64))
    W = base.weight.detach().clone()
    layer.merge()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m, n = layer.lora_magnitude_vector["default"].detach(), layer.dora_norm["default"]
    merged = copy.deepcopy(base.weight.detach())
    ours = dora_unmerge(merged, A, B, layer.scaling["default"], m, n)
    check_close("dora_unmerge(...) against the weight before the merge", ours, W, rtol=1e-10, atol=1e-12)


CHECKS = {
    "cat_combine": check_cat_combine,
    "dora_grads_through_norm": check_dora_grads_through_norm,
    "dora_unmerge": check_dora_unmerge,
}
