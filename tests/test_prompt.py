"""Prompt tuning: the soft prompt against the full model on [p; x], labels, init modes, freezing, saving,
generation, HF PEFT interop, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, hf_llama, tiny_model
from safetensors.torch import load_file, save_file

from minipeft.gradcheck import prompt_gradient_identity
from minipeft.peft import PeftModel, get_peft_model
from minipeft.prompt import PromptTuningConfig

P = 4
P_IDS = torch.tensor([5, 17, 3, 88])  # the real tokens p whose embeddings the prompt is set to


class CharTokenizer:  # any object with .encode(text) -> list[int] will do
    def __init__(self, name_or_path=None):
        if name_or_path:
            self.name_or_path = name_or_path  # recorded as tokenizer_name_or_path, which HF PEFT wants with TEXT

    def encode(self, text):
        return [ord(c) % 97 for c in text]


def greedy_without_cache(model, ids, n, mask=None):
    """The reference for generate: recompute the whole forward for every new token, no KV cache."""
    for _ in range(n):
        logits = model(ids, attention_mask=mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
    return ids


def prompted(model=None, tokenizer=None, **kw):
    model = tiny_model() if model is None else model
    return get_peft_model(model, PromptTuningConfig(num_virtual_tokens=P, **kw), tokenizer=tokenizer)


@pytest.mark.parametrize("pad_left", [0, 3])
def test_prompt_of_real_tokens_equals_full_model_on_p_then_x(pad_left):
    b1 = batch(pad_left=pad_left)
    if not pad_left:
        del b1["attention_mask"]
    pm = prompted()
    errors = prompt_gradient_identity(pm, b1, P_IDS)
    assert errors["logits"] < 1e-12 and errors["prompt"] < 1e-12, errors
    # not vacuous: the prompt gets a gradient, and the random prompt gives other logits than p's embeddings
    b1 = batch(pad_left=pad_left)
    out = pm(b1["input_ids"], attention_mask=b1["attention_mask"], labels=b1["labels"])
    out.loss.backward()
    assert pm.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    mask = torch.cat([torch.ones(2, P, dtype=torch.long), b1["attention_mask"]], 1)
    ref = pm.base_model(torch.cat([P_IDS.expand(2, P), b1["input_ids"]], 1), attention_mask=mask).logits[:, P:]
    assert (out.logits - ref).abs().max() > 1e-3


def test_logits_are_real_tokens_only_and_loss_has_last_virtual_predict_first_real():
    pm = prompted()
    b1 = batch()
    out = pm(b1["input_ids"], labels=b1["labels"])
    assert out.logits.shape == (2, 12, 97)  # (B, T, V); HF PEFT would give (B, P + T, V)
    # By hand: the base model on [prompt; x]; position P-1+t predicts token t, for t = 0 .. T-1, except the last.
    prompt = pm.prompt_encoder["default"].embedding.weight
    embeds = torch.cat([prompt.expand(2, P, 64), pm.base_model.model.embed_tokens(b1["input_ids"])], 1)
    full = pm.base_model(inputs_embeds=embeds).logits  # (B, P + T, V)
    torch.testing.assert_close(out.logits, full[:, P:], rtol=0, atol=0)
    predicting = full[:, P - 1 : -1]  # (B, T, V): the last virtual token predicts the first real one
    expected = F.cross_entropy(predicting.reshape(-1, 97), b1["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)


def test_init_modes():
    model = tiny_model()
    embed = model.model.embed_tokens.weight
    torch.manual_seed(3)
    sampled = prompted(model, prompt_tuning_init="SAMPLE_VOCAB").prompt_encoder["default"].embedding.weight
    rows = (sampled[:, None, :] == embed[None]).all(-1)  # (P, V): which vocabulary row each prompt row is
    assert (rows.sum(1) == 1).all()  # every prompt row is exactly one token's embedding
    tok = CharTokenizer()
    for text, ids in [("ab", [0, 1, 0, 1]), ("abcdef", [0, 1, 2, 3])]:  # repeated, truncated to P (a = 97 % 97 = 0)
        pm = prompted(tiny_model(), prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer=tok)
        assert tok.encode(text)[:2] == [0, 1]
        torch.testing.assert_close(pm.prompt_encoder["default"].embedding.weight, embed[ids], rtol=0, atol=0)
    random = prompted().prompt_encoder["default"].embedding.weight
    assert 0.5 < random.std() < 1.5  # N(0, 1) like nn.Embedding, as PEFT


def test_freezing_and_count():
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    pm = prompted(model)
    assert pm.num_parameters(trainable_only=True) == P * 64  # P x hidden
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
    pm = prompted()
    ids = batch()["input_ids"]
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, tiny_model()(ids).logits, rtol=0, atol=0)
    pm.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "adapter_raw.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = dict(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=64)
    expected.update(num_attention_heads=4, num_layers=2, num_transformer_submodules=1, prompt_tuning_init="RANDOM")
    assert {k: cfg[k] for k in expected} == expected
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (P, 64)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, pm(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True).num_parameters(True) == P * 64
    # a TEXT-initialised adapter loads without a tokenizer: the weights come from the file
    text = prompted(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer=CharTokenizer("chars"))
    text.save_pretrained(tmp_path / "text")
    cfg = json.loads((tmp_path / "text" / "adapter_config.json").read_text())
    assert (cfg["prompt_tuning_init"], cfg["prompt_tuning_init_text"], cfg["tokenizer_name_or_path"]) == (
        "TEXT",
        "hi",
        "chars",
    )
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_model(), tmp_path / "text")(ids).logits, text(ids).logits)
    other = tiny_model(hidden_size=32, intermediate_size=48)
    with pytest.raises(ValueError, match=r"token_dim=64 does not fit this model, which has token_dim=32"):
        PeftModel.from_pretrained(other, tmp_path)
    save_file(
        {"prompt_embeddings": state["prompt_embeddings"][:3].contiguous()}, tmp_path / "adapter_model.safetensors"
    )
    with pytest.raises(
        ValueError, match=r"prompt_embeddings has shape \(3, 64\) in the file but \(4, 64\) in the model"
    ):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


@pytest.mark.parametrize("pad_left", [0, 2])
def test_generate_with_cache_equals_recomputing(pad_left):
    pm = prompted()
    b1 = batch(T=6, pad_left=pad_left)
    mask = b1["attention_mask"] if pad_left else None
    out = pm.generate(b1["input_ids"], max_new_tokens=6, attention_mask=mask)
    torch.testing.assert_close(out, greedy_without_cache(pm, b1["input_ids"], 6, mask), rtol=0, atol=0)
    full_mask = None if mask is None else F.pad(mask, (0, 6), value=1)
    with torch.no_grad():
        adapted = pm(out, attention_mask=full_mask).logits
        with pm.disable_adapter():
            base = pm(out, attention_mask=full_mask).logits
    assert (adapted - base).abs().max() > 1e-3  # not vacuous: the prompt changes the predictions


def test_interop_with_hf_peft_both_ways(tmp_path):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    ids = batch(T=10)["input_ids"]
    mask = torch.ones_like(ids)
    # ours -> PEFT (TEXT init: PEFT insists on a tokenizer name for it; ours has none, so the file says RANDOM)
    pm = prompted(ours, prompt_tuning_init="TEXT", prompt_tuning_init_text="soft prompt", tokenizer=CharTokenizer())
    pm.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["prompt_tuning_init"] == "RANDOM"
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    with torch.no_grad():
        ref = hp(ids, attention_mask=mask).logits  # (B, P + T, V)
        assert ref.shape[1] == P + 10
        torch.testing.assert_close(pm(ids, attention_mask=mask).logits, ref[:, P:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pm.generate(ids, 4), greedy_without_cache(lambda x, attention_mask: hp(x), ids, 4))
    # PEFT -> ours
    hf2, ours2 = hf_llama(seed=7, tie_word_embeddings=False)
    hp2 = peft.get_peft_model(hf2, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    hp2.save_pretrained(str(tmp_path / "peft"))
    mine = PeftModel.from_pretrained(ours2, tmp_path / "peft")
    with torch.no_grad():
        ref = hp2.eval()(ids, attention_mask=mask).logits[:, P:]
        torch.testing.assert_close(mine(ids, attention_mask=mask).logits, ref, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_and_position_ids_give_the_same_model():
    pm = prompted()
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
        (dict(num_virtual_tokens=-3), "num_virtual_tokens must be a positive integer, got -3"),
        (dict(prompt_tuning_init="VOCAB"), r"must be one of \['RANDOM', 'SAMPLE_VOCAB', 'TEXT'\], got 'VOCAB'"),
        (dict(prompt_tuning_init="TEXT"), "prompt_tuning_init='TEXT' needs prompt_tuning_init_text"),
        (dict(num_transformer_submodules=2), "num_transformer_submodules must be 1"),
    ],
)
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PromptTuningConfig(**kw)


def test_bad_input_at_build_and_run():
    with pytest.raises(ValueError, match="prompt_tuning_init='TEXT' needs the model's tokenizer"):
        prompted(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="num_virtual_tokens=64 leaves no room for a real token"):
        get_peft_model(tiny_model(), PromptTuningConfig(num_virtual_tokens=64))
    pm = prompted()
    too_long = torch.zeros(1, 64 - P + 1, dtype=torch.long)  # fits the context alone, not with the prompt
    with pytest.raises(ValueError, match=r"61 tokens \(\+ 0 cached\) \+ 4 virtual tokens of the prompt exceed"):
        pm(too_long)
    with pytest.raises(ValueError, match="exceeds the context"):
        pm.generate(torch.zeros(1, 58, dtype=torch.long), max_new_tokens=3)
