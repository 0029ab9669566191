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


def _adapter_and_full_gradients(peft_model, batch, marker):
    """Backward through the adapted model, and through the reference: a plain model (merge_and_unload) whose merged
    weights W' (and biases) are ordinary trainable Linear parameters. -> ({name: adapter layer}, reference)."""
    peft_model.eval()  # no dropout: the identities hold for the deterministic function
    peft_model.zero_grad(set_to_none=True)
    _loss(peft_model, batch).backward()
    layers = {n: m for n, m in peft_model.base_model.named_modules() if hasattr(m, marker)}
    full = copy.deepcopy(peft_model).merge_and_unload()
    for p in full.parameters():
        p.requires_grad_(False)
    for name in layers:
        full.get_submodule(name).requires_grad_(True)
    _loss(full, batch).backward()
    return layers, full


def lora_gradient_identity(peft_model, batch):
    """Compare LoRA/DoRA gradients with the chain rule applied to full fine-tuning's dL/dW'.

    Returns {module name: {"A": err, "B": err[, "m": err]}} for every LoRA layer of the active adapter.
    """
    layers, full = _adapter_and_full_gradients(peft_model, batch, "lora_A")

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


# ----- bottleneck adapters, prompt tuning, prefix tuning -----
#
# Adapters.  a(h) = h + W_up act(W_down h + b_down) + b_up. With W_up = 0 and b_up = 0, a(h) = h and
#     da/dh = I + W_up diag(act') W_down = I,
# so the model is the base model and every base parameter gets exactly full fine-tuning's gradient.
# Prompt tuning.  The soft prompt is the input embedding of P extra leading tokens. With the prompt set to the
# embeddings of real tokens p, the model on x is the full model on [p; x], and, the prompt being shared by the
# rows of the batch, dL/d(prompt) = sum over rows of the full model's dL/d(inputs_embeds)[:, :P].
# Prefix tuning.  The prefix is a key/value cache of length P. With it set to the cache the base model computes
# for p, the model on x is the full model on [p; x], and dL/d(prefix) is the full model's dL/d(past keys/values),
# summed over rows, in the layout [P, 2L, K, hd]. With the MLP prefix = W2 tanh(W1 e + b1) + b2 and
# G = dL/d(prefix) (P, 2L*K*hd), the chain rule by hand (u = tanh(W1 e + b1), (P, E)):
#     dL/dW2 = G^T u    dL/db2 = sum_P G    dL/dz = (G W2) * (1 - u^2)    dL/dW1 = dL/dz^T e
#     dL/db1 = sum_P dL/dz    dL/de = dL/dz W1


def adapter_gradient_identity(peft_model, batch):
    """At zero W_up (a fresh AdapterConfig()), the adapted model must be the base model, value and gradients.

    Unfreezes the base parameters of a copy of peft_model and of a copy of its base model (adapters removed), and
    returns {"logits": err, "base_grads": largest err over the base parameters}.
    """
    adapted = copy.deepcopy(peft_model).eval()
    full = copy.deepcopy(peft_model).unload().eval()  # the base model, every adapter layer unwrapped
    adapter_params = {id(p) for p in adapted.parameters() if p.requires_grad}
    base = {n: p for n, p in adapted.base_model.named_parameters() if id(p) not in adapter_params}
    for p in adapted.parameters():
        p.requires_grad_(False)
    for p in list(base.values()) + list(full.parameters()):
        p.requires_grad_(True)
    out, ref = _forward(adapted, batch), _forward(full, batch)
    out.loss.backward()
    ref.loss.backward()
    names = {n.replace(".base_layer", ""): p for n, p in base.items()}  # o_proj.base_layer.weight -> o_proj.weight
    ref_params = dict(full.named_parameters())
    worst = max(rel_err(p.grad, ref_params[n].grad) for n, p in names.items())
    return {"logits": rel_err(out.logits, ref.logits), "base_grads": worst}


def _forward(model, batch):
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])


