"""The speed seam's MLP in checkpointed Blocks: SwiGLU and its LoRA adapters as one function with a hand-written
backward (Unsloth's approach), so a Block's backward holds four (tokens, intermediate) tensors at its peak where the
compiler's own backward held eight (1B LoRA on every linear, 4 x 1024 tokens: 64 MiB each). Part of fast.py's seam,
in a file of its own for its length; tests/test_fast.py checks it against the reference (model.MLP, lora.LoraLayer).

Each projection P (gate, up, down) has a frozen W_P (out, in) and maybe an adapter A_P (r, in), B_P (out, r):
    P(x) = x W_P^T + s_P (x A_P^T) B_P^T                      (no adapter: r = 0, empty A_P and B_P)
    e = gate(x),  g = up(x),  h = silu(e) * g,  y = down(h)   x (N, D);  e, g, h (N, I);  y (N, D)
Backward, from dy (N, D); for any projection z = P(u) with upstream gradient dz:
    du = dz W_P + s_P (dz B_P) A_P,   dA_P = s_P (dz B_P)^T u,   dB_P = s_P dz^T (u A_P^T)
    SwiGLU:  dg = dh * silu(e),   de = dh * g * silu'(e),   silu'(e) = sig(e) (1 + e (1 - sig(e)))
    dx = (de through gate) + (dg through up)
Saved for backward: x, e, g. In backward h is rebuilt for dA_d and dB_d, then its memory takes dh, and the SwiGLU
kernel writes de over dh: e, g, dh, dg at the peak. The forward is torch ops (compiled and fused with the Block's);
the backward is one op the compiler cannot see into, so what the forward saves is exactly x, e and g.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

_LIB = torch.library.Library("minipeft", "FRAGMENT")  # (fast_nf4 defines the namespace)
_LIB.define(
    "lora_mlp_backward(Tensor grad, Tensor x, Tensor e, Tensor g, Tensor[] weights, float[] scaling) -> Tensor[]"
)


def _project(u, W, A, B, s):  # P(u) = u W^T + s (u A^T) B^T: (N, in) -> (N, out)
    z = u @ W.T
    return z.addmm_(u @ A.T, B.T, alpha=s) if A.size(0) else z


def _lora_mlp_forward(x, weights, scaling):
    """y = down(silu(gate(x)) * up(x)), with e = gate(x) and g = up(x) (N, I) for backward. Plain torch ops, so the
    compiler traces them into the Block's graph and fuses SwiGLU with its neighbours."""
    Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd = weights
    u = x.reshape(-1, x.size(-1))  # (N, D)
    e, g = _project(u, Wg, Ag, Bg, scaling[0]), _project(u, Wu, Au, Bu, scaling[1])
    y = _project(F.silu(e) * g, Wd, Ad, Bd, scaling[2])
    return y.view(*x.shape[:-1], y.size(-1)), e, g


def _adapter_grads(dz, u, A, B, s):  # -> dA (r, in), dB (out, r), dz B (N, r): for z = P(u) (see the docstring)
    if not A.size(0):
        return A.new_empty(A.shape), B.new_empty(B.shape), None
    dzB = dz @ B
    return (dzB.T @ u).mul_(s), (dz.T @ (u @ A.T)).mul_(s), dzB


def _lora_mlp_backward_impl(grad, x, e, g, weights, scaling):
    """[dx, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d] (see the module's docstring)."""
    Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd = weights
    sg, su, sd = scaling
    dy, u = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))
    h = _swiglu(e, g)  # rebuilt: (N, I)
    dAd, dBd, dyB = _adapter_grads(dy, h, Ad, Bd, sd)
    dh = torch.matmul(dy, Wd, out=h)  # h's memory holds dh from here
    if dyB is not None:
        dh.addmm_(dyB, Ad, alpha=sd)
    de, dg = _swiglu_backward(dh, e, g)  # de in dh's memory, dg new
    dAg, dBg, deB = _adapter_grads(de, u, Ag, Bg, sg)
    dAu, dBu, dgB = _adapter_grads(dg, u, Au, Bu, su)
    dx = (de @ Wg).addmm_(dg, Wu)
    for zB, A, s in ((deB, Ag, sg), (dgB, Au, su)):
        if zB is not None:
            dx.addmm_(zB, A, alpha=s)
    return [dx.view(x.shape), dAg, dBg, dAu, dBu, dAd, dBd]


