"""The speed seam: every lever that makes training faster or lighter without changing its math, in one file.

The reference files (model.py, the methods, nf4.py, train.py's loop) compute the plain math. This file changes
HOW a model computes, never WHAT: each lever is a transformation of a model (or an optimizer) that is tested
equal to the reference path (tests/test_fast.py: loss, gradients, weights after a few steps).

    fast.compile_blocks(model, mode=None, **options)   each Block through torch.compile while training
    fast.checkpoint_blocks(model, enabled=True)        recompute each Block in backward (activation checkpointing)
    fast.checkpoint_blocks(model, offload=True)        ... and keep each Block's input in CPU memory till then
    fast.chunked_loss(model, enabled=True)             the training loss straight from the hidden states, in chunks
    fast.step_in_backward(optimizer)                   step each parameter inside backward, free its gradient
    fast.Engine(model, optimizer, cfg)                 what train() asks for, from its TrainConfig
    fast.parallel(model, cfg, device)                  several processes (torchrun): DDP, or FSDP2 with cfg.fsdp

How they attach. A Block's forward, and a 4-bit layer's, are replaced on the instance (never in the class): the
replacement runs the compiled and/or checkpointed version while training, and the plain forward otherwise, so
eval and generate stay eager (their shapes change from call to call). The loss is the model's `hidden_loss`
method, replaced on the instance. state_dict keys never change; `reset(model)` takes every lever off again.

Why each pays, in one line:
- compile: inductor fuses RMSNorm, RoPE, SwiGLU and the adapters' small ops into a few kernels and keeps fewer
  activations; mode="reduce-overhead" adds CUDA graphs (one launch per graph: small or LoRA-all models are
  host-bound without them). Past torch._dynamo.config.recompile_limit (8) variants it falls back to eager.
- checkpoint: keeps one tensor per block instead of its activations, for ~30% more compute; offload=True moves
  that tensor to (pinned) CPU memory until backward needs it, so no activation of any block waits on the GPU.
- chunked loss: at V = 128k and 4k tokens the float32 logits alone take 2 GiB and the loss's softmax as much
  again; in chunks of ~256 MB, with the gradient computed in forward, the (N, V) logits never exist. After
  compile_blocks each chunk's softmax and gradient run as one compiled pass (fused).
- 4-bit layers under compile: the compiler would keep the dequantized (out, in) weight for backward (a 16-bit
  model's memory); a checkpointed region around the dequantization alone makes it recompute W instead. In
  checkpointed Blocks (memory first) each 4-bit layer is one opaque op, nf4_matmul, with a Triton dequantization
  kernel: one dense W alive at a time (7B QLoRA, 4k tokens: 5.30 -> 4.98 GiB at 0.98x Unsloth's speed).
- the MLP in checkpointed Blocks (fast_mlp.py), when it has an adapter: a hand-written backward (Unsloth's), four
  (tokens, intermediate) tensors alive in it where the compiler's kept eight (1B LoRA all: 3.15 -> 2.94 GiB).
- optimizer in backward: the gradients of the whole model never exist at once (7B full fine-tuning: 50.5 ->
  41.8 GiB); it needs grad_accum=1 and no clipping, and pays only when the optimizer step is the peak.
"""

import functools
import types
import weakref

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .data import IGNORE_INDEX
from .fast_mlp import _mlp_forward
from .fast_nf4 import _nf4_forward, nf4_matmul  # noqa: F401  (nf4_matmul: the op, for tests and users)
from .loss import HALF
from .model import MLP

# ------------------------------------------------------------------------------------- blocks: compile, checkpoint


def blocks(model):
    """The Blocks of a Transformer or of the Transformer inside a PeftModel."""
    base = getattr(model, "base_model", model)
    return list(base.model.layers)


