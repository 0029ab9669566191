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
# and how exact that is; and DoRA in a few lines.
#
# **What you need to know first:** lesson 00 (the model) and lesson 01 (the training loop, the memory bill);
# the rank of a matrix; the chain rule for a matrix product.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("MINIPEFT_FAST") == "1"  # the tests set this: fewer steps, every cell still runs
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")

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
d, alpha, lr = 256, 16, 1e-3
x1, g = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
change = {"α/r": [], "α/√r (rsLoRA)": []}
for r in ranks:
    A = torch.empty(r, d, dtype=torch.float64)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    for rule, s in [("α/r", alpha / r), ("α/√r (rsLoRA)", alpha / math.sqrt(r))]:
        B = -lr * s * torch.outer(g, A @ x1)  # one SGD step from B = 0: B - lr * dL/dB
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
def cmp(name, ours, reference):
    exact = torch.equal(ours, reference)
    err = ((ours - reference).norm() / reference.norm()).item()
    print(f"{name:10s} exact: {str(exact):5s} relative error: {err:.1e}")
    return err


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

assert cmp("dL/dB", B.grad, s * G @ A.T) < 1e-12
assert cmp("dL/dA", A.grad, s * B.T @ G) < 1e-12

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
# Now on the bundled model, with the library's training loop. `target_modules="all-linear"` adapts every
# linear layer of every block (q, k, v, o, gate, up, down), `r = 8`. Only the LoRA matrices reach the
# optimizer; lesson 01's loop is otherwise unchanged.

# %%
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import load_text_dataset
from minipeft.train import TrainConfig, evaluate, train

SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
STEPS = 10 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
EVAL_BATCHES = 6 if FAST else None  # None: the whole held-out set
LR = 2e-3
base_model, tok = load_pretrained("tiny-shakespeare", device=device)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
base_loss, _ = evaluate(base_model, val_data, BATCH, max_batches=EVAL_BATCHES)


def finetune(config, steps=STEPS, lr=LR):
    torch.manual_seed(0)  # the same A initialisation for every run
    model = get_peft_model(copy.deepcopy(base_model), config)
    cfg = TrainConfig(
        steps=steps, lr=lr, batch_size=BATCH, warmup_ratio=0.1, log_every=1, eval_batches=EVAL_BATCHES, progress=False
    )
    return model, train(model, train_data, val_data, cfg)


lora_model, metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
lora_model.print_trainable_parameters()
print(f"held-out loss: base {base_loss:.3f} -> LoRA r=8 {metrics['val_loss']:.3f}")
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
prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=device)
out = lora_model.generate(
    prompt,
    max_new_tokens=20 if FAST else 60,
    temperature=0.8,
    top_k=50,
    generator=torch.Generator(device=device).manual_seed(0),
)
print(tok.decode(out[0].tolist()))

# %% [markdown]
# ## How much rank does it need?
#
# Train the same budget of steps at several ranks, with `α = 16` and both scaling rules, and plot the
# held-out loss. Compare the spread between ranks with the gap to the base model: on a small task a low rank
# already captures most of what the budget can learn (the LoRA paper saw this too). In the fast test setting
# this is a handful of steps, so the differences between ranks are mostly noise: run the notebook yourself.

