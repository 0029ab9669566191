"""Prefix tuning: the prefix against the full model's KV cache, the MLP's chain rule, layout, freezing, saving,
generation, HF PEFT interop, bad input."""

import json

import pytest
import torch
from helpers import batch, hf_llama, tiny_model
from safetensors.torch import load_file, save_file

from minipeft.gradcheck import prefix_gradient_identity
from minipeft.peft import PeftModel, get_peft_model
from minipeft.prefix import PrefixEncoder, PrefixTuningConfig

P = 4
P_IDS = torch.tensor([5, 17, 3, 88])  # the real tokens p whose keys/values the prefix is set to
L, K, HD = 2, 2, 16  # tiny model: layers, kv heads (GQA: 4 query heads), head_dim
TABLE = L * 2 * K * HD  # one row of the prefix table


def greedy_without_cache(model, ids, n, mask=None):
    """The reference for generate: recompute the whole forward for every new token, no KV cache."""
    for _ in range(n):
        logits = model(ids, attention_mask=mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
    return ids


def prefixed(model=None, **kw):
    model = tiny_model() if model is None else model
    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=P, **kw))


def batches():
    no_mask = batch()
    del no_mask["attention_mask"]
    return [no_mask, batch(pad_left=3)]


@pytest.mark.parametrize("b1", batches(), ids=["no-mask", "left-padded"])
def test_prefix_of_real_tokens_equals_full_model_on_p_then_x(b1):
    pm = prefixed()
    errors = prefix_gradient_identity(pm, b1, P_IDS)
    assert errors["logits"] < 1e-12 and errors["prefix"] < 1e-12, errors
    errors = prefix_gradient_identity(pm, b1)  # the random prefix: only the gradient identity applies
    assert errors["prefix"] < 1e-12, errors


def test_identity_catches_a_wrong_layout(monkeypatch):
    """Keys and values swapped (or heads and layers mixed up) in the table: the check fails loudly."""
    right = PrefixEncoder.past_key_values
    monkeypatch.setattr(PrefixEncoder, "past_key_values", lambda self, B, dt: [(v, k) for k, v in right(self, B, dt)])
    errors = prefix_gradient_identity(prefixed(), batch(), P_IDS)
    assert errors["logits"] > 0.1 and errors["prefix"] > 0.1, errors


@pytest.mark.parametrize("b1", batches(), ids=["no-mask", "left-padded"])
def test_projection_gradients_follow_the_chain_rule(b1):
    pm = prefixed(prefix_projection=True, encoder_hidden_size=24)
    errors = prefix_gradient_identity(pm, b1)
    assert set(errors) == {"embedding.weight", "transform.0.weight", "transform.0.bias"} | {
        "transform.2.weight",
        "transform.2.bias",
    }
    assert max(errors.values()) < 1e-12, errors
    pm(b1["input_ids"], attention_mask=b1.get("attention_mask"), labels=b1["labels"]).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in pm.prompt_encoder.parameters())  # not vacuous


@pytest.mark.parametrize("projection", [False, True])
def test_freezing_and_count(projection):
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    E, td = 24, K * HD
    pm = prefixed(model, prefix_projection=projection, encoder_hidden_size=E)
    # the table: P x L*2*K*hd; the MLP: embedding P x td, Linear(td, E), Linear(E, L*2*td), with biases
    expected = P * td + td * E + E + E * TABLE + TABLE if projection else P * TABLE
    assert pm.num_parameters(trainable_only=True) == expected
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    b1 = batch()
    for _ in range(3):
        opt.zero_grad()
        pm(b1["input_ids"], labels=b1["labels"]).loss.backward()
        for n, p in pm.named_parameters():
            assert (p.grad is not None) == p.requires_grad == n.startswith("prompt_encoder."), n
        opt.step()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_save_load_round_trip_and_disable(tmp_path):
    pm = prefixed()
    ids = batch()["input_ids"]
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, tiny_model()(ids).logits, rtol=0, atol=0)
    assert (pm(ids).logits - tiny_model()(ids).logits).abs().max() > 1e-3
    pm.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "adapter_raw.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = dict(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=K * HD)
    expected.update(num_attention_heads=K, num_layers=L, num_transformer_submodules=1, prefix_projection=False)
    assert {k: cfg[k] for k in expected} == expected and cfg["encoder_hidden_size"] == K * HD
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (P, TABLE)
    # layout [P, 2L, K, hd]: layer 1's value is block 3; the cache holds it as (B, K, P, hd)
    cache = pm(ids, use_cache=True).past_key_values
    torch.testing.assert_close(
        cache[1][1][0, :, :P], state["prompt_embeddings"].view(P, 2 * L, K, HD)[:, 3].transpose(0, 1)
    )
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    # a file of the wrong shape: named key, both shapes, nothing left behind
    save_file(
        {"prompt_embeddings": state["prompt_embeddings"][:, :-1].contiguous()}, tmp_path / "adapter_model.safetensors"
    )
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"prompt_embeddings has shape \(4, 127\) in the file but \(4, 128\) in the model"
    ):
        PeftModel.from_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match=r"num_layers=2 does not fit this model, which has num_layers=1"):
        PeftModel.from_pretrained(tiny_model(num_hidden_layers=1), tmp_path)