_LIB.impl("lora_mlp_backward", _lora_mlp_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("minipeft::lora_mlp_backward", lib=_LIB)
def _(grad, x, e, g, weights, scaling):
    return [x.new_empty(x.shape)] + [w.new_empty(w.shape) for i, w in enumerate(weights) if i % 3]


class _LoraMLP(torch.autograd.Function):
    """The forward in torch ops, the backward one op (the compiler cannot see into it, so it keeps what the forward
    saves and nothing else): gradients for x and the adapters, none for the frozen W."""

    @staticmethod
    def forward(ctx, x, sg, su, sd, *weights):
        y, e, g = _lora_mlp_forward(x, weights, (sg, su, sd))
        ctx.save_for_backward(x, e, g, *weights)
        ctx.scaling = (sg, su, sd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, e, g, *weights = ctx.saved_tensors
        dx, dAg, dBg, dAu, dBu, dAd, dBd = torch.ops.minipeft.lora_mlp_backward(grad, x, e, g, weights, ctx.scaling)
        return dx, None, None, None, None, dAg, dBg, None, dAu, dBu, None, dAd, dBd  # W_P frozen: no gradient


def lora_mlp(x, scaling, weights):
    """down(silu(gate(x)) * up(x)) with adapters: weights = (W_g, A_g, B_g, W_u, A_u, B_u, W_d, A_d, B_d), all in
    x's dtype, scaling = (s_g, s_u, s_d) (see the module's docstring; mlp_operands builds both from an MLP)."""
    return _LoraMLP.apply(x, *scaling, *weights)


def _mlp_forward(mlp, x):
    """An MLP's forward in a checkpointed Block under torch.compile: lora_mlp when its three projections are frozen
    Linears without bias, each with one plain LoRA adapter or none, at least one with one; anything else (no
    adapter, full fine-tuning, dropout, DoRA, a 4-bit or adapted layer, a mixed batch) and eager runs take the plain
    forward (model.MLP)."""
    if torch.compiler.is_compiling() and mlp.__dict__.get("_fast_checkpointed"):
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        operands = mlp_operands(mlp, dtype, autocast)
        if operands is not None and any(
            A.size(0) for A in operands[1][1::3]
        ):  # (frozen MLPs: the compiler's is as lean)
            return lora_mlp(x.to(dtype), *operands)
    return type(mlp).forward(mlp, x)


def mlp_operands(mlp, dtype, autocast):
    """(scaling, weights) for lora_mlp from a model.MLP's three projections, or None when one cannot go in (_parts)."""
    parts = [_parts(getattr(mlp, n), dtype, autocast) for n in ("gate_proj", "up_proj", "down_proj")]
    if None in parts:
        return None
    return [s for *_, s in parts], [t for W, A, B, s in parts for t in (W, A, B)]


def _parts(layer, dtype, autocast):
    """(W, A, B, s) of one projection in dtype, or None when lora_mlp cannot compute it. Without autocast the
    dtypes must already agree (the plain forward's own casts are kept there)."""
    from .lora import LoraLayer

    A = B = None
    s = 0.0
    if isinstance(layer, LoraLayer):
        if layer.adapter_names is not None:  # a mixed batch: rows per adapter
            return None
        name = layer.active_adapter
        if not (layer.disabled or layer.merged_adapters) and name in layer.lora_A:
            if name in layer.lora_magnitude_vector or not isinstance(layer.lora_dropout[name], nn.Identity):
                return None  # DoRA, dropout
            A, B, s = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
        layer = layer.base_layer
    if type(layer) is not nn.Linear or layer.bias is not None or layer.weight.requires_grad:
        return None
    W = layer.weight
    if A is None:
        A, B = W.new_empty(0, W.size(1)), W.new_empty(W.size(0), 0)
    if not autocast and {W.dtype, A.dtype} != {dtype}:
        return None
    return W.to(dtype), A.to(dtype), B.to(dtype), s


# ------------------------------------------------------------------------------------------ SwiGLU's kernels


def _swiglu(e, g):  # h = silu(e) * g, silu rounded to e's dtype first as model.MLP's F.silu does
    if e.is_cuda and _triton_kernels() is not None:
        h = torch.empty_like(e)
        _launch(_triton_kernels()[0], e, g, h)
        return h
    return F.silu(e) * g


def _swiglu_backward(dh, e, g):  # -> (de written over dh, dg)
    if e.is_cuda and _triton_kernels() is not None:
        dg = torch.empty_like(e)
        _launch(_triton_kernels()[1], dh, e, g, dg)
        return dh, dg
    sig = torch.sigmoid(e)
    dg = dh * (e * sig)
    return dh.mul_(g * sig * (1 + e * (1 - sig))), dg


def _launch(kernel, *tensors):
    import triton

    n, block = tensors[0].numel(), 1024
    kernel[(triton.cdiv(n, block),)](*tensors, n, BLOCK=block)


@functools.cache
def _triton_kernels():
    """Two elementwise kernels, each one pass in float32 (torch's eager ops would make a temporary as large as e
    for each step of the formula)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def forward(e, g, h, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ev = tl.load(e + offs, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (ev * tl.sigmoid(ev)).to(h.dtype.element_ty).to(tl.float32)
        tl.store(h + offs, (silu * gv).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def backward(dh, e, g, dg, n, BLOCK: tl.constexpr):  # de over dh
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dhv = tl.load(dh + offs, mask=mask, other=0.0).to(tl.float32)
        ev = tl.load(e + offs, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(ev)
        tl.store(dg + offs, (dhv * ev * sig).to(dg.dtype.element_ty), mask=mask)
        tl.store(dh + offs, (dhv * gv * sig * (1 + ev * (1 - sig))).to(dh.dtype.element_ty), mask=mask)

    return forward, backward
