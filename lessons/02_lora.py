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
# # 02 · LoRA: low-rank adaptation
#
# Hu et al. (2021) freeze the pretrained weight `W` (out × in) and learn only a low-rank update:
#
# $$h = W x + s\,B A x,\qquad A: r \times \text{in},\quad B: \text{out} \times r,\quad s = \frac{\alpha}{r}$$
#
# **What you will build:** a LoRA layer from scratch in ten lines; the reason `B` starts at zero, shown on
# the gradients; the scaling rule `α/r` against rsLoRA's `α/√r`; then the library's layer
# ([`minipeft/lora.py`](../minipeft/lora.py)), checked against **full fine-tuning** through the gradient
# identity `dL/dB = s·G·Aᵀ`; training on the sonnets with a sweep over the rank `r`; merging `BA` into `W`
# and how exact that is; DoRA in a few lines, with its gradients derived by hand; and, finally, the update
# full fine-tuning learns next to LoRA's: how low-rank is it, and do they point the same way? Last, PiSSA and
# OLoRA, which start `BA` at the weight's own principal part.
#
# **What you need to know first:** lesson 00 (the model) and lesson 01 (the training loop, the memory bill);
# the rank of a matrix; the chain rule for a matrix product.

# %%
import math

import matplotlib.pyplot as plt
import torch

# the lessons' shared settings (common.py): the device, and the one training budget of `minipeft finetune`
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, cmp, exercise, lr

torch.manual_seed(0)
print(f"torch {torch.__version__} on {DEVICE}{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## ΔW = BA, from scratch
#
# A fine-tuning update `ΔW` of a pretrained matrix tends to have a low "intrinsic rank", so LoRA writes it as
# a product of two thin matrices. For a 256 × 256 layer and `r = 8` that is `8·(256 + 256) = 4,096`
# trainable numbers instead of 65,536. `A` gets `nn.Linear`'s own initialisation (kaiming-uniform with
# `a = √5`), `B` starts at zero.

# %%
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        base.weight.requires_grad_(False)  # the pretrained weight is frozen
        self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))  # ΔW = 0 at the start

    def forward(self, x):  # x (..., in)
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T  # (..., r) -> (..., out)


base = nn.Linear(256, 256, bias=False).double()
lora = LoRALinear(base, r=8, alpha=16)
x = torch.randn(4, 256, dtype=torch.float64)
assert torch.equal(lora(x), base(x))  # B = 0: exactly the pretrained layer
assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 8 * (256 + 256)

with torch.no_grad():
    lora.B.normal_()  # pretend we trained
delta = lora.scaling * lora.B @ lora.A  # ΔW (out, in)
assert torch.linalg.matrix_rank(delta) == 8  # a 256 x 256 matrix of rank r
assert torch.allclose(lora(x), x @ (base.weight + delta).T)  # the same as a layer with weight W + sBA
print("LoRALinear: starts as the base layer, adds a rank-8 update")


# %% [markdown]
# ## Why B starts at zero
#
# Two reasons. The adapted model starts **exactly** as the pretrained one (checked above). And training can
# still start: with `y = Wx + sBAx` and `G = dL/dW'` (the gradient full fine-tuning would see for the merged
# weight `W' = W + sBA`), the chain rule gives
#
# $$\frac{\partial L}{\partial B} = s\,G A^\top, \qquad \frac{\partial L}{\partial A} = s\,B^\top G.$$
#
# At `B = 0`, `A` gets no gradient, but `B` does (because `A ≠ 0`), so after one step both move. Had both
# started at zero, both gradients would be zero forever: a saddle point.


# %%
def grads(A_init, B_init):
    layer = LoRALinear(nn.Linear(256, 256, bias=False).double(), r=8, alpha=16)
    with torch.no_grad():
        layer.A.copy_(A_init(layer.A))
        layer.B.copy_(B_init(layer.B))
    layer(x).pow(2).sum().backward()
    return layer.A.grad.norm().item(), layer.B.grad.norm().item()


keep, zero = (lambda t: t), torch.zeros_like
gA, gB = grads(keep, zero)
print(f"A random, B = 0 : |dL/dA| = {gA:.3g}, |dL/dB| = {gB:.3g}")
assert gA == 0 and gB > 0
gA, gB = grads(zero, zero)
print(f"A = 0,  B = 0   : |dL/dA| = {gA:.3g}, |dL/dB| = {gB:.3g}   <- stuck")
assert gA == 0 and gB == 0

