"""The reference transformer against transformers' Llama/Qwen2 and against finite differences."""

import pytest
import torch
from helpers import TINY, batch, hf_llama, tiny_model

from minipeft.gradcheck import finite_difference_check
from minipeft.model import ModelConfig, Transformer

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA, tied
        {"num_key_value_heads": 4, "tie_word_embeddings": False},  # MHA, untied
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
        {"attention_bias": True, "mlp_bias": True},
        {"head_dim": 32},  # head_dim != hidden / heads
    ],
    ids=["gqa-tied", "mha-untied", "llama3-rope", "biases", "head-dim"],
)
def test_logits_and_loss_match_transformers_llama(overrides):
    hf, ours = hf_llama(**overrides)
    assert list(ours.state_dict()) == list(hf.state_dict())  # same keys, same order
    b = batch(T=40)
    with torch.no_grad():
        ref = hf(b["input_ids"], labels=b["labels"])
        out = ours(b["input_ids"], labels=b["labels"])
    assert rel(out.logits, ref.logits) < 1e-5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


def test_logits_match_transformers_qwen2_biases():
    import transformers

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items()}
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg, attn_implementation="sdpa")).eval()
    for name, p in hf.named_parameters():  # HF zero-inits biases: make them matter
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
    ours = Transformer(ModelConfig(**cfg, attention_bias=True, attention_out_bias=False)).eval()
    ours.load_state_dict(hf.state_dict())
    ids = batch(T=20)["input_ids"]
    with torch.no_grad():
        assert rel(ours(ids).logits, hf(ids).logits) < 1e-5


def test_float64_stays_float64_and_matches_finite_differences():
    model = tiny_model(dtype=torch.float64)
    dtypes = set()

    def record(mod, inp, out):
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        dtypes.add(out.dtype)

    for m in model.modules():
        m.register_forward_hook(record)
    b = batch()
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight, model.model.norm.weight]
    err = finite_difference_check(lambda: model(b["input_ids"], labels=b["labels"]).loss, params, h=1e-5)
    assert dtypes == {torch.float64}
    assert err < 1e-7


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_model(dtype=torch.float64).eval()
    ids = batch(T=16)["input_ids"]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(10, 16):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        # several new tokens at once on top of a cache
        chunk = model(ids[:, 10:], past_key_values=model(ids[:, :10], use_cache=True).past_key_values).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunk, full[:, 10:], rtol=1e-10, atol=1e-10)
    assert cache[0][0].shape == (2, TINY["num_key_value_heads"], 16, TINY["hidden_size"] // TINY["num_attention_heads"])


def test_left_padded_batch_generation_equals_one_by_one():
    model = tiny_model(dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (5, 9, 7)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    out = model.generate(ids, max_new_tokens=8, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8)
        assert torch.equal(out[i, T:], alone[0, len(p) :])


def test_greedy_generate_equals_transformers():
    hf, ours = hf_llama(seed=4)
    ids = batch(T=6, B=2)["input_ids"]
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref)


def test_sampling_limits_and_eos():
    model = tiny_model(dtype=torch.float32).eval()
    ids = batch(T=5, B=2)["input_ids"]
    greedy = model.generate(ids, max_new_tokens=6)
    assert greedy.shape == (2, 11) and torch.equal(greedy[:, :5], ids)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0.7, top_p=1e-9, generator=g), greedy)
    eos = int(greedy[0, 5])  # the first token row 0 produces: generation stops there for that row
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()