def test_projection_round_trip_resumes_the_mlp(tmp_path):
    pm = prefixed(prefix_projection=True, encoder_hidden_size=24)
    ids = batch()["input_ids"]
    pm.save_pretrained(tmp_path)
    raw = load_file(tmp_path / "adapter_raw.safetensors")
    assert sorted(raw) == [
        "embedding.weight",
        "transform.0.bias",
        "transform.0.weight",
        "transform.2.bias",
        "transform.2.weight",
    ]
    resumed = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    enc = resumed.prompt_encoder["default"]
    assert enc.prefix_projection and all(p.requires_grad for p in enc.parameters())
    assert resumed.num_parameters(trainable_only=True) == pm.num_parameters(trainable_only=True)
    torch.testing.assert_close(resumed(ids).logits, pm(ids).logits, rtol=0, atol=0)
    # Without our raw file (as PEFT writes it): the projected table, kept fixed, with a warning.
    (tmp_path / "adapter_raw.safetensors").unlink()
    with pytest.warns(UserWarning, match="used as a fixed table"):
        table = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert not table.prompt_encoder["default"].prefix_projection
    assert table.num_parameters() == sum(p.numel() for p in tiny_model().parameters()) + P * TABLE
    torch.testing.assert_close(table(ids).logits, pm(ids).logits, rtol=1e-12, atol=1e-12)
    # Raw parameters from another run than prompt_embeddings: refused.
    model = tiny_model()
    torch.manual_seed(1)  # another initialisation of the MLP
    prefixed(model, prefix_projection=True, encoder_hidden_size=24).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="the two files do not belong together"):
        PeftModel.from_pretrained(tiny_model(), tmp_path / "other")


@pytest.mark.parametrize("pad_left", [0, 2])
def test_generate_with_cache_equals_recomputing(pad_left):
    pm = prefixed()
    b1 = batch(T=6, pad_left=pad_left)
    mask = b1["attention_mask"] if pad_left else None
    out = pm.generate(b1["input_ids"], max_new_tokens=6, attention_mask=mask)
    torch.testing.assert_close(out, greedy_without_cache(pm, b1["input_ids"], 6, mask), rtol=0, atol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_interop_with_hf_peft_both_ways(tmp_path, projection):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)  # GQA: 4 query heads, 2 kv heads
    ids = batch(T=10)["input_ids"]
    mask = torch.ones_like(ids)
    # ours -> PEFT
    pm = prefixed(ours, prefix_projection=projection, encoder_hidden_size=24)
    pm.save_pretrained(tmp_path / "ours")
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(pm(ids, attention_mask=m).logits, hp(ids, attention_mask=m).logits)
        torch.testing.assert_close(pm.generate(ids, 4), greedy_without_cache(lambda x, attention_mask: hp(x), ids, 4))
    # PEFT -> ours
    hf2, ours2 = hf_llama(seed=7, tie_word_embeddings=False)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection)
    hp2 = peft.get_peft_model(hf2, cfg)
    hp2.save_pretrained(str(tmp_path / "peft"))
    if projection:
        with pytest.warns(UserWarning, match="used as a fixed table"):
            mine = PeftModel.from_pretrained(ours2, tmp_path / "peft")
    else:
        mine = PeftModel.from_pretrained(ours2, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids, attention_mask=mask).logits, hp2.eval()(ids, attention_mask=mask).logits)


def test_inputs_embeds_and_position_ids_give_the_same_model():
    pm = prefixed()
    ids = batch()["input_ids"]
    ref = pm(ids).logits
    torch.testing.assert_close(pm(inputs_embeds=pm.base_model.model.embed_tokens(ids)).logits, ref, rtol=0, atol=0)
    positions = torch.arange(12).expand(2, 12)  # the real tokens' own positions 0..T-1, shifted by P inside
    torch.testing.assert_close(pm(ids, position_ids=positions).logits, ref, rtol=0, atol=0)
    assert (pm(ids, position_ids=positions + 1).logits - ref).abs().max() > 1e-6


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0"),
        (dict(num_virtual_tokens=-1), "num_virtual_tokens must be a positive integer, got -1"),
        (dict(encoder_hidden_size=0), "encoder_hidden_size must be a positive integer, got 0"),
        (dict(num_transformer_submodules=2), "num_transformer_submodules must be 1"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PrefixTuningConfig(**kw)


def test_bad_input_at_build_and_run():
    with pytest.raises(ValueError, match="num_virtual_tokens=64 leaves no room for a real token"):
        get_peft_model(tiny_model(), PrefixTuningConfig(num_virtual_tokens=64))
    pm = prefixed()
    too_long = torch.zeros(1, 64 - P + 1, dtype=torch.long)  # fits the context alone, not with the prefix
    with pytest.raises(ValueError, match=r"61 tokens \(\+ 0 cached\) \+ 4 virtual tokens of the prefix exceed"):
        pm(too_long)
    with pytest.raises(ValueError, match="exceeds the context"):
        pm.generate(torch.zeros(1, 58, dtype=torch.long), max_new_tokens=3)
