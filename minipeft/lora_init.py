"""Where LoRA's A and B start, other than PEFT's default (B = 0): from the weight itself (PiSSA, OLoRA) or against
its 4-bit quantization error (LoftQ), and how such an adapter is saved as a plain LoRA on the original weight.

    PiSSA (Meng et al. 2024):   W = U S V^T;  s B A = U_r S_r V_r^T  (the principal part),  W_res = W - s B A
    OLoRA (Büyükakyüz 2024):    W = Q R;      A = R_r (first r rows), B = Q_r (first r columns), W_res = W - s B A
    LoftQ (loftq.py):           Q and s B A chosen together so that dequant(Q) + s B A is near W
Shapes: W (out, in), A (r, in), B (out, r), s the adapter's scaling. The base becomes W_res (or Q), so the model
still computes W (or near it) at step 0. LoraConfig(init_lora_weights=...) picks one; lora.LoraLayer.update_layer
calls these after creating A and B.
"""

import dataclasses
import math

import torch
import torch.nn as nn

from .loftq import loftq_init
from .loss import HALF
from .nf4 import NF4Linear


def start_from_weight(layer, name, how):
    """PiSSA and OLoRA on adapter `name` of a LoraLayer: B A starts as the weight's own principal part, and the base
    weight becomes the rest, W_res = W - s B A.
        PiSSA:  A = sqrt(S_r / s) V_r^T  (r, in),  B = U_r sqrt(S_r / s)  (out, r): s B A = U_r S_r V_r^T
                ("pissa_niter_K": U_r, S_r, V_r from torch.svd_lowrank with K iterations, random but fast)
        OLoRA:  A = R_r,  B = Q_r
    Computed in float32 at least (float64 stays float64). Singular vectors and QR are unique only up to the sign of
    each pair (u_i, v_i), (q_i, r_i): B A and W_res are unique, A and B up to those signs."""
    if not isinstance(layer.base_layer, nn.Linear):
        raise ValueError(
            f"init_lora_weights={how!r} rewrites the base weight, so it needs a full-precision base, not a "
            f"{type(layer.base_layer).__name__} (quantize after the init, or use init_lora_weights=True)"
        )
    W, A, B, s = layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    w, r = W.detach().to(torch.float32 if W.dtype in HALF else W.dtype), A.size(0)
    if how == "olora":
        Q, R = torch.linalg.qr(w)  # (out, k), (k, in)
        new_B, new_A = Q[:, :r], R[:r]
    else:
        if how == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        else:  # pissa_niter_K
            U, S, V = torch.svd_lowrank(w, q=r, niter=int(how.split("_niter_")[1]))
            Vh = V.T
        root = (S[:r] / s).sqrt()  # sqrt(S_r / s): s B A = U_r diag(S_r) V_r^T
        new_A, new_B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    with torch.no_grad():
        A.copy_(new_A), B.copy_(new_B)
        W.copy_(w - s * new_B @ new_A)  # W_res


def start_from_loftq(layer, name, config):
    """LoftQ on adapter `name` of a LoraLayer: its base becomes an NF4Linear holding Q, and B A starts at the rank-r
    part of W - dequant(Q) that loftq_init leaves, so dequant(Q) + s B A is closer to W than QLoRA's start dequant(Q).
    layer.loftq_errors keeps ||W - (dequant(Q) + s B A)|| after each alternating step.
    Loading a saved LoftQ adapter (config.inference_mode, set by load_adapter): on a 4-bit base (the LoftQ base,
    saved and loaded in 4 bits) nothing is done, the file's A and B are loaded; on the full-precision base LoftQ runs
    again to rebuild the same Q (it is deterministic), and the file's A and B replace these."""
    if not isinstance(layer.base_layer, nn.Linear):
        if config.inference_mode:
            return
        raise ValueError(
            "init_lora_weights='loftq' quantizes the full-precision weight itself, so it needs an nn.Linear base, "
            f"not a {type(layer.base_layer).__name__} (pass the float model; it becomes 4-bit in the targets)"
        )
    base, steps = layer.base_layer, config.loftq_config.get("loftq_iter", 1)
    q, A, B, layer.loftq_errors = loftq_init(base.weight, config.r, layer.scaling[name], steps)
    quantized = NF4Linear(layer.in_features, layer.out_features, base.bias is not None, double_quant=False,
                          dtype=base.weight.dtype, device=base.weight.device)  # fmt: skip
    quantized.qweight = q
    if base.bias is not None:
        quantized.bias.data.copy_(base.bias.detach())
    layer.base_layer = quantized
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(A), layer.lora_B[name].weight.copy_(B)


def relative_to_initial(config, state, initial_config, initial_state):
    """A PiSSA/OLoRA adapter saved as a plain LoRA on the ORIGINAL weight (PEFT's conversion): the model computes
    W_res + s B A = W - s B0 A0 + s B A, so its update of W is s (B A - B0 A0) = s [B, -B0] [A; A0], a LoRA of rank
    2r with the same scaling (alpha doubled; times sqrt(2) with rsLoRA). -> (config, state)."""
    if config.init_lora_weights == "loftq" or initial_config.init_lora_weights == "loftq":
        raise ValueError(
            "a LoftQ adapter is a plain LoRA on its quantized base and has no conversion to the original weight; "
            "save it without path_initial_model_for_weight_conversion"
        )
    if config.use_dora:
        raise ValueError("a DoRA adapter cannot be saved relative to the initial weights (its magnitude is not a LoRA)")
    if initial_config.r != config.r or set(initial_state) != set(state):
        raise ValueError("the initial adapter does not match this one (its rank or its keys differ)")
    out = {}
    for key, t in state.items():
        t0 = initial_state[key].to(t)
        out[key] = torch.cat([t, t0], 0) if "lora_A" in key else torch.cat([t, -t0], 1)
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    return dataclasses.replace(config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True), out
