"""The shared machinery: target matching, the on-disk format, and every bad input a user can hit."""

import json

import pytest
import torch
from helpers import batch, tiny_model

import minipeft.peft_io as peft_io
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
        (dict(init_lora_weights="pissa_fast"), r"init_lora_weights must be True, False, 'gaussian', 'pissa'"),
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

    monkeypatch.setattr(peft_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


# ------------------------------------------------------------------ behaves like HF PEFT (issue 14)


def two_adapters(a=("q_proj",), b=("v_proj",), **kw):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=list(a), init_lora_weights=False, **kw), "a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=list(b), init_lora_weights=False))
    return pm


def test_a_merged_adapter_cannot_be_deleted_and_unmerge_still_works():
    pm = two_adapters()
    base = {n: p.clone() for n, p in pm.base_model.named_parameters() if "base_layer" in n}
    pm.merge_adapter(["b"])
    with pytest.raises(ValueError, match="cannot delete adapter 'b' while it is merged"):
        pm.delete_adapter("b")
    pm.unmerge_adapter()
    assert all(torch.allclose(p, base[n], rtol=0, atol=1e-12) for n, p in pm.base_model.named_parameters() if n in base)
    pm.delete_adapter("b")
    assert pm.adapters == ["a"]


def test_mixed_batch_with_adapters_on_different_modules_equals_each_row_alone():
    pm = two_adapters()
    ids = batch(B=3)["input_ids"]
    mixed = pm(ids, adapter_names=["a", "b", "__base__"]).logits
    for i, name in enumerate(["a", "b"]):
        pm.set_adapter(name)
        torch.testing.assert_close(mixed[i], pm(ids[i : i + 1]).logits[0], rtol=1e-12, atol=1e-12)
    with pm.disable_adapter():
        torch.testing.assert_close(mixed[2], pm(ids[2:3]).logits[0], rtol=1e-12, atol=1e-12)