# %% [markdown]
# ## The scaling: α/r or α/√r (rsLoRA)?
#
# `s` multiplies the update so that `α` can stay fixed while you try different ranks. But which power of `r`?
# Kalajdzievski (2023) follows one gradient step. Train `B` (from zero) on an input `x` with output gradient
# `g`: `dL/dB = s·g·(Ax)ᵀ`, so one SGD step of size `η` gives `B = -η s g (Ax)ᵀ`, and the layer's output on
# `x` moves by `s·BAx = -η s² ‖Ax‖² g`. Now `‖Ax‖²` is a sum of `r` terms, so it grows like `r`:
#
# * with `s = α/r` the change shrinks like `1/r`: large ranks learn *slower*, wasting their capacity;
# * with `s = α/√r` (rsLoRA) it is the same at every rank.

# %%
torch.manual_seed(0)
d, alpha, eta = 256, 16, 1e-3  # eta: the SGD step size
x1, g = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
change = {"α/r": [], "α/√r (rsLoRA)": []}
for r in ranks:
    A = torch.empty(r, d, dtype=torch.float64)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    for rule, s in [("α/r", alpha / r), ("α/√r (rsLoRA)", alpha / math.sqrt(r))]:
        B = -eta * s * torch.outer(g, A @ x1)  # one SGD step from B = 0: B - eta * dL/dB
        change[rule].append((s * B @ A @ x1).norm().item())

plt.figure(figsize=(6, 3.5))
for rule, c in change.items():
    plt.loglog(ranks, c, "o-", label=rule)
plt.xlabel("rank r")
plt.ylabel("|change of the output|")
plt.legend()
plt.title("one SGD step: how far the layer moves")
plt.show()
assert change["α/r"][-1] < 0.02 * change["α/r"][2]  # 1/r: 64 times smaller from r=4 to r=256
assert 0.5 < change["α/√r (rsLoRA)"][-1] / change["α/√r (rsLoRA)"][2] < 2  # flat

# %% [markdown]
# Adam normalises each gradient by its running size, which changes this arithmetic, so treat the picture as
# the argument, not the verdict: the rank sweep below tries both rules in real training.
#
# ## The library's LoRA
#
# `get_peft_model(model, LoraConfig(...))` freezes the base, finds the target `nn.Linear` layers by name,
# and wraps each one in a `LoraLayer` that holds `lora_A`, `lora_B` and `scaling` — the names of the paper and
# of Hugging Face PEFT. Let us check it against our `LoRALinear`, on a small random model in float64.

# %%
import copy

from minipeft.lora import LoraConfig, LoraLayer
from minipeft.model import ModelConfig, Transformer
from minipeft.peft import get_peft_model

small_cfg = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
torch.manual_seed(0)
small = Transformer(small_cfg).double().eval()
ids = torch.randint(0, 128, (2, 16))
with torch.no_grad():
    base_logits = small(ids).logits

pm = get_peft_model(copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
print(pm.base_model.model.layers[0].self_attn.q_proj)
pm.print_trainable_parameters()

with torch.no_grad():
    assert torch.equal(pm(ids).logits, base_logits)  # B = 0: exactly the base model
n_lora = sum(4 * (m.in_features + m.out_features) for m in pm.modules() if isinstance(m, LoraLayer))
assert pm.num_parameters(trainable_only=True) == n_lora  # r (in + out) per adapted layer
assert all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())  # only LoRA trains

# %%
layer = pm.base_model.model.layers[0].self_attn.q_proj  # a LoraLayer around the frozen nn.Linear
with torch.no_grad():
    layer.lora_B["default"].weight.normal_()  # non-zero, so that a wrong scaling would show
ours = LoRALinear(copy.deepcopy(layer.base_layer), r=4, alpha=8)
with torch.no_grad():
    ours.A.copy_(layer.lora_A["default"].weight)
    ours.B.copy_(layer.lora_B["default"].weight)
h = torch.randn(3, 64, dtype=torch.float64)
assert torch.allclose(ours(h), layer(h), rtol=1e-12, atol=1e-12)
assert layer.scaling["default"] == ours.scaling == 8 / 4
print("minipeft's LoraLayer computes what LoRALinear computes")


