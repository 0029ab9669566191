"""Solutions to lesson 09's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def mixed_lora(x, base_out, adapters, row_adapters):
    out = base_out.clone()
    for name, (A, B, s) in adapters.items():
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], dtype=torch.long)
        if len(rows):
            out[rows] = base_out[rows] + s * (x[rows] @ A.T) @ B.T  # (n, T, out): only this adapter's rows
    return out


def svd_combine(adapters, weights, rank):
    delta = sum(w * s * B @ A for (A, B, s), w in zip(adapters, weights))  # (out, in): the exact weighted sum
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank], float((S[rank:] ** 2).sum())


def _mixed_lora_without_base(x, base_out, adapters, row_adapters):  # out[rows] = the update alone: W x is lost
    out = base_out.clone()
    for name, (A, B, s) in adapters.items():
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], dtype=torch.long)
        if len(rows):
            out[rows] = s * (x[rows] @ A.T) @ B.T
    return out


def _svd_combine_unsquared(adapters, weights, rank):  # the dropped singular values summed, not their squares
    delta = sum(w * s * B @ A for (A, B, s), w in zip(adapters, weights))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank], float(S[rank:].sum())


MISTAKES = {"mixed_lora": _mixed_lora_without_base, "svd_combine": _svd_combine_unsquared}
