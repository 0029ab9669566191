"""Checks for lesson 09's exercises: each runs a small PeftModel with two LoRA adapters (float64) and compares
your function with what the library computes (a forward with adapter_names, add_weighted_adapter with "svd");
it raises AssertionError saying what differs, never what the answer is."""

import torch
from common import check_close


def _two_adapters():
    """A one-block float64 model with adapters "a" (r=2) and "b" (r=3, rsLoRA) on q_proj and v_proj, B != 0."""
    from minipeft.lora import LoraConfig
    from minipeft.model import ModelConfig, Transformer
    from minipeft.peft import get_peft_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    targets = ["q_proj", "v_proj"]
    pm = get_peft_model(Transformer(cfg).double(), LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                              init_lora_weights=False), adapter_name="a")  # fmt: skip
    pm.add_adapter("b", LoraConfig(r=3, lora_alpha=3, use_rslora=True, target_modules=targets, init_lora_weights=False))
    return pm


def _factors(layer, name):
    return layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone(), layer.scaling[name]


def check_mixed_lora(mixed_lora):
    """Your layer against q_proj's and v_proj's outputs in PeftModel.forward(ids, adapter_names=rows)."""
    pm = _two_adapters()
    attn = pm.base_model.model.layers[0].self_attn
    ids = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(1))
    for rows in (["a", "__base__", "b", "a", "b"], ["__base__"] * 5, ["b"] * 5):
        seen = {}
        hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n, seen=seen: seen.update({n: (i[0], o)}))
                 for n in ("q_proj", "v_proj")]  # fmt: skip
        with torch.no_grad():
            pm(ids, adapter_names=rows)
        for h in hooks:
            h.remove()
        for name, (x, expected) in seen.items():
            layer = getattr(attn, name)
            with torch.no_grad():
                base_out = layer.base_layer(x)
            adapters = {a: _factors(layer, a) for a in ("a", "b")}
            ours = mixed_lora(x.clone(), base_out.clone(), adapters, list(rows))
            check_close(f"{name} with rows {rows}", ours, expected, rtol=1e-10, atol=1e-12)


def check_svd_combine(svd_combine):
    """B @ A against the delta of add_weighted_adapter(["a", "b"], weights, combination_type="svd", svd_rank=k)
    (scaling 1), and the error against the one it returns, for q_proj and v_proj and two ranks."""
    pm = _two_adapters()
    attn = pm.base_model.model.layers[0].self_attn
    weights = [0.7, -0.4]
    for rank in (2, 4):
        errors = pm.add_weighted_adapter(["a", "b"], weights, f"svd{rank}", combination_type="svd", svd_rank=rank)
        for name in ("q_proj", "v_proj"):
            layer = getattr(attn, name)
            out = svd_combine([_factors(layer, a) for a in ("a", "b")], list(weights), rank)
            assert isinstance(out, tuple) and len(out) == 3, "return a tuple (A, B, error)"
            A, B, error = out
            assert A.shape == (rank, layer.in_features), f"{name}: A is {tuple(A.shape)}, expected (rank, in)"
            assert B.shape == (layer.out_features, rank), f"{name}: B is {tuple(B.shape)}, expected (out, rank)"
            library = layer.delta_weight(f"svd{rank}").detach()
            check_close(f"{name}, rank {rank}: B @ A against add_weighted_adapter(svd)", B @ A, library,
                        rtol=1e-9, atol=1e-12)  # fmt: skip
            reported = errors[f"model.layers.0.self_attn.{name}"]
            assert isinstance(error, float), f"{name}: return the error as a float, got {type(error).__name__}"
            assert abs(error - reported) <= 1e-9 * max(reported, 1e-12), (
                f"{name}, rank {rank}: the error differs from the one add_weighted_adapter reports "
                f"(relative difference {abs(error - reported) / max(reported, 1e-12):.1e})"
            )


CHECKS = {"mixed_lora": check_mixed_lora, "svd_combine": check_svd_combine}