# %% [markdown]
# ## Checking LoRA against full fine-tuning: the gradient identity
#
# The test that ties LoRA to full fine-tuning. Merge the adapter into a plain model with weights
# `W' = W + sBA`, let **that** model's `W'` be trainable, and take its gradient `G = dL/dW'` — what full
# fine-tuning would use. The chain rule says LoRA's gradients must be `s·G·Aᵀ` and `s·Bᵀ·G`. Compare, in
# float64, with `B` non-zero (at `B = 0` half of the identity would be trivially `0 = 0`):

# %%
from minipeft.gradcheck import rel_err

torch.manual_seed(1)
pm = get_peft_model(
    copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
)  # B random, not zero
pm(ids, labels=ids).loss.backward()
layer = pm.base_model.model.layers[1].self_attn.v_proj
A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]

full = copy.deepcopy(pm).merge_and_unload()  # a plain Transformer holding W' = W + sBA
W_merged = full.model.layers[1].self_attn.v_proj.weight
W_merged.requires_grad_(True)
full(ids, labels=ids).loss.backward()
G = W_merged.grad  # dL/dW', full fine-tuning's gradient

assert cmp("dL/dB = s G Aᵀ", B.grad, s * G @ A.T) and rel_err(B.grad, s * G @ A.T) < 1e-12
assert cmp("dL/dA = s Bᵀ G", A.grad, s * B.T @ G) and rel_err(A.grad, s * B.T @ G) < 1e-12

# %% [markdown]
# So LoRA is full fine-tuning whose gradient is *projected*: `B` sees `G` only through the `r` directions of
# `A`. [`minipeft/gradcheck.py`](../minipeft/gradcheck.py) runs this same comparison for every adapted layer
# (the tests run it for every method):

# %%
from minipeft.gradcheck import lora_gradient_identity, max_error

errors = lora_gradient_identity(pm, {"input_ids": ids, "labels": ids})
for name, e in list(errors.items())[:2]:
    print(name, {k: f"{v:.1e}" for k, v in e.items()})
assert max_error(errors) < 1e-12

# %% [markdown]
# ## Training LoRA on the sonnets
#
# Now on the bundled model, with the library's training loop and the one budget of lessons 01-08 (`common.py`:
# `minipeft finetune`'s steps, batch, sequence length, 5% warmup and its default learning rate `lr("lora")`),
# so the held-out loss compares with the other lessons'. `target_modules="all-linear"` adapts every linear
# layer of every block (q, k, v, o, gate, up, down), `r = 8`, `α = 16`. Only the LoRA matrices reach the
# optimizer; lesson 01's loop is otherwise unchanged.

# %%
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import load_text_dataset
from minipeft.train import TrainConfig, evaluate, train

base_model, tok = load_pretrained("tiny-shakespeare", device=DEVICE)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
base_loss, _ = evaluate(base_model, val_data, BATCH, max_batches=VAL_BATCHES)


def budget(method):  # `minipeft finetune`'s training run for a method ("lora", "full")
    return TrainConfig(steps=STEPS, lr=lr(method), batch_size=BATCH, warmup_ratio=0.05, log_every=1,
                       eval_batches=VAL_BATCHES, progress=False)  # fmt: skip


def finetune(config):
    torch.manual_seed(0)  # the same A initialisation for every run
    model = get_peft_model(copy.deepcopy(base_model), config)
    return model, train(model, train_data, val_data, budget("lora"))


lora_model, metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
lora_model.print_trainable_parameters()
print(f"{STEPS} steps at lr {lr('lora')}: held-out loss {base_loss:.3f} (base) -> {metrics['val_loss']:.3f} (LoRA r=8)")
assert metrics["val_loss"] < base_loss

# %%
plt.figure(figsize=(6, 3))
plt.plot([e["loss"] for e in metrics["train"]], label="training batch")
plt.axhline(base_loss, color="gray", ls="--", label="base model, held out")
plt.axhline(metrics["val_loss"], color="C1", label="LoRA, held out (end)")
plt.xlabel("step")
plt.ylabel("loss")
plt.legend()
plt.show()
prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=DEVICE)
out = lora_model.generate(
    prompt,
    max_new_tokens=20 if FAST else 60,
    temperature=0.8,
    top_k=50,
    generator=torch.Generator(device=DEVICE).manual_seed(0),
)
print(tok.decode(out[0].tolist()))