def test_context_overflow_is_a_clear_error():
    model = tiny_model(dtype=torch.float32)
    too_long = torch.zeros(1, TINY["max_position_embeddings"] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the context max_position_embeddings=64"):
        model(too_long)
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ max_new_tokens=10 exceeds the context of 64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_bad_config_and_inputs():
    with pytest.raises(
        ValueError, match="num_attention_heads \\(4\\) must be a multiple of num_key_value_heads \\(3\\)"
    ):
        ModelConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        Transformer(ModelConfig(**{**TINY, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_bf16_model_keeps_float32_rotary_and_runs():
    model = tiny_model(dtype=torch.float32).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    b = batch()
    out = model(b["input_ids"], labels=b["labels"])
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(dtype=torch.float64)
    b = batch(pad_left=2)
    kw = dict(labels=b["labels"], attention_mask=b["attention_mask"])
    model(b["input_ids"], **kw).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()
    model(b["input_ids"], **kw).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-15)


def test_compile_blocks_is_used_while_training_only_and_follows_adapter_changes():
    """compile_blocks with a recording backend: graphs are captured in train mode, never in eval; the compiled
    blocks give eager's loss and gradients, and re-trace (dynamo's guards) when the active adapter changes."""
    from minipeft import LoraConfig, get_peft_model

    graphs = []

    def backend(gm, example_inputs):  # record the graph, run it as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = get_peft_model(
        tiny_model(torch.float64), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    b = batch()
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        model.zero_grad()
        out = model(b["input_ids"], labels=b["labels"])
        out.loss.backward()
        expected[name] = out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    keys = list(model.state_dict())
    model.compile_blocks(backend=backend)
    assert list(model.state_dict()) == keys  # the compiled wrappers are not submodules: files do not change
    model.eval()
    model(b["input_ids"])
    assert graphs == []  # eval (and generate) stay eager
    model.train()
    for name in ("default", "other", "default"):
        model.set_adapter(name)
        model.zero_grad()
        out = model(b["input_ids"], labels=b["labels"])
        out.loss.backward()
        assert abs(out.loss.item() - expected[name][0]) < 1e-12
        for n, grad in expected[name][1].items():
            torch.testing.assert_close(dict(model.named_parameters())[n].grad, grad, rtol=1e-10, atol=1e-14)
    assert len(graphs) >= 2  # one per adapter configuration at least


# ---- Mistral's sliding window --------------------------------------------------------------------------------------
def hf_mistral(window, attn, seed=0):
    """A random transformers MistralForCausalLM with a sliding window, and our Transformer with its weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MistralConfig(**TINY, sliding_window=window, attn_implementation=attn)
    hf = transformers.MistralForCausalLM(config).eval()
    ours = Transformer(ModelConfig(**TINY, sliding_window=window)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad_left", [0, 5])
def test_sliding_window_matches_transformers_mistral(attn, pad_left):
    hf, ours = hf_mistral(window=5, attn=attn)
    b = batch(T=16, pad_left=pad_left)
    mask = b["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # ours counts positions from the first real token; HF must be told
    with torch.no_grad():
        ref = hf(b["input_ids"], attention_mask=mask, position_ids=pos).logits
        out = ours(b["input_ids"], attention_mask=mask if pad_left else None).logits
        full = Transformer(ModelConfig(**TINY)).eval()
        full.load_state_dict(ours.state_dict())
        no_window = full(b["input_ids"], attention_mask=mask if pad_left else None).logits
    real = mask.bool()  # padding queries' outputs are not compared (each side fills them its own way)
    assert rel(out[real], ref[real]) < 1e-5
    assert rel(no_window[real], ref[real]) > 1e-3  # the window matters for this sequence


def test_sliding_window_with_kv_cache_and_generate():
    hf, ours = hf_mistral(window=4, attn="sdpa", seed=2)
    ours = ours.double()
    ids = batch(T=14)["input_ids"]
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(6, 14):  # one token at a time: the cache holds more keys than the window lets it see
            out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        chunk = ours(ids[:, 9:], past_key_values=ours(ids[:, :9], use_cache=True).past_key_values).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunk, full[:, 9:], rtol=1e-10, atol=1e-10)
    ref = hf.generate(ids[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.float().generate(ids[:, :6], max_new_tokens=12), ref)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer, got 2.5"),
        (dict(vocab_size=True), "vocab_size must be a positive integer, got True"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer, got 0"),
        (dict(sliding_window=0), "sliding_window must be a positive integer, got 0"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(hidden_size=66), "hidden_size \\(66\\) is not a multiple of num_attention_heads \\(4\\)"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number >= 0, got -1e-06"),
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number >= 0, got nan"),
        (dict(rope_theta=0.0), "rope_theta must be a finite number > 0, got 0.0"),
        (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0, got inf"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "original_max_position_embeddings'\\] must be"),
        (dict(rope_scaling=[1.0]), "rope_scaling must be a dict or None, got \\[1.0\\]"),
        (dict(rope_scaling="linear"), "rope_scaling must be a dict or None, got 'linear'"),
        (dict(rope_scaling={"rope_type": ["linear"]}), "unsupported rope_scaling type \\['linear'\\]"),
    ],
)
def test_model_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **overrides})
