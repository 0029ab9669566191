"""PiSSA and OLoRA starts: the model starts unchanged (W_res + s B A = W, float64), A and B are the weight's own
principal part (and HF PEFT's, up to the signs SVD and QR leave free), and PEFT's saving convention (a plain LoRA
relative to the original weight) loads on the original base, in ours and in PEFT."""

import pytest
import torch
from helpers import batch, hf_llama, tiny_model

from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.lora import LoraLayer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def layers(pm):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_the_model_starts_unchanged_and_ba_is_the_weights_principal_part(init):
    base = tiny_model()  # float64
    original = {n: m.weight.clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    ids = batch()["input_ids"]
    ref = base(ids).logits.detach()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    torch.testing.assert_close(pm(ids).logits, ref, rtol=1e-10, atol=1e-12)
    for name, layer in layers(pm).items():
        W, delta = original[name], layer.delta_weight("default")
        torch.testing.assert_close(layer.base_layer.weight + delta, W, rtol=0, atol=1e-12)  # W_res + sBA = W
        if init == "pissa":  # s B A = U_r S_r V_r^T, the best rank-4 approximation
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            torch.testing.assert_close(delta, U[:, :4] * S[:4] @ Vh[:4], rtol=1e-10, atol=1e-12)
        if init == "olora":  # B = Q_r has orthonormal columns, A = R_r is upper triangular
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=B.dtype), rtol=0, atol=1e-12)
            assert torch.equal(A[:, :4], A[:, :4].triu())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_and_b_are_hf_peft_s_up_to_signs(init):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kw))
    mine = get_peft_model(ours, LoraConfig(**kw))
    for name, layer in layers(mine).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A0, B0 = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        sign = torch.sign((A * A0).sum(1))  # each rank-1 pair may come out negated, both its row of A and column of B
        torch.testing.assert_close(A * sign[:, None], A0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B * sign[None, :], B0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, rtol=1e-4, atol=1e-5)


def test_saved_relative_to_the_original_weight_loads_on_the_original_base_in_ours_and_peft(tmp_path):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    pm = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")  # the adapter right after its init (PEFT's recipe)
    with torch.no_grad():  # "training"
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = batch(T=10)["input_ids"]
    trained = pm(ids).logits.detach()
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    fresh = type(ours)(ours.config).eval()
    fresh.load_state_dict(original)  # the ORIGINAL base, never rewritten
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(loaded(ids).logits, trained, rtol=1e-5, atol=1e-5)
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(hp(ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_bad_inits_are_clear_errors():
    from minipeft.nf4 import quantize_model

    with pytest.raises(ValueError, match=r"init_lora_weights must be .*'pissa_niter_K'.*got 'pissa_niter_x'"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(
        ValueError, match="rewrites the base weight, so it needs a full-precision base, not a NF4Linear"
    ):
        get_peft_model(quantize_model(tiny_model(torch.float32)), LoraConfig(init_lora_weights="pissa"))
