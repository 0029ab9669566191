"""Solutions to lesson 04's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def prefix_table(embedding, w1, b1, w2, b2, L, K):
    P = embedding.size(0)
    table = torch.tanh(embedding @ w1.T + b1) @ w2.T + b2  # (P, L * 2 * K * hd): PEFT's PrefixEncoder MLP
    return table.view(P, 2 * L, K, -1)  # each row laid out [2L, K, hd]: layer i's key at 2i, its value at 2i + 1


def cache_to_table(cache):
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in cache])  # (L, 2, K, P, hd)
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.size(3), -1)  # (P, L * 2 * K * hd): one row per virtual token


def _table_heads_first(embedding, w1, b1, w2, b2, L, K):  # a row read as [K, 2L, hd]: the right shape, wrong layout
    P = embedding.size(0)
    table = torch.tanh(embedding @ w1.T + b1) @ w2.T + b2
    return table.view(P, K, 2 * L, -1).transpose(1, 2)


def _keys_then_values(cache):  # every layer's keys, then every layer's values: [2, L] instead of [L, 2]
    kv = torch.stack([torch.stack([k[0] for k, _ in cache]), torch.stack([v[0] for _, v in cache])])  # (2, L, ...)
    return kv.permute(3, 0, 1, 2, 4).reshape(kv.size(3), -1)


MISTAKES = {"prefix_table": _table_heads_first, "cache_to_table": _keys_then_values}
