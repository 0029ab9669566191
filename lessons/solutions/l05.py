"""Solutions to lesson 05's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import math

import torch


def prepend_prompt(prompt, embeds, labels):
    B, P = embeds.size(0), prompt.size(0)
    embeds = torch.cat([prompt[None].expand(B, -1, -1).to(embeds.dtype), embeds], dim=1)  # (B, P + T, D)
    labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)  # no loss at the virtual positions
    return embeds, labels


def text_init_ids(ids, P):
    return (ids * math.ceil(P / len(ids)))[:P]  # repeat the text's ids, then cut to P (as PEFT)


def _pad_with_zeros(prompt, embeds, labels):  # 0 is a token id: the virtual positions then get a loss
    B, P = embeds.size(0), prompt.size(0)
    embeds = torch.cat([prompt[None].expand(B, -1, -1), embeds], dim=1)
    return embeds, torch.cat([labels.new_zeros((B, P)), labels], dim=1)


def _repeat_each_id(ids, P):  # each id repeated in place (a a b b c c) instead of the whole text (a b c a b c)
    return [i for i in ids for _ in range(math.ceil(P / len(ids)))][:P]


MISTAKES = {"prepend_prompt": _pad_with_zeros, "text_init_ids": _repeat_each_id}