# %% [markdown]
# ## How much rank does it need?
#
# Train the same budget at several ranks, with `α = 16` and both scaling rules, and plot the held-out loss
# (the `r = 8`, `α/r` run is the one above). Compare the spread between ranks with the gap to the base model: on
# a small task a low rank already captures most of what the budget can learn (the LoRA paper saw this too).
# One learning rate serves every rank here, `lr("lora")`, measured at `r = 8` with `α/r` (where `s = 2`);
# rsLoRA's `s = 16/√r` is larger at every rank above 1, so at high rank it also trains with a larger effective
# step. In the fast test setting this is a handful of steps and the differences are mostly noise: run the
# notebook yourself. On a CPU the sweep is kept to three ranks (with a GPU, eight), and at `r = 1` the two rules
# are the same run.

# %%
RANKS = [2, 8] if FAST else [1, 2, 4, 8, 16, 32, 64, 128] if DEVICE == "cuda" else [1, 8, 64]
sweep = {"α/r": [], "α/√r (rsLoRA)": []}
for r in RANKS:
    for rule, rs in [("α/r", False), ("α/√r (rsLoRA)", True)]:
        if r == 8 and not rs:  # trained above
            loss = metrics["val_loss"]
        elif r == 1 and rs:  # at r = 1 both rules give s = α: the same run
            loss = sweep["α/r"][-1]
        else:
            loss = finetune(LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", use_rslora=rs))[1]["val_loss"]
        sweep[rule].append(loss)
        print(f"r={r:3d} {rule:14s} held-out loss {loss:.3f}")

plt.figure(figsize=(6, 3.5))
for rule, losses in sweep.items():
    plt.semilogx(RANKS, losses, "o-", label=rule, base=2)
plt.axhline(base_loss, color="gray", ls="--", label="base model")
plt.xlabel("rank r")
plt.ylabel("held-out loss")
plt.legend()
plt.title(f"LoRA rank sweep, {STEPS} steps")
plt.show()
assert all(l < base_loss for ls in sweep.values() for l in ls)

# %% [markdown]
# ## Merging, and how exact it is
#
# After training, `W + sBA` can be folded into a plain weight: `merge_and_unload()` returns an ordinary
# `Transformer` with no adapter left, so inference costs exactly what the base model costs. In exact arithmetic
# nothing changes; in floating point the merged weight is rounded once. In float64 that is invisible, in
# float32 it is at the level of float32's precision, in bfloat16 it would be visible.

# %%
merged = copy.deepcopy(lora_model).merge_and_unload()
assert type(merged) is Transformer and not any(isinstance(m, LoraLayer) for m in merged.modules())
assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base_model.parameters())
check_ids = val_data.input_ids[0][None].to(DEVICE)
with torch.no_grad():
    d32 = (merged(check_ids).logits - lora_model(check_ids).logits).abs().max().item()
    d64 = (pm.eval()(ids).logits - copy.deepcopy(pm).merge_and_unload()(ids).logits).abs().max().item()
print(f"max |logit difference| merged vs adapter: float32 {d32:.1e}, float64 {d64:.1e}")
assert d32 < 1e-4 and d64 < 1e-12

# merge_adapter() folds BA into W in place; unmerge_adapter() takes it out again
w = lora_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight
w0 = w.detach().clone()
lora_model.merge_adapter()
assert not torch.equal(w, w0)
lora_model.unmerge_adapter()
print(f"merge then unmerge: W changed by at most {(w - w0).abs().max().item():.1e} (rounding)")
assert torch.allclose(w, w0, atol=1e-6)


# %% [markdown]
# ## DoRA in a few lines
#
# Liu et al. (2024) split each output row of the weight into a **magnitude** and a **direction**. LoRA updates
# the direction, a learned vector `m` (one number per output row) sets the length:
#
# $$W' = m \odot \frac{W + sBA}{\lVert W + sBA \rVert_{\text{row}}}, \qquad m \text{ initialised to } \lVert W \rVert_{\text{row}}$$
#
# so at the start (`B = 0`) `W' = W` again.
#
# **Which norm?** One per *output feature*: the norm of each row of `nn.Linear.weight`, which is `(out, in)`;
# PEFT computes `torch.linalg.norm(weight, dim=1)` and so does `lora.py`. The paper calls it a "column-wise"
# norm because its figures write `W` as `(in, out)`, where an output feature is a column (the authors say so in
# github.com/nbasyl/DoRA/issues/1). Code that keeps the weight as `(in, out)` (JAX kernels, some from-scratch
# tutorials) therefore writes the same norm as `dim=0`; `dim=0` on an `(out, in)` weight would be a different
# method, one magnitude per *input* feature.


