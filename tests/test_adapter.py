"""Bottleneck adapters: identity at init, gradients against full fine-tuning and finite differences, placement,
counts, freezing, saving, generation, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, tiny_model
from safetensors.torch import load_file

from minipeft.adapter import AdapterConfig, AdapterLayer
from minipeft.gradcheck import adapter_gradient_identity, finite_difference_check
from minipeft.peft import PeftModel, get_peft_model

D, b = 64, 8  # tiny model's hidden size, the bottleneck used below


def adapted(placement="houlsby", init_weights=False, **kw):
    return get_peft_model(
        tiny_model(), AdapterConfig(bottleneck_size=b, placement=placement, init_weights=init_weights, **kw)
    )


def greedy_without_cache(model, ids, n, mask=None):
    """The reference for generate: recompute the whole forward for every new token, no KV cache."""
    for _ in range(n):
        logits = model(ids, attention_mask=mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
    return ids


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_is_the_base_model_with_full_finetuning_gradients(placement):
    model = tiny_model()
    b1 = batch(pad_left=3)
    base_logits = model(b1["input_ids"], attention_mask=b1["attention_mask"]).logits.detach()
    pm = get_peft_model(model, AdapterConfig(bottleneck_size=b, placement=placement))
    layer = pm.base_model.model.layers[0].mlp.down_proj
    assert layer.adapter_up["default"].weight.abs().sum() == 0 and layer.adapter_up["default"].bias.abs().sum() == 0
    assert layer.adapter_down["default"].weight.abs().sum() > 0  # only W_up is zero: W_up still gets a gradient
    out = pm(b1["input_ids"], attention_mask=b1["attention_mask"]).logits
    torch.testing.assert_close(out, base_logits, rtol=0, atol=0)
    errors = adapter_gradient_identity(pm, b1)
    assert errors["logits"] == 0 and errors["base_grads"] < 1e-13, errors
    # not vacuous: with a non-zero W_up the same check fails
    with torch.no_grad():
        layer.adapter_up["default"].weight.normal_(std=0.1)
    assert adapter_gradient_identity(pm, b1)["base_grads"] > 1e-3


def test_adapter_gradients_match_finite_differences():
    pm = adapted("houlsby")  # non-zero W_up and b_up
    b1 = batch(pad_left=2)
    params = [p for p in pm.parameters() if p.requires_grad]
    assert len(params) == 2 * 2 * 4  # 2 layers x 2 adapters x (W_down, b_down, W_up, b_up)
    err = finite_difference_check(
        lambda: pm(b1["input_ids"], attention_mask=b1["attention_mask"], labels=b1["labels"]).loss, params
    )
    assert err < 1e-6, err
    assert all(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_layer_equation_and_autograd_gradcheck(activation):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, dtype=torch.float64)
    layer = AdapterLayer(base)
    layer.update_layer("default", AdapterConfig(bottleneck_size=3, activation=activation, init_weights=False))
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x @ base.weight.T + base.bias
    expected = h + act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias  # h + W_up act(W_down h + b) + b
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    params = [down.weight, down.bias, up.weight, up.bias]
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


@pytest.mark.parametrize(
    "placement, wrapped", [("houlsby", ["self_attn.o_proj", "mlp.down_proj"]), ("pfeiffer", ["mlp.down_proj"])]
)
def test_placement_and_trainable_count_closed_form(placement, wrapped):
    pm = adapted(placement)
    names = sorted(n for n, m in pm.base_model.named_modules() if isinstance(m, AdapterLayer))
    assert names == sorted(f"model.layers.{i}.{w}" for i in range(2) for w in wrapped)
    n_adapters = 2 * len(wrapped)  # per layer: 2 for Houlsby, 1 for Pfeiffer
    per_adapter = 2 * D * b + b + D  # W_down (b, D), b_down (b,), W_up (D, b), b_up (D,)
    assert (
        pm.num_parameters(trainable_only=True)
        == n_adapters * per_adapter
        == {"houlsby": 4, "pfeiffer": 2}[placement] * 1096
    )


def test_freezing():
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, AdapterConfig(bottleneck_size=b))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    b1 = batch()
    for _ in range(3):
        opt.zero_grad()
        pm(b1["input_ids"], labels=b1["labels"]).loss.backward()
        for n, p in pm.named_parameters():
            assert (p.grad is not None) == p.requires_grad == ("adapter_" in n), n
        opt.step()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert pm.base_model.model.layers[1].mlp.down_proj.adapter_up["default"].weight.abs().sum() > 0  # it learned
    for k, v in pm.unload().state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_save_load_round_trip_disable_and_no_merge(tmp_path):
    pm = adapted("houlsby", activation="gelu")
    ids = batch()["input_ids"]
    base_logits = tiny_model()(ids).logits
    adapted_logits = pm(ids).logits.detach()
    assert (adapted_logits - base_logits).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base_logits, rtol=0, atol=0)
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["bottleneck_size"] == b and cfg["activation"] == "gelu"
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert len(state) == 2 * 2 * 4
    assert state["base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight"].shape == (b, D)
    assert state["base_model.model.model.layers.1.self_attn.o_proj.adapter_up.weight"].shape == (D, b)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, adapted_logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert trainable.num_parameters(trainable_only=True) == 4 * (2 * D * b + b + D)
    with pytest.raises(ValueError, match="works for LoRA/DoRA only; BOTTLENECK adapters cannot be merged"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="BOTTLENECK adapters cannot be merged"):
        pm.merge_adapter()
    other = tiny_model(hidden_size=32, intermediate_size=48)  # another base model
    with pytest.raises(
        ValueError, match=r"adapter_down.weight has shape \(8, 64\) in the file but \(8, 32\) in the model"
    ):
        PeftModel.from_pretrained(other, tmp_path)


def test_two_adapters_switch_and_delete():
    pm = adapted("pfeiffer")
    pm.add_adapter("other", AdapterConfig(bottleneck_size=4, placement="houlsby", init_weights=False))
    ids = batch()["input_ids"]
    first = pm(ids).logits.detach()
    pm.set_adapter("other")
    assert not torch.allclose(pm(ids).logits, first)
    assert pm.num_parameters(trainable_only=True) == 4 * (2 * D * 4 + 4 + D)  # only the active adapter trains
    pm.delete_adapter("other")
    torch.testing.assert_close(pm(ids).logits, first, rtol=0, atol=0)
    assert not any(isinstance(m, AdapterLayer) for n, m in pm.base_model.named_modules() if "o_proj" in n)


def test_generate_with_cache_equals_recomputing():
    pm = adapted("houlsby")
    b1 = batch(T=6, pad_left=2)
    out = pm.generate(b1["input_ids"], max_new_tokens=6, attention_mask=b1["attention_mask"])
    torch.testing.assert_close(out, greedy_without_cache(pm, b1["input_ids"], 6, b1["attention_mask"]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(bottleneck_size=0), "bottleneck_size must be a positive integer, got 0"),
        (dict(bottleneck_size=-4), "bottleneck_size must be a positive integer, got -4"),
        (dict(bottleneck_size=2.5), "bottleneck_size must be an integer, got 2.5"),
        (dict(placement="parallel"), r"placement must be one of \['houlsby', 'pfeiffer'\], got 'parallel'"),
        (dict(activation="swish"), r"activation must be one of \['gelu', 'relu', 'silu', 'tanh'\], got 'swish'"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        AdapterConfig(**kw)


def test_model_without_the_placement_modules():
    class NoMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(
        ValueError, match=r"placement 'pfeiffer' adapts modules named \['mlp.down_proj'\], but NoMLP has none"
    ):
        get_peft_model(NoMLP(), AdapterConfig(placement="pfeiffer"))
