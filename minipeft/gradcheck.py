"""The identities that tie each PEFT method to full fine-tuning, computed numerically.

Each function runs the adapted model and an equivalent fully fine-tunable model on the same batch, and returns
relative errors ||ours - reference|| / ||reference|| between the adapter's gradients and what the chain rule
says they must be, given the full model's gradients. Run them in float64 with dropout off (model.eval()) and
with non-zero adapter weights: then the errors are ~1e-15, and any mistake in scaling, init or wiring shows.

LoRA.  W' = W + s B A. Let G = dL/dW' from full fine-tuning of W'. Since W' is linear in A and B,
    dL/dB = s G A^T   (out, r)        dL/dA = s B^T G   (r, in)
DoRA.  W' = (m / n) * V with V = W + s B A and n = ||V||_row treated as a constant (the paper's section 4.3):
    dL/dm = rowsum(G * V) / n         dL/dV = (m / n)[:, None] * G,  then  dL/dB = s dL/dV A^T,  dL/dA = s B^T dL/dV
"""

import copy

import torch


def rel_err(a, b):
    """||a - b|| / ||b|| (or ||a|| when b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return ((a - b).norm() / (denom if denom > 0 else 1.0)).item()


def _loss(model, batch):
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss


def lora_gradient_identity(peft_model, batch):
    """Compare LoRA/DoRA gradients with the chain rule applied to full fine-tuning's dL/dW'.

    Returns {module name: {"A": err, "B": err[, "m": err]}} for every LoRA layer of the active adapter.
    """
    peft_model.eval()  # no dropout: the identities hold for the deterministic function
    peft_model.zero_grad(set_to_none=True)
    _loss(peft_model, batch).backward()
    layers = {n: m for n, m in peft_model.base_model.named_modules() if hasattr(m, "lora_A")}

    # The reference: a plain model whose adapted weights W' are ordinary trainable Linear weights.
    full = copy.deepcopy(peft_model).merge_and_unload()
    for p in full.parameters():
        p.requires_grad_(False)
    for name in layers:
        full.get_submodule(name).weight.requires_grad_(True)
    _loss(full, batch).backward()

    errors = {}
    for name, layer in layers.items():
        a = layer.active_adapter
        A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
        G = full.get_submodule(name).weight.grad  # dL/dW'  (out, in)
        err = {}
        if a in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector[a]
            V = (layer.base_weight() + s * B @ A).detach()
            n = V.norm(dim=1)
            err["m"] = rel_err(m.grad, (G * V).sum(1) / n)
            G = (m / n).detach()[:, None] * G  # dL/dV
        err["B"] = rel_err(B.grad, s * G @ A.detach().T)
        err["A"] = rel_err(A.grad, s * B.detach().T @ G)
        errors[name] = err
    return errors


def max_error(errors):
    """The largest error in a nested {name: {part: err}} dict."""
    return max(max(d.values()) if isinstance(d, dict) else d for d in errors.values())


def finite_difference_check(fn, params, h=1e-5, n_probes=8, seed=0):
    """Directional central differences of a scalar fn() against autograd, in float64.

    For random unit directions u over all params, (f(p + h u) - f(p - h u)) / 2h must equal <grad f, u>.
    Returns the largest relative error over the probes.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = None
    fn().backward()
    grads = [p.grad.detach().clone() for p in params]
    worst = 0.0
    for _ in range(n_probes):
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
        norm = torch.sqrt(sum((d * d).sum() for d in dirs))
        dirs = [d / norm for d in dirs]
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(h * d)
            f_plus = fn().item()
            for p, d in zip(params, dirs):
                p.sub_(2 * h * d)
            f_minus = fn().item()
            for p, d in zip(params, dirs):
                p.add_(h * d)
        numeric = (f_plus - f_minus) / (2 * h)
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).item()
        worst = max(worst, abs(numeric - analytic) / max(abs(analytic), 1e-12))
    return worst