def _block_forward(layer, *args):
    """A Block's forward with its levers: compiled and/or checkpointed while training, plain otherwise."""
    fast = layer._fast
    fn = fast["compiled"] if layer.training and fast["compiled"] is not None else fast["plain"]
    if fast["checkpoint"] and layer.training and torch.is_grad_enabled():
        if fast["checkpoint"] == "offload":  # the checkpoint saves its inputs as saved tensors: these hooks move them
            with torch.autograd.graph.saved_tensors_hooks(_to_host, _to_device):
                return _checkpoint(fn, *args)
        return _checkpoint(fn, *args)
    return fn(*args)


def _checkpoint(fn, *args):
    """torch.utils.checkpoint, keeping the random state of the tensors' device. For CPU tensors torch keeps the default
    device's ("cuda" on a GPU machine) and raises if a CPU model's first compile starts CUDA inside the forward."""
    default = torch.utils.checkpoint.DefaultDeviceType.get_device_type()
    if all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor)):
        torch.utils.checkpoint.DefaultDeviceType.set_device_type("cpu")
    try:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    finally:
        torch.utils.checkpoint.DefaultDeviceType.set_device_type(default)


def _to_host(t):
    """A saved tensor copied to CPU memory (pinned from a GPU, so the copy does not wait for the host). The copy
    is queued on the stream that computes, so the GPU tensor's memory is reused only after it is read."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=True)
    return t.device, host


def _to_device(packed):  # in backward: back where it was, queued on the same stream (no wait for the host)
    device, host = packed
    return host.to(device, non_blocking=True)


def _levers(layer):
    if "_fast" not in layer.__dict__:
        layer._fast = {"plain": type(layer).forward.__get__(layer), "compiled": None, "checkpoint": False}
        layer.forward = functools.partial(_block_forward, layer)
    return layer._fast


def compile_blocks(model, **options):
    """Run each Block through torch.compile while training (options go to torch.compile, e.g. mode=
    "reduce-overhead" for CUDA graphs); 4-bit layers recompute their weight in backward; the chunked loss is
    fused. Adapters added later are picked up (dynamo re-checks the modules and re-traces). Returns model."""
    for layer in blocks(model):
        _levers(layer)["compiled"] = torch.compile(_levers(layer)["plain"], **options)
        for m in layer.modules():
            if hasattr(m, "qweight") and "forward" not in m.__dict__:  # a 4-bit layer (nf4.NF4Linear)
                m.forward = types.MethodType(_nf4_forward, m)  # (one function for all: no recompile per layer)
        if type(getattr(layer, "mlp", None)) is MLP and "forward" not in layer.mlp.__dict__:
            layer.mlp.forward = types.MethodType(_mlp_forward, layer.mlp)  # in checkpointed Blocks: fast_mlp
    base = getattr(model, "base_model", model)
    base.fused_loss = True  # (read by the chunked loss: its chunks run compiled)
    return model


def checkpoint_blocks(model, enabled=True, offload=False):
    """Recompute each Block in backward instead of keeping its activations (while training); offload=True keeps
    the one tensor each Block saves (its input) in CPU memory until backward. Returns model."""
    for layer in blocks(model):
        _levers(layer)["checkpoint"] = "offload" if enabled and offload else bool(enabled)
        for m in layer.modules():
            if hasattr(m, "qweight") or type(m) is MLP:  # compiled: an opaque op / backward (fast_nf4, fast_mlp)
                m._fast_checkpointed = bool(enabled)
    return model


def reset(model):
    """Take every lever of this file off `model`: it computes exactly as the reference files say again."""
    base = getattr(model, "base_model", model)
    for m in base.modules():
        for name in ("forward", "_fast", "hidden_loss", "fused_loss", "_fast_checkpointed"):
            m.__dict__.pop(name, None)
    return model


# ------------------------------------------------------------------------------------------- the chunked loss


def chunked_loss(model, enabled=True, chunk=None):
    """Compute the training loss (forward with labels and return_logits=False) from the hidden states in chunks,
    never holding the (B, T, V) logits: ChunkedCrossEntropy below. chunk: rows per chunk (default_chunk: ~256 MB
    of float32 logits; fewer rows, less memory, more launches). Returns model."""
    base = getattr(model, "base_model", model)
    if enabled:
        plain = type(base).hidden_loss.__get__(base)
        base.hidden_loss = functools.partial(_chunked_hidden_loss, base, plain, chunk=chunk)
    else:
        base.__dict__.pop("hidden_loss", None)
    return model


def _chunked_hidden_loss(model, plain, hidden, labels, chunk=None):
    if type(model.lm_head) is not nn.Linear:  # an adapted (or quantized) head: its own forward, plainly
        return plain(hidden, labels)
    fused = model.training and getattr(model, "fused_loss", False)  # compiled chunks only where blocks are compiled
    return chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, chunk, fused=fused)


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i W^T, t_i) without ever holding the (N, V) logits.

    Forward walks over `chunk` rows at a time, so memory is O(chunk * V) instead of O(N * V). The loss is the
    last node of the graph, so only a scalar flows back into it: forward also computes the gradients while each
    chunk's logits exist, and backward only scales them (the logits are never recomputed):
        dL/dlogits = (softmax - onehot) / N,  dL/dh = g W,  dL/dW = g^T h.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_h, need_w, fused=False):  # h (N, D), weight (V, D), targets (N,)
        acc = torch.float32 if h.dtype in HALF else h.dtype  # never downcast a float64 model
        rows = h.size(0)
        # n, the number of targets (labels != -100), stays a tensor: reading it on the host (or dropping the ignored
        # rows by a boolean index, whose size it decides) would wait for the GPU in every step. Ignored rows are
        # computed and weighted 0; with no target at all the loss is 0 / 0 = NaN, as causal_lm_loss (cross_entropy's
        # mean over nothing), and the gradients are 0.
        n = (targets != IGNORE_INDEX).sum().to(acc)
        inv_n = torch.where(n > 0, 1 / n.clamp_min(1), 0)  # a tensor: a new n is no new compiled graph
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # summed by addmm_ (each product accumulates in fp32)
        body = _compiled_chunk() if fused else chunk_loss_and_grad
        for i in range(0, rows, chunk):
            h_c, t_c = h[i : i + chunk], targets[i : i + chunk]
            if need_h or need_w:
                picked, g = body(h_c @ weight.T, t_c, inv_n, acc)
                total -= picked
                if need_h:
                    grad_h[i : i + chunk] = g @ weight
                if need_w:
                    grad_w.addmm_(g.T, h_c)  # not a float32 buffer: its += per chunk cost more than the matmul
            else:
                logp = torch.log_softmax(h_c @ weight.T, -1, dtype=acc)
                total -= (logp.gather(1, t_c.clamp_min(0)[:, None])[:, 0] * (t_c != IGNORE_INDEX)).sum()
        ctx.save_for_backward(grad_h)  # per token, like an activation
        ctx.grad_w = grad_w  # W's gradient, ready early (not an activation: the memory W's .grad takes anyway)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        (grad_h,), grad_w = ctx.saved_tensors, ctx.grad_w
        scale = lambda g: None if g is None else (g.to(grad.dtype) * grad).to(g.dtype)  # noqa: E731  (fp32 product)
        return scale(grad_h), scale(grad_w), None, None, None, None, None


def chunk_loss_and_grad(logits, targets, inv_n, acc):
    """One chunk's (sum of log p(target), dL/dlogits = (softmax - onehot) * inv_n in the logits' dtype), rows whose
    target is -100 weighted 0. Whole-tensor ops only (the one-hot is a comparison, not a scatter), so that
    torch.compile fuses it all into one pass that reads the 16-bit logits and writes the 16-bit gradient (no
    float32 (c, V) buffer); run eager, the in-place ops keep one float32 buffer."""
    weight = (targets != IGNORE_INDEX).to(acc)[:, None] * inv_n  # (c, 1): 1/n for a target, 0 for an ignored row
    targets = targets.clamp_min(0)[:, None]  # (c, 1): any valid index for the ignored rows (weighted 0)
    logp = torch.log_softmax(logits, -1, dtype=acc)  # (c, V), 16-bit logits read once
    picked = (logp.gather(1, targets) * (weight > 0)).sum()
    g = logp.exp_()  # softmax, in place
    g -= (torch.arange(g.size(1), device=g.device) == targets).to(torch.uint8)  # minus the one-hot
    return picked, g.mul_(weight).to(logits.dtype)


@functools.cache
def _compiled_chunk():  # built once, on first use: the chunk size is fixed, the last chunk's gets a dynamic graph
    return torch.compile(chunk_loss_and_grad)


def default_chunk(vocab_size):  # rows per chunk: one chunk's float32 logits near 256 MB (2**26 numbers)
    return max(64, 2**26 // vocab_size)


def chunked_causal_lm_loss(hidden, weight, labels, chunk=None, fused=False):
    """The same value as causal_lm_loss(hidden @ weight.T, labels), computed chunk by chunk. The default chunk
    keeps one chunk's float32 logits near 256 MB whatever the vocabulary (523 rows at V = 128k). fused=True runs
    each chunk's softmax and gradient through torch.compile: one pass over the logits instead of five."""
    chunk = chunk or default_chunk(weight.size(0))
    h, targets = hidden[:, :-1].reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1)  # every row: see forward
    if torch.is_autocast_enabled(h.device.type):  # do autocast's cast by hand: the Function runs outside it
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    grad = torch.is_grad_enabled()
    with torch.autocast(h.device.type, enabled=False):
        return ChunkedCrossEntropy.apply(
            h, weight, targets, chunk, grad and h.requires_grad, grad and weight.requires_grad, fused
        )