# %%
def dora_weight(W, A, B, s, m):
    V = W + s * B @ A  # LoRA's update of the direction
    return m[:, None] * V / V.norm(dim=1, keepdim=True)  # each row (one output feature) rescaled to length m


W = small.model.layers[0].self_attn.q_proj.weight
A0, B0 = torch.randn(4, 64, dtype=torch.float64), torch.zeros(64, 4, dtype=torch.float64)
assert torch.allclose(dora_weight(W, A0, B0, 2.0, W.norm(dim=1)), W)  # starts as W

torch.manual_seed(2)
dm = get_peft_model(
    copy.deepcopy(small),
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
)
layer = dm.base_model.model.layers[0].self_attn.q_proj
with torch.no_grad():
    layer.lora_magnitude_vector["default"].mul_(1.5)  # a trained-looking magnitude
mine = dora_weight(
    layer.base_layer.weight,
    layer.lora_A["default"].weight,
    layer.lora_B["default"].weight,
    layer.scaling["default"],
    layer.lora_magnitude_vector["default"],
)
assert torch.allclose(mine, layer.merged_weight("default"))
assert torch.allclose(layer(h), h @ mine.T)  # the layer computes x W'^T without forming W'
print("dora_weight matches minipeft's DoRA layer")

# %% [markdown]
# ### DoRA's gradients, by hand
#
# As the paper suggests (its section 4.3), the norm `n = ‖V‖_row` of `V = W + sBA` is treated as a **constant**
# in backward (detached): backward then need not keep what differentiating a norm needs, which saves memory,
# and the paper reports it changes little. With `n` constant, `W' = (m/n) ⊙ V` is linear in `m` and in `V`. Let
# `G = dL/dW'` again (full fine-tuning's gradient for the merged weight). Row by row:
#
# $$\frac{\partial L}{\partial m_i} = \frac{1}{n_i}\sum_j G_{ij} V_{ij}, \qquad
#   \frac{\partial L}{\partial V} = \frac{m}{n} \odot G \quad(\text{each row } i \text{ times } m_i / n_i),$$
#
# and since `V = W + sBA` is LoRA's merged weight, LoRA's identity carries over with `dL/dV` in place of `G`:
#
# $$\frac{\partial L}{\partial B} = s\,\frac{\partial L}{\partial V} A^\top, \qquad
#   \frac{\partial L}{\partial A} = s\,B^\top \frac{\partial L}{\partial V}.$$
#
# So DoRA is LoRA whose gradient is rescaled row by row by `m/n`, plus one number per row, `m`, that learns the
# part of `G` along each row of `V`. Check all three against autograd on `dm`'s layer, with `G` from the merged
# model as before:

# %%
dm.zero_grad(set_to_none=True)
dm(ids, labels=ids).loss.backward()
full = copy.deepcopy(dm).merge_and_unload()  # W' as a plain trainable weight
W_merged = full.model.layers[0].self_attn.q_proj.weight
W_merged.requires_grad_(True)
full(ids, labels=ids).loss.backward()
G = W_merged.grad

A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
s, m = layer.scaling["default"], layer.lora_magnitude_vector["default"]
with torch.no_grad():
    V = layer.base_layer.weight + s * B @ A
    n = V.norm(dim=1)
    dL_dm = (G * V).sum(1) / n
    dL_dV = (m / n)[:, None] * G
for name, ours, autograd in [
    ("dL/dm = rowsum(G V) / n", dL_dm, m.grad),
    ("dL/dB = s (dL/dV) Aᵀ", s * dL_dV @ A.T, B.grad),
    ("dL/dA = s Bᵀ (dL/dV)", s * B.T @ dL_dV, A.grad),
]:
    assert cmp(name, ours, autograd) and rel_err(ours, autograd) < 1e-12

errors = lora_gradient_identity(dm, {"input_ids": ids, "labels": ids})  # gradcheck.py: every layer, m included
print("every DoRA layer, largest relative error:", f"{max_error(errors):.1e}")
assert max_error(errors) < 1e-12

# %% [markdown]
# Without the detach, the gradient would also flow through `n`, and `d(v/‖v‖)/dv = (I − v̂v̂ᵀ)/‖v‖` removes from
# each row of `dL/dV` its component along that row of `V`: the magnitude alone would then change lengths.
# Exercise 2 asks you for that gradient. DoRA trains one more vector per layer; with the same budget:

