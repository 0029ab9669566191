"""Decoding: the sampling loop shared by Transformer.generate and PeftModel.generate.

One forward over the prompt fills the KV cache; then each step feeds the one new token per row, samples the
next from the last position's logits (greedy, temperature, top-k, top-p) and appends it. Left-padded batches
carry their attention_mask along; rows that produced eos keep emitting eos.
"""

import math

import torch


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, max_len):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0 or not math.isfinite(temperature) or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"bad sampling settings: max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}"
        )
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if input_ids.size(1) + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {input_ids.size(1)} tokens + max_new_tokens={max_new_tokens} exceeds the context "
            f"of {max_len} tokens (max_position_embeddings)"
        )


def generate(
    model,
    input_ids,
    max_new_tokens=32,
    temperature=0.0,
    top_k=None,
    top_p=None,
    eos_token_id=None,
    attention_mask=None,
    generator=None,
    max_len=None,
    **forward_kwargs,
):
    """The decoding loop, shared by Transformer and PeftModel (`model` is anything with the forward above)."""
    max_len = max_len or model.config.max_position_embeddings
    check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, max_len)
    was_training = model.training
    model.eval()
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    eos_t = torch.tensor(sorted(eos), device=input_ids.device)
    done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    out, cache, step_ids = input_ids, None, input_ids
    for _ in range(max_new_tokens):
        out_ = model(step_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **forward_kwargs)
        cache = out_.past_key_values
        nxt = sample_next(out_.logits[:, -1], temperature, top_k, top_p, generator)
        if eos:
            nxt = torch.where(done, eos_t[0], nxt)
            done |= torch.isin(nxt, eos_t)
        out = torch.cat([out, nxt[:, None]], dim=1)
        step_ids = nxt[:, None]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)
        if eos and bool(done.all()):
            break
    model.train(was_training)
    return out
