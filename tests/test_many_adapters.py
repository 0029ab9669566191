"""Several LoRA adapters on one base: switching, mixed batches, weighted combinations, saving, deleting."""

import pytest
import torch
from helpers import batch, hf_llama, tiny_model

from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft import PeftModel, get_peft_model


def lora(r, seed, **kw):
    torch.manual_seed(seed)
    return LoraConfig(
        r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"], **kw
    )


def three_adapters():
    pm = get_peft_model(tiny_model(), lora(2, 1), adapter_name="a")
    pm.add_adapter("b", lora(4, 2))
    pm.add_adapter("c", lora(3, 3))
    return pm


def alone(config_seed, r, ids):
    """The reference: a fresh base with only that adapter (same init seed -> same weights)."""
    pm = get_peft_model(tiny_model(), lora(r, config_seed))
    return pm(ids).logits


def test_switching_equals_a_freshly_built_single_adapter():
    pm = three_adapters()
    ids = batch()["input_ids"]
    assert pm.adapters == ["a", "b", "c"] and pm.active_adapter == "a"
    for name, seed, r in [("b", 2, 4), ("a", 1, 2), ("c", 3, 3)]:
        pm.set_adapter(name)
        torch.testing.assert_close(pm(ids).logits, alone(seed, r, ids), rtol=0, atol=0)
        trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in n for n in trainable)  # only the active adapter trains


def test_mixed_batch_rows_equal_each_adapter_alone():
    pm = three_adapters()
    ids = batch(B=5, T=9)["input_ids"]
    names = ["b", "__base__", "a", "c", "b"]
    out = pm(ids, adapter_names=names).logits
    with pm.disable_adapter():
        base = pm(ids).logits
    ref = {"a": alone(1, 2, ids), "b": alone(2, 4, ids), "c": alone(3, 3, ids), "__base__": base}
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], ref[n][i], rtol=1e-12, atol=1e-12)
    # generation too: each row's tokens equal that adapter's own generation
    gen = pm.generate(ids[:3, :4], max_new_tokens=6, adapter_names=["c", "a", "__base__"])
    for i, n in enumerate(["c", "a"]):
        pm.set_adapter(n)
        assert torch.equal(gen[i], pm.generate(ids[i : i + 1, :4], max_new_tokens=6)[0])


def test_mixed_batch_errors():
    pm = three_adapters()
    ids = batch(B=2)["input_ids"]
    with pytest.raises(ValueError, match="adapter_names has 3 names for a batch of 2 rows"):
        pm(ids, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"unknown adapter names \['z'\]"):
        pm(ids, adapter_names=["a", "z"])
    pm.merge_adapter()
    with pytest.raises(ValueError, match="mixed batches need unmerged adapters"):
        pm(ids, adapter_names=["a", "b"])
    dora = get_peft_model(tiny_model(), lora(2, 1, use_dora=True))
    with pytest.raises(ValueError, match=r"mixed batches do not work with DoRA adapters \(\['default'\]\)"):
        dora(ids, adapter_names=["default", "__base__"])


def delta(layer, name):
    return layer.merged_weight(name) - layer.base_layer.weight


def test_cat_combination_is_the_exact_weighted_sum():
    pm = three_adapters()
    pm.add_weighted_adapter(["a", "b"], [0.7, -1.3], "ab", combination_type="cat")
    assert pm.peft_config["ab"].r == 6
    for _, layer in pm.tuner_layers():
        expected = 0.7 * delta(layer, "a") - 1.3 * delta(layer, "b")
        torch.testing.assert_close(delta(layer, "ab"), expected, rtol=1e-12, atol=1e-14)


def test_svd_combination_error_is_the_discarded_spectrum():
    pm = three_adapters()
    errors = pm.add_weighted_adapter(["a", "b", "c"], [1.0, 0.5, 2.0], "abc", combination_type="svd", svd_rank=3)
    for name, layer in pm.tuner_layers():
        exact = delta(layer, "a") + 0.5 * delta(layer, "b") + 2.0 * delta(layer, "c")  # rank <= 9
        got = delta(layer, "abc")
        assert torch.linalg.matrix_rank(got) == 3
        S = torch.linalg.svdvals(exact)
        assert errors[name] == pytest.approx((S[3:] ** 2).sum().item(), rel=1e-9)
        assert ((exact - got) ** 2).sum().item() == pytest.approx(errors[name], rel=1e-9)  # Eckart-Young
        assert errors[name] > 0


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_weighted_adapter_matches_hf_peft(tmp_path, combination_type):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    ids = batch(T=8)["input_ids"]
    hp = peft.get_peft_model(
        hf,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="x",
    )
    hp.add_adapter(
        "y", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    hp.save_pretrained(str(tmp_path))  # PEFT: "default" at the root, any other name in <dir>/<name>/
    mine = PeftModel.from_pretrained(ours, tmp_path / "x", adapter_name="x")
    mine.load_adapter(tmp_path / "y", "y")
    hp.add_weighted_adapter(["x", "y"], [0.6, 1.5], "xy", combination_type=combination_type)
    mine.add_weighted_adapter(["x", "y"], [0.6, 1.5], "xy", combination_type=combination_type)
    hp.set_adapter("xy")
    mine.set_adapter("xy")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, hp(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_and_load_several_adapters(tmp_path):
    pm = get_peft_model(tiny_model(), lora(2, 1))  # "default" at the root
    pm.add_adapter("b", lora(4, 2))
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_model.safetensors").is_file()
    ids = batch()["input_ids"]
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    for name in ("default", "b"):
        pm.set_adapter(name)
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=0, atol=0)


def test_delete_adapter_frees_parameters_and_unwraps():
    pm = three_adapters()
    n_all = pm.num_parameters()
    b_params = sum(p.numel() for p in pm.adapter_parameters("b").values())
    pm.delete_adapter("b")
    assert pm.adapters == ["a", "c"] and pm.num_parameters() == n_all - b_params
    assert not any("b" in layer.lora_A for _, layer in pm.tuner_layers())
    pm.delete_adapter("a")
    pm.delete_adapter("c")
    assert not any(isinstance(m, LoraLayer) for m in pm.modules())  # back to the plain base
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        pm.delete_adapter("b")


def test_name_errors_and_incompatible_base(tmp_path):
    pm = three_adapters()
    with pytest.raises(ValueError, match="adapter name 'a' already exists"):
        pm.add_adapter("a", lora(2, 1))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        pm.set_adapter("nope")
    with pytest.raises(ValueError, match="bad adapter name '__base__'"):
        pm.add_adapter("__base__", lora(2, 1))
    with pytest.raises(ValueError, match="'linear' needs adapters of one rank, got ranks \\[2, 4\\]"):
        pm.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="linear")
    with pytest.raises(ValueError, match="unknown combination_type 'ties'"):
        pm.add_weighted_adapter(["a", "b"], [1, 1], "ab", combination_type="ties")
    other = get_peft_model(tiny_model(hidden_size=32, intermediate_size=48), lora(2, 1))
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has shape \(2, 32\) in the file but \(2, 64\) in the model"):
        pm.load_adapter(tmp_path, "other")
    assert pm.adapters == ["a", "b", "c"]  # nothing half-added
