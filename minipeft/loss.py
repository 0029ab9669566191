"""The training loss: mean next-token cross-entropy, plain or computed in chunks from the hidden states.

    causal_lm_loss(logits, labels)                 from the (B, T, V) logits, as transformers computes it
    chunked_causal_lm_loss(hidden, weight, labels)  the same value from the (B, T, D) hidden states and lm_head's
                                                    weight, without ever holding the (B, T, V) logits

Position t predicts labels[t + 1]; labels == -100 are ignored. Transformer.forward(labels=..., return_logits=
False) uses the chunked one, and train.py asks for it: at V = 128k and 4k tokens the float32 logits alone take
2 GiB, and the softmax of the loss as much again. Only bf16/fp16 are upcast (to float32); a float64 model stays
float64, which the gradient checks rely on.
"""

import functools

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels == -100 are ignored."""
    logits = logits[:, :-1].float() if logits.dtype in HALF else logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i W^T, t_i) without ever holding the (N, V) logits: a speed/memory lever, not new math.

    Forward walks over `chunk` rows at a time, so memory is O(chunk * V) instead of O(N * V) in float32 (at
    V = 128k and 4k tokens that is 2 GiB of logits, twice). The loss is the last node of the graph, so only a
    scalar flows back into it: forward also computes the gradients while each chunk's logits exist, and
    backward only scales them (the logits are never recomputed):
        dL/dlogits = (softmax - onehot) / N,  dL/dh = g W,  dL/dW = g^T h.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_h, need_w, fused=False):  # h (N, D), weight (V, D), targets (N,)
        acc = torch.float32 if h.dtype in HALF else h.dtype  # never downcast a float64 model
        n = h.size(0)
        if n == 0:  # no target at all: NaN, as causal_lm_loss (cross_entropy's mean over nothing); zero gradients
            ctx.save_for_backward(torch.zeros_like(h) if need_h else None)
            ctx.grad_w = torch.zeros_like(weight) if need_w else None
            return torch.full((), float("nan"), dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # summed by addmm_ (each product accumulates in fp32)
        inv_n = torch.full((), 1 / n, dtype=acc, device=h.device)  # a tensor: a new n is no new compiled graph
        body = _compiled_chunk() if fused else chunk_loss_and_grad
        for i in range(0, n, chunk):
            h_c, t_c = h[i : i + chunk], targets[i : i + chunk]
            if need_h or need_w:
                picked, g = body(h_c @ weight.T, t_c, inv_n, acc)
                total -= picked
                if need_h:
                    grad_h[i : i + chunk] = g @ weight
                if need_w:
                    grad_w.addmm_(g.T, h_c)  # not a float32 buffer: its += per chunk cost more than the matmul
            else:
                total -= torch.log_softmax(h_c @ weight.T, -1, dtype=acc).gather(1, t_c[:, None]).sum()
        ctx.save_for_backward(grad_h)  # per token, like an activation
        ctx.grad_w = grad_w  # W's gradient, ready early (not an activation: the memory W's .grad takes anyway)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        (grad_h,), grad_w = ctx.saved_tensors, ctx.grad_w
        scale = lambda g: None if g is None else (g.to(grad.dtype) * grad).to(g.dtype)  # noqa: E731  (fp32 product)
        return scale(grad_h), scale(grad_w), None, None, None, None, None


def chunk_loss_and_grad(logits, targets, inv_n, acc):
    """One chunk's (sum of log p(target), dL/dlogits = (softmax - onehot) * inv_n in the logits' dtype).
    Whole-tensor ops only (the one-hot is a comparison, not a scatter), so that torch.compile fuses it all into
    one pass that reads the 16-bit logits and writes the 16-bit gradient (no float32 (c, V) buffer); run eager,
    the in-place ops keep one float32 buffer."""
    logp = torch.log_softmax(logits, -1, dtype=acc)  # (c, V), 16-bit logits read once
    picked = logp.gather(1, targets[:, None]).sum()
    g = logp.exp_()  # softmax, in place
    g -= (torch.arange(g.size(1), device=g.device) == targets[:, None]).to(torch.uint8)  # minus the one-hot
    return picked, g.mul_(inv_n).to(logits.dtype)


@functools.cache
def _compiled_chunk():  # built once, on first use: the chunk size is fixed, the last chunk's gets a dynamic graph
    return torch.compile(chunk_loss_and_grad)


def default_chunk(vocab_size):  # rows per chunk: one chunk's float32 logits near 256 MB (2**26 numbers)
    return max(64, 2**26 // vocab_size)


def chunked_causal_lm_loss(hidden, weight, labels, chunk=None, fused=False):
    """The same value as causal_lm_loss(hidden @ weight.T, labels), computed chunk by chunk. The default chunk
    keeps one chunk's float32 logits near 256 MB whatever the vocabulary (523 rows at V = 128k). fused=True (a
    speed lever; Transformer passes it after compile_blocks) runs each chunk's softmax and gradient through
    torch.compile: one pass over the logits instead of five."""
    chunk = chunk or default_chunk(weight.size(0))
    h, targets = hidden[:, :-1].reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1)
    keep = targets != -100
    h, targets = h[keep], targets[keep]
    if torch.is_autocast_enabled(h.device.type):  # do autocast's cast by hand: the Function runs outside it
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    grad = torch.is_grad_enabled()
    with torch.autocast(h.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(
            h, weight, targets, chunk, grad and h.requires_grad, grad and weight.requires_grad, fused
        )
