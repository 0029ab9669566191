"""Solutions to lesson 03's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import torch


def adapter_forward(h, w_down, b_down, w_up, b_up):
    z = torch.relu(h @ w_down.T + b_down)  # (B, T, b): down-project, then the nonlinearity
    return h + z @ w_up.T + b_up  # up-project and add the input back: the adapter's own skip connection


def adapter_param_count(D, L, b, placement):
    per_adapter = 2 * D * b + b + D  # W_down (b, D) + b_down (b,) + W_up (D, b) + b_up (D,)
    return {"houlsby": 2, "pfeiffer": 1}[placement] * L * per_adapter


def up_grad_at_init(g, z):
    return torch.einsum("btd,btk->dk", g, z)  # sum over every row and token of g_t z_t^T


def _forward_relu_after_up(h, w_down, b_down, w_up, b_up):  # the nonlinearity on the wrong side of W_up
    return h + torch.relu((h @ w_down.T + b_down) @ w_up.T + b_up)


def _count_without_biases(D, L, b, placement):  # the two weight matrices only
    return {"houlsby": 2, "pfeiffer": 1}[placement] * L * 2 * D * b


def _up_grad_mean(g, z):  # a mean over tokens where the loss's gradient is a sum
    return torch.einsum("btd,btk->dk", g, z) / (g.shape[0] * g.shape[1])


MISTAKES = {
    "adapter_forward": _forward_relu_after_up,
    "adapter_param_count": _count_without_biases,
    "up_grad_at_init": _up_grad_mean,
}
