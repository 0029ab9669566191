"""Checks for lesson 05's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/prompt.py's PromptEncoder, run through a small model); it raises AssertionError saying what
differs, never what the answer is."""

import torch
from common import check_close


def _tiny_model():
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Transformer(cfg).double()


def check_prepend_prompt(prepend_prompt):
    """Run a small float64 model on your inputs_embeds and labels: the loss and the real tokens' logits must be
    those of the library's prompt tuning (PEFT's semantics) with the same prompt."""
    from minipeft.peft import get_peft_model
    from minipeft.prompt import PromptTuningConfig

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 7), generator=g)
    labels = x.clone()
    labels[1, :3] = -100  # a row whose first tokens are not targets (a prompt/response pair, say)
    P = 3
    torch.manual_seed(2)
    peft_model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=P))
    prompt = peft_model.prompt_encoder["default"].embedding.weight.detach()  # (P, D), N(0, 1)
    with torch.no_grad():
        expected = peft_model(x, labels=labels)
        out = prepend_prompt(prompt, model.model.embed_tokens(x), labels)
        assert isinstance(out, tuple) and len(out) == 2, "return a pair: (inputs_embeds, labels)"
        embeds, padded = out
        assert tuple(embeds.shape) == (2, P + 7, 32), f"inputs_embeds shape {tuple(embeds.shape)}, expected (B, P+T, D)"
        assert tuple(padded.shape) == (2, P + 7), f"labels shape {tuple(padded.shape)}, expected (B, P + T)"
        ours = model(inputs_embeds=embeds, labels=padded)
    check_close("the logits at the real tokens' positions", ours.logits[:, P:], expected.logits, 1e-10, 1e-12)
    check_close("the loss", ours.loss, expected.loss, rtol=1e-10, atol=1e-12)


class _Tokenizer:  # what get_peft_model needs for the TEXT init: encode(text) -> ids
    def __init__(self, ids):
        self.ids = ids

    def encode(self, text):
        return list(self.ids)


def check_text_init_ids(text_init_ids):
    """Against the library's TEXT init: the prompt it builds must be the embedding rows of your ids."""
    from minipeft.peft import get_peft_model
    from minipeft.prompt import PromptTuningConfig

    model = _tiny_model()
    embed = model.model.embed_tokens.weight.detach()
    for ids, P in [([5, 9, 2], 8), ([5, 9, 2], 3), ([7, 1, 4, 3, 8], 2), ([11], 4), ([3, 6], 5)]:
        config = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text="-")
        expected = get_peft_model(model, config, tokenizer=_Tokenizer(ids)).prompt_encoder["default"].embedding
        ours = text_init_ids(list(ids), P)
        assert len(ours) == P, f"ids {ids}, P = {P}: you gave {len(ours)} ids, the prompt has P rows"
        assert all(isinstance(i, int) for i in ours), "expected a list of ints (token ids)"
        rows = [j for j in range(P) if not torch.equal(embed[ours[j]], expected.weight[j].detach())]
        assert not rows, f"ids {ids}, P = {P}: virtual tokens {rows} start from the wrong token"


CHECKS = {"prepend_prompt": check_prepend_prompt, "text_init_ids": check_text_init_ids}
