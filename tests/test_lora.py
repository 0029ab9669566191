"""LoRA, rsLoRA and DoRA: gradient identities against full fine-tuning, merging, freezing, HF PEFT interop."""

import math

import pytest
import torch
from helpers import batch, hf_llama, tiny_model

from minipeft.gradcheck import lora_gradient_identity, max_error
from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft import PeftModel, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perturbed(peft_model, seed=0):
    """Non-zero B (init_lora_weights=False) and a magnitude vector moved away from ||W||, so nothing hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return peft_model


@pytest.mark.parametrize(
    "kw",
    [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True), dict(r=3, lora_alpha=5, use_dora=True)],
    ids=["lora", "rslora", "dora"],
)
def test_gradients_equal_full_finetuning_identities(kw):
    model = tiny_model(dtype=torch.float64, attention_bias=True)
    pm = perturbed(get_peft_model(model, LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kw)))
    errors = lora_gradient_identity(pm, batch(pad_left=3))
    assert len(errors) == 2 * len(TARGETS)
    assert max_error(errors) < 1e-9, errors
    # the identity is not vacuous: the gradients are non-zero
    assert all(p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if p.requires_grad)


def test_wrong_scaling_would_be_caught():
    """The check compares against s = alpha / r: a layer using another scale fails it."""
    pm = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.scaling["default"] = 2.0 / math.sqrt(4) * 3  # a plausible bug
    layer = pm.base_model.model.layers[0].self_attn.q_proj
    errors = lora_gradient_identity(pm, batch())
    assert layer.scaling["default"] != 2.0 and max_error(errors) < 1e-9  # consistent with itself ...
    # ... but the forward no longer equals W + (alpha/r) B A:
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = x @ (layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T
    assert not torch.allclose(layer(x), expected)


@pytest.mark.parametrize("use_dora", [False, True])
def test_layer_passes_autograd_gradcheck(use_dora):
    torch.manual_seed(0)
    layer = LoraLayer(torch.nn.Linear(6, 5, dtype=torch.float64))
    layer.update_layer("default", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, use_dora=use_dora))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if use_dora:  # DoRA detaches ||W + sBA|| on purpose, so numeric and autograd derivatives in A, B differ
        params = [layer.lora_magnitude_vector["default"]]  # by design; they agree in x and m
    assert torch.autograd.gradcheck(lambda x, *p: layer(x), (x, *params))


def test_forward_is_w_plus_scaled_ba_and_rslora_scale():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, dtype=torch.float64)
    for rs, s in [(False, 12 / 4), (True, 12 / 2)]:
        layer = LoraLayer(base)
        layer.update_layer("default", LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, use_rslora=rs))
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        x = torch.randn(3, 8, dtype=torch.float64)
        torch.testing.assert_close(layer(x), base(x) + s * x @ A.T @ B.T)


def test_default_init_is_identity_with_kaiming_a():
    model = tiny_model()
    ids = batch()["input_ids"]
    ref = model(ids).logits
    pm = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(pm(ids).logits, ref, rtol=0, atol=0)
    A = pm.base_model.model.layers[0].mlp.down_proj.lora_A["default"].weight  # in = 96
    assert A.abs().max() <= 1 / math.sqrt(96) and A.abs().max() > 0.5 / math.sqrt(96)  # kaiming-uniform(a=sqrt(5))
    pm_g = get_peft_model(tiny_model(), LoraConfig(r=8, init_lora_weights="gaussian"))
    assert pm_g.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() == 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_disable(use_dora):
    model = tiny_model()
    ids = batch()["input_ids"]
    base_logits = model(ids).logits.detach()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    pm = perturbed(
        get_peft_model(model, LoraConfig(target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora))
    )
    adapted = pm(ids).logits.detach()
    assert (adapted - base_logits).abs().max() > 1e-3
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base_logits, rtol=0, atol=0)
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, adapted, rtol=1e-10, atol=1e-12)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(ids).logits, adapted, rtol=1e-10, atol=1e-12)
    for k, v in pm.unload().state_dict().items():  # unmerge restored the base weights
        torch.testing.assert_close(v, base_sd[k], rtol=1e-12, atol=1e-13)


def test_merge_and_unload_returns_plain_transformer():
    pm = get_peft_model(tiny_model(), LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=True))
    ids = batch()["input_ids"]
    adapted = pm(ids).logits.detach()
    merged = pm.merge_and_unload()
    assert type(merged).__name__ == "Transformer"
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_dora", [False, True])
def test_freezing_and_trainable_counts(use_dora):
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    r = 4
    pm = get_peft_model(model, LoraConfig(r=r, target_modules=["q_proj", "down_proj"], use_dora=use_dora))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    # closed form: r * (d_in + d_out) per target (+ d_out for DoRA's magnitude), 2 layers
    per_layer = r * (64 + 64) + r * (96 + 64) + (64 + 64 if use_dora else 0)
    assert pm.num_parameters(trainable_only=True) == sum(p.numel() for p in trainable) == 2 * per_layer
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    b = batch()
    for _ in range(3):
        opt.zero_grad()
        pm(b["input_ids"], labels=b["labels"]).loss.backward()
        for n, p in pm.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
            assert p.requires_grad == any(t in n for t in ("lora_A", "lora_B", "lora_magnitude_vector")), n
        opt.step()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    for k, v in pm.unload().state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_save_load_round_trip(tmp_path):
    pm = perturbed(get_peft_model(tiny_model(), LoraConfig(r=4, use_dora=True, init_lora_weights=False)))
    ids = batch()["input_ids"]
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert trainable.num_parameters(trainable_only=True) == pm.num_parameters(trainable_only=True)


@pytest.mark.parametrize(
    "kw",
    [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_rslora=True), dict(r=4, lora_alpha=6, use_dora=True)],
    ids=["lora", "rslora", "dora"],
)
def test_interop_with_hf_peft_both_ways(tmp_path, kw):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    ids = batch(T=10)["input_ids"]
    # ours -> PEFT
    pm = perturbed(
        get_peft_model(
            ours, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **kw)
        )
    )
    pm.save_pretrained(tmp_path / "ours")
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    with torch.no_grad():
        ref = hp(ids).logits
        torch.testing.assert_close(pm(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # PEFT -> ours: a fresh PEFT adapter with its own random weights
    hf2, ours2 = hf_llama(seed=7, tie_word_embeddings=False)
    cfg = peft.LoraConfig(target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False, **kw)
    hp2 = peft.get_peft_model(hf2, cfg)
    hp2.save_pretrained(str(tmp_path / "peft"))
    mine = PeftModel.from_pretrained(ours2, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, hp2.eval()(ids).logits, rtol=1e-5, atol=1e-5)