# %%
RANKS = [2, 16] if FAST else [1, 2, 4, 8, 16, 32, 64, 128] if device == "cuda" else [1, 4, 16, 64]
sweep = {"α/r": [], "α/√r (rsLoRA)": []}
for r in RANKS:
    for rule, rs in [("α/r", False), ("α/√r (rsLoRA)", True)]:
        _, m = finetune(LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", use_rslora=rs))
        sweep[rule].append(m["val_loss"])
        print(f"r={r:3d} {rule:14s} held-out loss {m['val_loss']:.3f}")

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
check_ids = val_data.input_ids[0][None].to(device)
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
# so at the start (`B = 0`) `W' = W` again. As the paper suggests, the norm is treated as a constant in
# backward (detached), which saves memory and is what the identities in `gradcheck.py` assume.


# %%
def dora_weight(W, A, B, s, m):
    V = W + s * B @ A  # LoRA's update of the direction
    return m[:, None] * V / V.norm(dim=1, keepdim=True)  # each row rescaled to length m


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
errors = lora_gradient_identity(dm, {"input_ids": ids, "labels": ids})  # with dL/dm too
print(
    "DoRA gradients vs full fine-tuning:", {k: f"{v:.1e}" for k, v in errors["model.layers.0.self_attn.q_proj"].items()}
)
assert max_error(errors) < 1e-12

# %%
dora_model, dora_metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
print(
    f"held-out loss after {STEPS} steps: LoRA {metrics['val_loss']:.3f}, DoRA {dora_metrics['val_loss']:.3f}"
    f" (+{dora_model.num_parameters(True) - lora_model.num_parameters(True):,d} magnitude parameters)"
)
assert dora_metrics["val_loss"] < base_loss

# %% [markdown]
# ## Look at it: the learned update is low-rank
#
# The singular values of one trained `ΔW = sBA`: at most `r = 8` are non-zero, whatever the size of `W`.

# %%
layer = lora_model.base_model.model.layers[2].mlp.down_proj
with torch.no_grad():
    S = torch.linalg.svdvals(layer.delta_weight("default").double().cpu())
plt.figure(figsize=(6, 3))
plt.semilogy(S[:32].clamp(min=1e-20), "o")
plt.xlabel("index")
plt.ylabel("singular value of ΔW")
plt.title("layer 2 down_proj, LoRA r = 8")
plt.show()
assert (S[8:] < 1e-6 * S[0]).all()

# %% [markdown]
# ## Summary
#
# You built a LoRA layer (`h = Wx + s·BAx`, `A` kaiming, `B` zero) and saw why `B` starts at zero; compared the
# `α/r` and rsLoRA `α/√r` scalings; checked [`minipeft/lora.py`](../minipeft/lora.py)'s `LoraLayer` against
# your own and against **full fine-tuning** through `dL/dB = s·G·Aᵀ`, `dL/dA = s·Bᵀ·G`
# ([`minipeft/gradcheck.py`](../minipeft/gradcheck.py)); trained on the sonnets and swept the rank; merged the
# adapter away; and wrote DoRA's `m·(W + sBA)/‖W + sBA‖` in three lines.
#
# ## Exercises
#
# **1.** How many trainable parameters does `LoraConfig(r=16, target_modules="all-linear")` add to
# `tiny-shakespeare`? Work it out from the config (`base_model.config`), not by building the model.

# %%
answer = None  # your code: an int

# %%
expected = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=16, target_modules="all-linear")).num_parameters(True)
if answer is None:
    print("not answered yet")
elif answer == expected:
    print(f"right: {answer:,d}")
else:
    print(
        f"not quite: {answer:,d}. r·(in + out) for q, k, v, o, gate, up, down in every layer (k, v are narrower: GQA)."
    )

# %% [markdown]
# **2.** Given `G = dL/dW'` of a merged layer and the adapter's `A`, `B`, `s` (the tensors from the gradient
# identity section: `G`, `A`, `B`, `s`), compute `dL/dA` with one line of matrix algebra.

# %%
answer = None  # your code: a tensor of A's shape

# %%
if answer is None:
    print("not answered yet")
elif answer.shape == A.shape and torch.allclose(answer, A.grad, rtol=1e-10, atol=1e-12):
    print("right: dL/dA = s Bᵀ G")
else:
    print(f"not quite: shape {tuple(answer.shape)} (want {tuple(A.shape)}). y = W'x with W' = W + sBA.")

# %% [markdown]
# **3.** With `lora_alpha=16` and `r=64`, what is the scaling `s` with rsLoRA? And at what rank `r` would the
# plain `α/r` rule give the same `s` (with the same `α`)? Answer as a tuple `(s, r)`.

# %%
answer = None  # your code: (float, int)

# %%
s_rs = LoraConfig(r=64, lora_alpha=16, use_rslora=True).scaling
if answer is None:
    print("not answered yet")
elif math.isclose(answer[0], s_rs) and LoraConfig(r=answer[1], lora_alpha=16).scaling == s_rs:
    print(f"right: s = {s_rs}, the same as α/r at r = {answer[1]}")
else:
    print(f"not quite: {answer}. rsLoRA: s = α/√r.")