# %%
dora_model, dora_metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
print(
    f"held-out loss after {STEPS} steps: LoRA {metrics['val_loss']:.3f}, DoRA {dora_metrics['val_loss']:.3f}"
    f" (+{dora_model.num_parameters(True) - lora_model.num_parameters(True):,d} magnitude parameters)"
)
assert dora_metrics["val_loss"] < base_loss
# %% [markdown]
# ## What full fine-tuning learns, next to LoRA
#
# LoRA bets that the update full fine-tuning would make is close to low-rank, so that `r` directions hold most
# of it. (That LoRA's own `ΔW = sBA` has rank at most `r` is true by construction and tells nothing.) Test the
# bet: fine-tune every weight with the same budget (`lr("full")`, as in lesson 01), take `ΔW = W_full − W` of
# each adapted matrix, and compare it with LoRA's `sBA` of the same matrix. Two questions:
#
# * **how concentrated is full fine-tuning's update?** The share of its squared Frobenius norm `Σσ²` in its top
#   `r = 8` singular directions: all that a rank-8 update could hold;
# * **do the two updates point the same way?** The LoRA paper's normalised subspace similarity (its section 7):
#   with `U_L` and `U_F` the top-`r` left singular vectors (output directions) of the two updates,
#   `φ = ‖U_Lᵀ U_F‖²_F / r` is 1 when the two `r`-dimensional subspaces coincide and `r / out` on average for
#   random ones.

# %%
torch.manual_seed(0)
full_model = copy.deepcopy(base_model)  # every weight trainable
full_metrics = train(full_model, train_data, val_data, budget("full"))
print(
    f"held-out loss after {STEPS} steps: base {base_loss:.3f}, LoRA r=8 {metrics['val_loss']:.3f} (lr {lr('lora')}), "
    f"full fine-tuning {full_metrics['val_loss']:.3f} (lr {lr('full')})"
)
r = 8
rows = []
for name, module in lora_model.base_model.named_modules():
    if not isinstance(module, LoraLayer):
        continue
    with torch.no_grad():
        d_lora = module.delta_weight("default").double().cpu()
        d_full = (full_model.get_submodule(name).weight - base_model.get_submodule(name).weight).double().cpu()
    U_L, S_L, _ = torch.linalg.svd(d_lora)
    U_F, S_F, _ = torch.linalg.svd(d_full)
    rows.append(
        dict(
            name=name,
            kind=name.rsplit(".", 1)[1],
            top_r=((S_F[:r] ** 2).sum() / (S_F**2).sum()).item(),  # full's energy in its top r directions
            phi=((U_L[:, :r].T @ U_F[:, :r]).pow(2).sum() / r).item(),  # subspace similarity of the top r
            random=r / d_full.shape[0],  # the phi of two random r-dimensional subspaces, on average
            norm_L=d_lora.norm().item(),
            norm_F=d_full.norm().item(),
            S_L=S_L,
            S_F=S_F,
        )
    )
kinds = list(dict.fromkeys(row["kind"] for row in rows))  # q_proj, k_proj, ..., down_proj
mean = {k: {key: sum(x[key] for x in rows if x["kind"] == k) / sum(x["kind"] == k for x in rows)
            for key in ("top_r", "phi", "random", "norm_L", "norm_F")} for k in kinds}  # fmt: skip
for k, v in mean.items():
    print(
        f"{k:10s} full fine-tuning's top {r} directions hold {v['top_r']:4.0%} of its update; the overlap with "
        f"LoRA's: φ = {v['phi']:.2f} (random: {v['random']:.3f}); |ΔW| LoRA {v['norm_L']:.2f}, full {v['norm_F']:.2f}"
    )

# %%
show = next(row for row in rows if row["name"] == "model.layers.2.mlp.down_proj")
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
n_sv = 48
ax.semilogy(range(1, n_sv + 1), (show["S_F"][:n_sv] / show["S_F"][0]).numpy(), "o-", ms=3, label="full fine-tuning")
ax.semilogy(range(1, n_sv + 1), (show["S_L"][:n_sv] / show["S_L"][0]).clamp(min=1e-8).numpy(), "s-", ms=3,
            label=f"LoRA, r = {r} (zero after {r}: by construction)")  # fmt: skip
