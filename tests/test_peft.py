"""The shared machinery: target matching, the on-disk format, and every bad input a user can hit."""

import json

import pytest
import torch
from helpers import batch, tiny_model

import minipeft.peft as peft_mod
from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft import PeftModel, find_targets, get_peft_model


def wrapped(pm):
    return sorted(n for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer))


def test_target_modules_forms():
    pm = get_peft_model(tiny_model(), LoraConfig(target_modules="all-linear"))
    assert len(wrapped(pm)) == 2 * 7 and not any("lm_head" in n for n in wrapped(pm))
    pm = get_peft_model(tiny_model(), LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert wrapped(pm) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    pm = get_peft_model(tiny_model(), LoraConfig(target_modules=["mlp.up_proj", "o_proj"]))
    assert wrapped(pm) == [f"model.layers.{i}.{s}" for i in range(2) for s in ("mlp.up_proj", "self_attn.o_proj")]


def test_unknown_targets_list_candidates():
    with pytest.raises(
        ValueError, match=r"matched no Linear layer; candidates: \['down_proj', 'gate_proj', 'k_proj', 'lm_head'"
    ):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="matched no Linear"):
        find_targets(tiny_model(), "layers.0.q_proj")  # a regex must match the full name


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(r=0), "r must be a positive integer, got 0"),
        (dict(r=-2), "r must be a positive integer, got -2"),
        (dict(r=2.5), "r must be an integer, got 2.5"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_alpha=0), "lora_alpha must be positive"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be True, False or 'gaussian'"),
    ],
)
def test_bad_lora_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**kw)


def test_unknown_method_and_double_wrap():
    class NotAMethod:
        peft_type = "IA3"

    with pytest.raises(ValueError, match=r"unknown method NotAMethod; supported: \[.*'LoraConfig'"):
        get_peft_model(tiny_model(), NotAMethod())
    pm = get_peft_model(tiny_model(), LoraConfig())
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(pm, LoraConfig())


def save_adapter(tmp_path, **kw):
    pm = get_peft_model(tiny_model(), LoraConfig(init_lora_weights=False, **kw))
    pm.save_pretrained(tmp_path)
    return pm


def test_mismatched_adapter_names_key_and_shapes(tmp_path):
    save_adapter(tmp_path, r=4)
    other = tiny_model(hidden_size=32, intermediate_size=48)  # another base model
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 64\) in the file but \(4, 32\) in the model"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in other.modules())  # nothing was left half-loaded
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    fewer_layers = tiny_model(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model.model.model.layers.1.self_attn.q_proj"):
        PeftModel.from_pretrained(fewer_layers, tmp_path)


def test_truncated_safetensors_and_bad_config(tmp_path):
    save_adapter(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt or truncated safetensors file"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["peft_type"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no 'peft_type'"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        PeftModel.from_pretrained(tiny_model(), tmp_path / "nope")


def test_unknown_config_keys_warn_but_load(tmp_path):
    pm = save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    cfg["layers_pattern"] = None  # a PEFT default with no effect: silently ignored
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"ignoring keys minipeft does not use: \['some_future_option'\]"):
        loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    ids = batch()["input_ids"]
    torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=0, atol=0)


def test_failing_save_keeps_previous_adapter(tmp_path, monkeypatch):
    pm = save_adapter(tmp_path)
    ids = batch()["input_ids"]
    expected = pm(ids).logits.detach()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
