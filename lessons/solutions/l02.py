"""Solutions to lesson 02's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def cat_combine(adapters, weights):
    A = torch.cat([a for a, _, _ in adapters], dim=0)  # (r_1 + r_2 + ..., in)
    B = torch.cat([w * s * b for (_, b, s), w in zip(adapters, weights)], dim=1)  # (out, r_1 + r_2 + ...)
    return A, B  # B @ A = sum_i (w_i s_i B_i) A_i: exact, at rank sum r_i


def dora_grads_through_norm(G, W, A, B, s, m):
    V = W + s * B @ A
    n = V.norm(dim=1, keepdim=True)  # (out, 1)
    radial = (G * V).sum(1, keepdim=True)  # (out, 1): the part of each row of G along its row of V, times n
    dm = radial[:, 0] / n[:, 0]
    dV = m[:, None] / n * (G - radial * V / n**2)  # d(v/|v|) = (I - v v^T / |v|^2) / |v|: the radial part drops
    return dm, s * B.T @ dV, s * dV @ A.T


def dora_unmerge(W_merged, A, B, s, m, n):
    return W_merged * (n / m)[:, None] - s * B @ A  # W' = (m/n) (W + sBA)  =>  W = W' n/m - sBA


def _cat_combine_without_scaling(adapters, weights):  # the combined adapter has scaling 1: each s_i is lost
    A = torch.cat([a for a, _, _ in adapters], dim=0)
    B = torch.cat([w * b for (_, b, _), w in zip(adapters, weights)], dim=1)
    return A, B


def _dora_grads_norm_detached(G, W, A, B, s, m):  # what minipeft and the paper compute: n a constant
    V = W + s * B @ A
    n = V.norm(dim=1, keepdim=True)
    dm = (G * V).sum(1) / n[:, 0]
    dV = m[:, None] / n * G
    return dm, s * B.T @ dV, s * dV @ A.T


def _lora_unmerge(W_merged, A, B, s, m, n):  # LoRA's unmerge: ignores the rescaling by m / n
    return W_merged - s * B @ A


MISTAKES = {
    "cat_combine": _cat_combine_without_scaling,
    "dora_grads_through_norm": _dora_grads_norm_detached,
    "dora_unmerge": _lora_unmerge,
}