# ------------------------------------------------------------------------------------- the optimizer in backward


def step_in_backward(optimizer):
    """Hooks that run optimizer.step() for each parameter as soon as backward has accumulated its gradient, then
    free the gradient. At that moment it is the only parameter with a gradient (those before it were freed, those
    after it are not computed yet), and torch's AdamW skips parameters without one: the step updates exactly it,
    with its own state and its group's lr. Returns the hook handles: .remove() them when training ends.

    The hooks hold the optimizer weakly: a parameter's hooks live in C++, where Python's collector cannot see a
    cycle (parameter -> hook -> optimizer -> parameter), so a strong reference would keep the model and the
    optimizer's state alive forever once the caller drops them without removing the hooks."""
    ref = weakref.ref(optimizer)

    def hook(p):
        if (opt := ref()) is not None:
            opt.step()
        p.grad = None

    return [p.register_post_accumulate_grad_hook(hook) for g in optimizer.param_groups for p in g["params"]]


# ------------------------------------------------------------------------------------------ what train() uses


def parallel(model, cfg, device):
    """The processes train() runs on: under torchrun, DDP for adapters or FSDP2 (cfg.fsdp) sharding every weight;
    with one process, nothing. The code is distributed.py (Parallel); tests/test_distributed.py checks N
    processes train exactly as one process with an N times larger batch."""
    from .distributed import Parallel

    return Parallel(model, cfg, device)


class Engine:
    """The levers a TrainConfig asks for, applied to a model and its optimizer for one train() call:
    cfg.chunked_loss (cfg.loss_chunk rows per chunk), cfg.compile (True or a torch.compile mode) and
    cfg.optimizer_in_backward."""

    def __init__(self, model, optimizer, cfg):
        self.cfg = cfg
        chunked_loss(model, cfg.chunked_loss, chunk=cfg.loss_chunk)
        if cfg.compile:
            compile_blocks(model, **({} if cfg.compile is True else {"mode": cfg.compile}))
        self.hooks = step_in_backward(optimizer) if cfg.optimizer_in_backward else []

    @property
    def steps_in_backward(self):  # the optimizer already stepped inside backward
        return bool(self.hooks)

    def before_forward(self):  # CUDA graphs (reduce-overhead) may reuse their outputs from here on
        if self.cfg.compile:
            torch.compiler.cudagraph_mark_step_begin()

    def close(self):
        for h in self.hooks:
            h.remove()