def test_mixed_batches_refuse_dora_only_for_the_adapters_used():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(), LoraConfig(r=2, init_lora_weights=False), "plain")
    pm.add_adapter("dora", LoraConfig(r=2, use_dora=True, init_lora_weights=False))
    ids = batch()["input_ids"]
    pm(ids, adapter_names=["plain", "__base__"])  # DoRA present but unused: fine
    with pytest.raises(ValueError, match=r"DoRA adapters \(\['dora'\]\)"):
        pm(ids, adapter_names=["plain", "dora"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_merge_and_unload_keeps_a_16_bit_dtype(dtype):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(torch.float32).to(dtype), LoraConfig(r=2, use_dora=True, init_lora_weights=False))
    ids = batch()["input_ids"]
    adapted = pm(ids).logits.float()
    merged = pm.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {dtype}
    out = merged(ids).logits  # the next forward runs (it failed on the dtype mismatch)
    assert (out.float() - adapted).abs().max() < 0.1


def test_load_adapter_keeps_an_inference_model_frozen(tmp_path):
    pm = two_adapters()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "b", adapter_name="b", is_trainable=False)
    result = loaded.load_adapter(tmp_path / "b", "b2")
    assert result.missing_keys == [] and result.unexpected_keys == []  # PEFT's load result
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path / "b", adapter_name="b", is_trainable=True)
    trainable.load_adapter(tmp_path / "b", "b2")  # loaded for inference: stays frozen; "b" stays trainable
    assert {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {"b"}


def test_gradient_checkpointing_through_the_peft_model_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        pm = two_adapters()
        if on:
            pm.gradient_checkpointing_enable()
            assert pm.base_model.gradient_checkpointing
        b = batch()
        pm(b["input_ids"], labels=b["labels"]).loss.backward()
        grads.append([p.grad.clone() for p in pm.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(*grads))


def test_disable_adapter_nests_and_freezes_adapters_inside():
    pm = two_adapters()
    ids = batch()["input_ids"]
    adapted = pm(ids).logits
    with pm.disable_adapter():
        base = pm(ids).logits
        assert not any(p.requires_grad for p in pm.parameters())  # as PEFT: nothing trains while disabled
        with pm.disable_adapter():
            pass
        torch.testing.assert_close(pm(ids).logits, base, rtol=0, atol=0)  # still disabled after the inner block
    torch.testing.assert_close(pm(ids).logits, adapted, rtol=0, atol=0)
    assert any(p.requires_grad for p in pm.parameters())
    pm.disable_adapter_layers()
    torch.testing.assert_close(pm(ids).logits, base, rtol=0, atol=0)
    pm.enable_adapter_layers()
    torch.testing.assert_close(pm(ids).logits, adapted, rtol=0, atol=0)


def test_merge_and_unload_of_named_adapters_and_safe_merge():
    pm = two_adapters()
    ids = batch()["input_ids"]
    ref = two_adapters()
    ref.merge_adapter(["a", "b"])  # in place, one after the other
    expected = ref.base_model(ids).logits
    merged = pm.merge_and_unload(adapter_names=["a", "b"])
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-12, atol=1e-12)
    bad = two_adapters()
    with torch.no_grad():
        next(p for n, p in bad.named_parameters() if "lora_B.a" in n).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or inf weights"):
        bad.merge_and_unload(adapter_names=["a"], safe_merge=True)
    assert bad.tuner_layers()  # refused before anything was replaced


@pytest.mark.parametrize("cls", ["LoraConfig", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig"])
def test_every_config_takes_peft_bookkeeping_and_round_trips_through_files(tmp_path, cls):
    import minipeft

    config = getattr(minipeft, cls)(task_type="CAUSAL_LM", inference_mode=False, base_model_name_or_path="x")
    d = config.to_dict()
    assert d["peft_type"] == config.peft_type and d["task_type"] == "CAUSAL_LM" and d["inference_mode"] is True
    config.save_pretrained(tmp_path)
    again = type(config).from_pretrained(tmp_path)
    assert again.to_dict() == d and type(again) is type(config)
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS' is not supported"):
        getattr(minipeft, cls)(task_type="SEQ_CLS")


def test_peft_accessors():
    pm = two_adapters()
    assert pm.active_adapters == ["a"] and pm.get_base_model() is pm.base_model
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * (64 * 2 + 2 * 64) and total == sum(p.numel() for p in pm.parameters())
    out = pm(batch()["input_ids"], labels=batch()["labels"])
    assert out[0] is out.loss and out[1] is out.logits  # indexable as transformers' outputs


def test_target_modules_none_is_peft_default_and_init_false_randomises_a_and_b():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=None, init_lora_weights=False))
    assert pm.peft_config["default"].target_modules == ("q_proj", "v_proj")
    for _, layer in pm.tuner_layers():
        for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            bound = 1 / w.shape[1] ** 0.5  # nn.Linear's kaiming-uniform(a=sqrt(5)) bound: 1/sqrt(fan_in)
            assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound


def test_prompt_tuning_counts_the_target_its_last_virtual_token_predicts():
    """Micro-batches weighted by num_targets give exactly the mean loss of one big batch: with prompt tuning the
    first real token of each row is a target too, and num_targets counts it."""
    from minipeft import PromptTuningConfig

    torch.manual_seed(0)
    pm = get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=3))
    b = batch(B=4, pad_left=0)
    labels = b["labels"].clone()
    labels[0, 5:] = -100  # rows with different numbers of targets
    labels[2, 9:] = -100
    halves = [slice(0, 2), slice(2, 4)]
    n = [pm.num_targets(labels[h]) for h in halves]
    assert n == [int((labels[h] != -100).sum()) for h in halves]  # every label, the first one included
    whole = pm(b["input_ids"], labels=labels).loss
    parts = sum(pm(b["input_ids"][h], labels=labels[h]).loss * k / sum(n) for h, k in zip(halves, n))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_left_padding_changes_nothing_for_prefix_and_prompt_tuning(method):
    """Our positions count real tokens only (from the attention mask), so a left-padded row gives exactly the
    logits of the same row without padding. HF PEFT differs here (our choice, stated in the README): transformers numbers the
    positions of a forward without position_ids by a plain range, pads included (README, Scope)."""
    from minipeft import PrefixTuningConfig, PromptTuningConfig

    torch.manual_seed(0)
    config = (
        PrefixTuningConfig(num_virtual_tokens=3) if method == "prefix" else PromptTuningConfig(num_virtual_tokens=3)
    )
    pm = get_peft_model(tiny_model(), config)
    b = batch(B=2, T=10, pad_left=4)
    padded = pm(b["input_ids"], attention_mask=b["attention_mask"]).logits
    alone = pm(b["input_ids"][:1, 4:]).logits
    torch.testing.assert_close(padded[0, 4:], alone[0], rtol=1e-10, atol=1e-12)