def _extend(batch, p_ids):
    """[p; x] for the full model: the P tokens of p in front of every row, visible, with labels -100."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    B, P = ids.size(0), p_ids.numel()
    full = {"input_ids": torch.cat([p_ids.expand(B, P), ids], 1)}
    full["labels"] = torch.cat([labels.new_full((B, P), -100), labels], 1)
    full["attention_mask"] = None if mask is None else torch.cat([mask.new_ones(B, P), mask], 1)
    return full


def prompt_gradient_identity(peft_model, batch, p_ids):
    """Prompt tuning against the full model on [p; x], with the soft prompt set to the embeddings of p_ids (P,).

    Works on a copy (the adapter's prompt is not changed). Returns {"logits": err of our (B, T, V) against the
    full model's logits on x's positions, "prompt": err of dL/d(prompt) against the full model's
    dL/d(inputs_embeds) at p's positions, summed over rows}.
    """
    pm = copy.deepcopy(peft_model).eval()
    encoder = pm.prompt_encoder[pm.active_adapter]
    P = encoder.num_virtual_tokens
    if p_ids.numel() != P:
        raise ValueError(f"p_ids has {p_ids.numel()} tokens but the prompt has num_virtual_tokens={P}")
    base = pm.base_model
    embed = base.model.embed_tokens.weight
    with torch.no_grad():
        encoder.embedding.weight.copy_(embed[p_ids])
    encoder.embedding.weight.requires_grad_(True)
    encoder.embedding.weight.grad = None
    out = _forward(pm, batch)
    out.loss.backward()

    full = _extend(batch, p_ids)
    inputs_embeds = embed[full["input_ids"]].detach().requires_grad_(True)  # (B, P + T, D), a leaf
    ref = base(inputs_embeds=inputs_embeds, attention_mask=full["attention_mask"], labels=full["labels"])
    ref.loss.backward()
    return {
        "logits": rel_err(out.logits, ref.logits[:, P:]),
        "prompt": rel_err(encoder.embedding.weight.grad, inputs_embeds.grad[:, :P].sum(0)),
    }


def prefix_gradient_identity(peft_model, batch, p_ids=None):
    """Prefix tuning against the plain model run with an ordinary KV cache as past_key_values.

    p_ids (P,) given (no prefix_projection): the prefix is first set to the keys/values the base model computes
    for p_ids, and our logits are also compared with the full model's on [p; x] ("logits").
    The reference: the base model on x with past_key_values = leaf tensors holding the prefix, one (k, v) per
    layer, each (B, K, P, hd); its gradients, summed over rows and laid out [P, 2L, K, hd], are dL/d(prefix).
    Returns {"prefix": err} for a table, or with prefix_projection {"embedding.weight": err, "transform.0.weight":
    err, ...}: the MLP's autograd gradients against the hand-written chain rule applied to dL/d(prefix).
    Works on a copy.
    """
    pm = copy.deepcopy(peft_model).eval()
    enc = pm.prompt_encoder[pm.active_adapter]
    base = pm.base_model
    P, L, K, hd = enc.num_virtual_tokens, enc.num_layers, enc.num_kv_heads, enc.head_dim
    errors = {}
    if p_ids is not None:
        if enc.prefix_projection:
            raise ValueError("p_ids sets the prefix table directly: use it with prefix_projection=False")
        with torch.no_grad():
            cache = base(p_ids[None], use_cache=True).past_key_values  # L x (k, v), each (1, K, P, hd)
            kv = torch.stack([t[0] for layer in cache for t in layer])  # (2L, K, P, hd): k of layer i at 2i
            enc.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(P, -1))  # (P, 2L*K*hd)
        ref_full = _forward(base, _extend(batch, p_ids))
    for p in enc.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = _forward(pm, batch)
    out.loss.backward()
    if p_ids is not None:
        errors["logits"] = rel_err(out.logits, ref_full.logits[:, P:])

    # The reference: an ordinary KV cache of leaf tensors, positions and mask as the model makes them for a cache.
    B = batch["input_ids"].size(0)
    table = enc.prefix().detach()  # (P, 2L*K*hd)
    kv = table.view(P, 2 * L, K, hd).permute(1, 2, 0, 3)  # (2L, K, P, hd)
    leaves = [kv[j][None].repeat(B, 1, 1, 1).requires_grad_(True) for j in range(2 * L)]
    mask = batch.get("attention_mask")
    mask = None if mask is None else torch.cat([mask.new_ones(B, P), mask], 1)
    past = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(L)]
    base(batch["input_ids"], attention_mask=mask, past_key_values=past, labels=batch["labels"]).loss.backward()
    G = torch.stack([leaf.grad.sum(0) for leaf in leaves]).permute(2, 0, 1, 3).reshape(P, -1)  # dL/d(prefix)

    if not enc.prefix_projection:
        errors["prefix"] = rel_err(enc.embedding.weight.grad, G)
        return errors
    e = enc.embedding.weight.detach()  # (P, td)
    lin1, lin2 = enc.transform[0], enc.transform[2]
    u = torch.tanh(e @ lin1.weight.detach().T + lin1.bias.detach())  # (P, E)
    dz = (G @ lin2.weight.detach()) * (1 - u * u)  # (P, E)
    expected = {
        "transform.2.weight": G.T @ u,
        "transform.2.bias": G.sum(0),
        "transform.0.weight": dz.T @ e,
        "transform.0.bias": dz.sum(0),
        "embedding.weight": dz @ lin1.weight.detach(),
    }
    params = dict(enc.named_parameters())
    errors.update({k: rel_err(params[k].grad, v) for k, v in expected.items()})
    return errors


def ia3_gradient_identity(peft_model, batch):
    """Compare IA3's gradients with the chain rule applied to full fine-tuning's G = dL/dW' of the merged weight.

    Output scaling, W' = diag(l) W, b' = l * b:  dL/dl = rowsum(G * W) + dL/db' * b  (out, 1).   Input scaling,
    W' = W diag(l):  dL/dl = colsum(G * W)  (1, in). Returns {module name: err} for every IA3 layer of the active
    adapter.
    """
    layers, full = _adapter_and_full_gradients(peft_model, batch, "ia3_l")
    errors = {}
    for name, layer in layers.items():
        a, merged = layer.active_adapter, full.get_submodule(name)
        G, W = merged.weight.grad, layer.base_weight().detach()
        if layer.is_feedforward[a]:
            expected = (G * W).sum(0).reshape(1, -1)
        else:
            bias = layer.base_layer.bias
            expected = ((G * W).sum(1) + (0 if bias is None else merged.bias.grad * bias.detach())).reshape(-1, 1)
        errors[name] = rel_err(layer.ia3_l[a].grad, expected)
    return errors
