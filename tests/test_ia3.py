"""IA3 against full fine-tuning (the gradient identity, float64), exact merging, HF PEFT's files both ways, and
bad input."""

import pytest
import torch
from helpers import batch, hf_llama, tiny_model

from minipeft import IA3Config, PeftModel, get_peft_model
from minipeft.gradcheck import ia3_gradient_identity
from minipeft.ia3 import IA3Layer


def ia3(model, **kw):
    torch.manual_seed(0)
    return get_peft_model(model, IA3Config(init_ia3_weights=False, **kw))


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2-biases"])
def test_gradients_equal_full_finetuning_identity(bias):
    """dL/dl = rowsum(G * W) (+ dL/db' * b) for scaled outputs, colsum(G * W) for the scaled MLP input."""
    model = tiny_model(attention_bias=bias)
    pm = ia3(model, target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"])
    errors = ia3_gradient_identity(pm, batch(pad_left=3))
    assert len(errors) == 4 * 2 and max(errors.values()) < 1e-10, errors
    layers = {n: m for n, m in pm.base_model.named_modules() if isinstance(m, IA3Layer)}
    assert {n.rsplit(".", 1)[1]: m.ia3_l["default"].shape for n, m in layers.items()} == {
        "k_proj": (32, 1), "v_proj": (32, 1), "down_proj": (1, 96), "up_proj": (96, 1)}  # fmt: skip


def test_identity_at_init_defaults_and_trainable_count():
    base = tiny_model()
    ids = batch()["input_ids"]
    ref = base(ids).logits
    pm = get_peft_model(base, IA3Config())  # PEFT's defaults: k, v, down (its input)
    torch.testing.assert_close(pm(ids).logits, ref, rtol=0, atol=0)  # every l = 1: the base model
    assert pm.peft_config["default"].target_modules == ("k_proj", "v_proj", "down_proj")
    assert pm.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 96)  # per layer: k out, v out, down in


def test_merge_unmerge_and_merge_and_unload_are_exact():
    pm = ia3(tiny_model(attention_bias=True))
    ids = batch()["input_ids"]
    adapted = pm(ids).logits
    weights = {n: p.clone() for n, p in pm.base_model.named_parameters() if "base_layer" in n}
    pm.merge_adapter()
    torch.testing.assert_close(pm(ids).logits, adapted, rtol=1e-12, atol=1e-12)
    pm.unmerge_adapter()
    for n, p in pm.base_model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-14, atol=1e-15)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-12, atol=1e-12)


def test_interop_with_hf_peft_both_ways(tmp_path):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    ids = batch(T=10)["input_ids"]
    pm = ia3(ours, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm.save_pretrained(tmp_path / "ours")
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, hp(ids).logits, rtol=1e-5, atol=1e-5)
    hf2, ours2 = hf_llama(seed=7, tie_word_embeddings=False)
    cfg = peft.IA3Config(target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)  # fmt: skip
    hp2 = peft.get_peft_model(hf2, cfg)
    hp2.save_pretrained(str(tmp_path / "peft"))
    mine = PeftModel.from_pretrained(ours2, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, hp2.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(target_modules=["q_proj"], feedforward_modules=["down_proj"]), r"feedforward_modules \['down_proj'\]"),
        (dict(target_modules=["rotary"]), "matched no Linear layer"),
        (dict(target_modules=["k_proj"], fan_in_fan_out=True), "fan_in_fan_out=True"),
        (dict(target_modules=5), "target_modules must be"),
    ],
)
def test_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        get_peft_model(tiny_model(), IA3Config(**kw))