ax.axvline(r + 0.5, color="gray", ls=":", lw=1)
ax.set_xlabel("index i")
ax.set_ylabel("σ_i / σ_1")
ax.set_title("singular values of ΔW, layer 2 down_proj")
ax.legend(fontsize=8)
at = torch.arange(len(kinds)).numpy()
bars = [("top_r", f"full: share in its top {r}"), ("phi", "φ: LoRA vs full"), ("random", "φ: random subspaces")]
for j, (key, label) in enumerate(bars):
    ax2.bar(at + 0.27 * (j - 1), [mean[k][key] for k in kinds], width=0.27, label=label)
ax2.set_xticks(at, kinds)
ax2.set_ylim(0, 1)
ax2.set_title("mean over the layers")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()
assert all(0.25 < v["top_r"] < 0.85 for v in mean.values())  # concentrated, but not of rank r
assert all(v["phi"] > 3 * v["random"] for v in mean.values())  # far closer than chance, in every kind of matrix
assert all(v["norm_L"] > 2 * v["norm_F"] for v in mean.values())  # and LoRA moved further

# %% [markdown]
# What the numbers above say, for this task and budget:
#
# * full fine-tuning's update is **concentrated but not low-rank**: its top 8 directions hold roughly 40% (MLP)
#   to 70% (keys, values) of it, far more than the `8/256` of a flat spectrum, and the rest is spread over
#   hundreds of directions that a rank-8 update cannot hold;
# * LoRA's update points into **much the same output directions** as full fine-tuning's top ones: `φ` of about
#   0.25 to 0.5, against a few hundredths for random subspaces;
# * LoRA's update is several times **larger** (its learning rate is 30 times full fine-tuning's, and only its
#   few directions move), and the two end at about the same held-out loss.
#
# That is LoRA's bet measured: the few directions it can use are among those that matter most to full
# fine-tuning. (A longer or harder task would move these numbers; the cells above measure them for yours.)
# %% [markdown]
# ## Starting from the weight: PiSSA and OLoRA
#
# LoRA starts `BA` at zero, so the first steps only find a direction. PiSSA (Meng et al. 2024) starts `BA` at the
# weight's own **principal part** instead: with the SVD `W = U S Vᵀ`, put the top `r` singular pairs into `B` and
# `A` (split evenly, `A = √(S_r/s) V_rᵀ`, `B = U_r √(S_r/s)`, so `sBA = U_r S_r V_rᵀ`) and leave the rest in the
# frozen base, `W_res = W − sBA`. The model computes `W_res + sBA = W`: it starts unchanged, but training now moves
# the directions that carry most of `W`. OLoRA (Büyükakyüz 2024) does the same with a QR decomposition
# (`B = Q_r`, `A = R_r`). From scratch, on one layer of the float64 model:

# %%
W = small.model.layers[0].self_attn.q_proj.weight.detach()
r_, s_ = 4, 8 / 4
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
A_p = (S[:r_] / s_).sqrt()[:, None] * Vh[:r_]  # (r, in)
B_p = U[:, :r_] * (S[:r_] / s_).sqrt()  # (out, r)
W_res = W - s_ * B_p @ A_p
assert torch.allclose(W_res + s_ * B_p @ A_p, W, rtol=0, atol=1e-13)  # the start leaves W unchanged
share = (S[:r_] ** 2).sum() / (S**2).sum()  # ||sBA||² / ||W||²: the part of W that now trains
print(
    f"PiSSA, rank {r_} of {min(W.shape)}: s·B·A holds {share:.1%} of ||W||² (a flat spectrum: {r_ / min(W.shape):.1%})"
)
assert share > r_ / min(W.shape)

# %% [markdown]
# The library does this for every target with `init_lora_weights="pissa"` (or `"pissa_niter_K"`: a randomised SVD
# with `K` iterations, faster on big matrices) and `"olora"`, rewriting the base weight to `W_res`. Checked: the
# model's logits are unchanged in float64, and `sBA` is the `U_r S_r V_rᵀ` built above (the signs of each singular
# pair are free, the product is not).

# %%
for init in ("pissa", "olora"):
    start = get_peft_model(copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    with torch.no_grad():
        diff = (start(ids).logits - base_logits).abs().max().item()
    q_layer = start.base_model.model.layers[0].self_attn.q_proj
    print(f"{init}: max |logit change| at the start {diff:.1e}")
    assert diff < 1e-10
    assert torch.allclose(q_layer.base_layer.weight + q_layer.delta_weight("default"), W, atol=1e-12)
    if init == "pissa":
        assert torch.allclose(q_layer.delta_weight("default"), s_ * B_p @ A_p, atol=1e-12)
    else:  # OLoRA: B's columns are orthonormal
        B_o = q_layer.lora_B["default"].weight
        assert torch.allclose(B_o.T @ B_o, torch.eye(4, dtype=B_o.dtype), atol=1e-12)

# %% [markdown]
# To share such an adapter with people who have the original model, save it once right after the init and pass
# that folder as `save_pretrained(..., path_initial_model_for_weight_conversion=...)`: the file then holds a plain
# rank-`2r` LoRA on the original `W` (PEFT's convention). Lesson 07 shows the 4-bit cousin, LoftQ.

# %% [markdown]
# ## Summary
#
# You built a LoRA layer (`h = Wx + s·BAx`, `A` kaiming, `B` zero) and saw why `B` starts at zero; compared the
# `α/r` and rsLoRA `α/√r` scalings; checked [`minipeft/lora.py`](../minipeft/lora.py)'s `LoraLayer` against
# your own and against **full fine-tuning** through `dL/dB = s·G·Aᵀ`, `dL/dA = s·Bᵀ·G`
# ([`minipeft/gradcheck.py`](../minipeft/gradcheck.py)); trained on the sonnets with the shared budget and swept
# the rank; merged the adapter away; wrote DoRA's `m·(W + sBA)/‖W + sBA‖` in three lines and derived its
# gradients; compared the update LoRA learns with the one full fine-tuning learns; and started `BA` at the
# weight's principal part (PiSSA, OLoRA) with the model unchanged.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l02.py`](solutions/l02.py).)
#
# **1. Two adapters in one, exactly.** Two LoRA adapters trained on one base can be combined into one
# adapter: PEFT's `add_weighted_adapter(..., combination_type="cat")` (lesson 09 shows the other ways).

# %%
from exercises.l02 import CHECKS


def cat_combine(adapters, weights):
    """One LoRA adapter (A, B), of scaling 1, whose update B @ A is EXACTLY sum_i weights[i] * s_i * B_i @ A_i.

    adapters: a list of (A_i (r_i, in), B_i (out, r_i), s_i a float), weights: a list of floats.
    Returns (A, B) with A (r_1 + r_2 + ..., in) and B (out, r_1 + r_2 + ...): the rank is the sum of the ranks.
    Hint: write B @ A as a sum over the columns of B and the rows of A; torch.cat.
    """
    raise NotImplementedError  # your code


# %%
exercise("cat_combine", cat_combine, CHECKS["cat_combine"])


# %% [markdown]
# **2. DoRA's gradients without the detach.** The lesson treated `n = ‖V‖_row` as a constant. Derive the
# gradients when backward goes through `n` too.


# %%
def dora_grads_through_norm(G, W, A, B, s, m):
    """dL/dm, dL/dA, dL/dB for W' = m * V / ||V||_row, V = W + s B @ A, with the norm NOT detached.

    G (out, in) is dL/dW'; W (out, in), A (r, in), B (out, r), s a float, m (out,). Returns (dm, dA, dB) with
    the shapes of m, A and B.
    Hint: for one row v, d(v / |v|) / dv = (I - v v^T / |v|^2) / |v|; then the chain rule as in the lesson.
    """
    raise NotImplementedError  # your code


# %%
exercise("dora_grads_through_norm", dora_grads_through_norm, CHECKS["dora_grads_through_norm"])


# %% [markdown]
# **3. Undoing a DoRA merge.** `merge_adapter()` writes `W' = m ⊙ (W + sBA)/n` into the base weight. Taking
# it out again needs `n`, which `LoraLayer.merge` keeps in `layer.dora_norm`: why can `n` not be recomputed
# from `W'`, `A`, `B`, `s` and `m`?


# %%
def dora_unmerge(W_merged, A, B, s, m, n):
    """The base weight W (out, in) from the merged DoRA weight W_merged = (m / n)[:, None] * (W + s B @ A).

    A (r, in), B (out, r), s a float, m (out,) the magnitude, n (out,) the row norms of W + s B @ A at merge time.
    Hint: undo the two operations of the merge in reverse order.
    """
    raise NotImplementedError  # your code


# %%
exercise("dora_unmerge", dora_unmerge, CHECKS["dora_unmerge"])
