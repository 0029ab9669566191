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
# # 04 · Prefix tuning: a learned key/value cache
#
# Prefix tuning (Li & Liang 2021, *Prefix-Tuning: Optimizing Continuous Prompts for Generation*) freezes the
# whole model and learns, for every layer, $P$ **keys and values** that every real token can attend to, as if
# they belonged to $P$ earlier tokens:
#
# $$K_i = [\,\text{prefix}^{k}_i \,;\; W_k x\,] \qquad V_i = [\,\text{prefix}^{v}_i \,;\; W_v x\,]
# \qquad \text{prefix}^{k}_i, \text{prefix}^{v}_i : (K, P, h_d) \text{ for layer } i$$
#
# That is exactly the shape of a **KV cache** of length $P$. In this lesson you will:
#
# 1. see that a KV cache *is* a prefix: running $p$, caching, then $x$ equals running $[p; x]$;
# 2. replace the cache by parameters, and show **exactly** that a prefix set to the keys/values of real tokens
#    $p$ reproduces the model on $[p; x]$;
# 3. check `minipeft/prefix.py` against that, and its gradients against the model's own gradients with respect
#    to the cache;
# 4. meet **reparameterisation** (the prefix produced by an MLP) and see what it changes;
# 5. train three variants on the sonnets, and look at how much attention the prefix draws.
#
# **What you need first.** Lesson 00: attention with grouped key/value heads ($K$ kv heads of size $h_d$),
# rotary positions, and the KV cache (`past_key_values`: a list over layers of `(k, v)`, each
# (B, K, S, $h_d$)). Lesson 02 for `get_peft_model`.
#
# Runs in about RUNTIME minutes on a 2-core CPU (measured, full mode); the tests run it in a shorter mode.

# %%
import os

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, exercise, finetune_config, lr, train_and_report

MODEL = "tiny-shakespeare"
VIRTUAL_TOKENS = 20  # P when training: `minipeft finetune --method prefix`'s default (--virtual-tokens)
torch.manual_seed(0)
print(f"device: {DEVICE}, fast: {FAST}, torch {torch.__version__}")

# %%
import copy
import tempfile

from torch import nn

from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.gradcheck import rel_err
from minipeft.peft import PeftModel, get_peft_model
from minipeft.prefix import PrefixTuningConfig
from minipeft.train import evaluate

model, tok = load_pretrained(MODEL)
m64, _ = load_pretrained(MODEL, dtype=torch.float64)  # for the exact checks
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
cfg = model.config
L, K, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
print(f"{MODEL}: L = {L} layers, K = {K} kv heads of hd = {hd} (and {cfg.num_attention_heads} query heads)")
# The training budget of lessons 02-08 (`minipeft finetune`'s): STEPS steps of BATCH blocks of SEQ_LEN tokens
print(
    f"sonnets: {len(train_data)} training blocks of {SEQ_LEN} tokens = {train_data.num_tokens():,} tokens; "
    f"{STEPS} steps x {BATCH} blocks = {STEPS * BATCH / len(train_data):.1f} passes over them"
)

# %% [markdown]
# ## 1. A KV cache is a prefix
#
# When a model generates, it keeps the keys and values of the tokens it has seen, so each new token only
# computes its own. Run a prompt $p$, keep its cache, then run $x$ with that cache: the logits of $x$ are those
# of the model run on $[p; x]$ in one go. Positions carry over too: with a cache of length $P$ our model numbers
# the new tokens $P, P+1, \dots$ (and the cached keys were rotated at positions $0 \dots P-1$ when computed).

# %%
p_ids = torch.tensor([tok.encode("Shall I compare thee to a summer's day?")])  # (1, P)
P = p_ids.size(1)
x_ids = next(batches(val_data, 1, shuffle=False))["input_ids"][:, :32]  # (1, 32): some sonnet text

with torch.no_grad():
    joint = m64(torch.cat([p_ids, x_ids], dim=1)).logits[:, P:]  # [p; x] at once, the logits at x's positions
    cache = m64(p_ids, use_cache=True).past_key_values  # L pairs (k, v), each (1, K, P, hd)
    split = m64(x_ids, past_key_values=cache).logits  # x alone, attending to the cache
print(f"P = {P} prompt tokens; cache: {L} x (k, v) of shape {tuple(cache[0][0].shape)}")
print(f"max |joint - split| = {(joint - split).abs().max().item():.1e}")
assert torch.allclose(joint, split, atol=1e-12, rtol=0)


# %% [markdown]
# ## 2. A learned cache
#
# Prefix tuning makes those cached keys and values the **parameters**: $L \times 2 \times K \times P \times h_d$
# numbers, not computed from any tokens, passed as `past_key_values` on every call. The model itself does not
# change.
#
# Two consequences, both visible in one check:
#
# * **Every real prompt is a prefix.** Set the parameters to the cache of real tokens $p$ and the model on $x$
#   is *exactly* the model on $[p; x]$. Prompt engineering is a (discrete, tiny) corner of prefix tuning's
#   search space.
# * **Most prefixes are no prompt at all.** A real token's keys in layer $i+1$ are computed from its state in
#   layer $i$; a prefix sets every layer's keys and values freely. That is more freedom than any input text
#   (or any soft prompt, lesson 05) has.


# %%
class Prefix(nn.Module):
    def __init__(self, L, K, P, hd):
        super().__init__()
        self.kv = nn.Parameter(torch.randn(L, 2, K, P, hd, dtype=torch.float64))  # per layer: keys, values

    def cache(self, batch_size):  # the same prefix for every row: list over layers of (k, v), (B, K, P, hd)
        return [(kv[0].expand(batch_size, -1, -1, -1), kv[1].expand(batch_size, -1, -1, -1)) for kv in self.kv]


prefix = Prefix(L, K, P, hd)
with torch.no_grad():
    prefix.kv.copy_(torch.stack([torch.stack([k[0], v[0]]) for k, v in cache]))  # the real tokens' keys/values
    learned = m64(x_ids, past_key_values=prefix.cache(1)).logits
print(
    f"prefix set to the cache of p: max |model([p; x]) - model(x | prefix)| = {(joint - learned).abs().max().item():.1e}"
)
assert torch.allclose(joint, learned, atol=1e-12, rtol=0)
print(f"trainable numbers: L * 2 * K * P * hd = {prefix.kv.numel():,}")

# %% [markdown]
# ## 3. The library, and the gradient identity
#
# `PrefixTuningConfig(num_virtual_tokens=P)`. minipeft keeps the prefix as **one table** of shape
# $(P,\; L \cdot 2 \cdot K \cdot h_d)$, which is Hugging Face PEFT's `prompt_embeddings` layout, so adapters move
# between the two: row $j$ is virtual token $j$, split as $[2L, K, h_d]$, layer $i$'s key at $2i$ and its value
# at $2i + 1$. Our `(L, 2, K, P, hd)` tensor maps onto it with one permute.
#
# Load the real tokens' cache into the library's table: the logits must again be the model's on $[p; x]$. Then
# the gradients: the reference is the plain model's gradient with respect to its `past_key_values` (cache
# tensors made leaves with `requires_grad`); the library's table gradient, rearranged, must equal it.

# %%
peft64 = get_peft_model(copy.deepcopy(m64), PrefixTuningConfig(num_virtual_tokens=P))
encoder = peft64.prompt_encoder["default"]
print("table:", tuple(encoder.embedding.weight.shape), "= (P, L * 2 * K * hd)")
with torch.no_grad():
    encoder.embedding.weight.copy_(prefix.kv.permute(3, 0, 1, 2, 4).reshape(P, -1))  # (L,2,K,P,hd) -> (P, L*2*K*hd)
    lib = peft64(x_ids).logits
assert torch.allclose(lib, joint, atol=1e-12, rtol=0)
print("library prefix set to the cache of p == the model on [p; x]")

# dL/d(prefix) against the plain model's dL/d(past keys/values)
leaves = [(k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()) for k, v in cache]
m64(x_ids, past_key_values=leaves, labels=x_ids).loss.backward()
reference = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in leaves])  # (L, 2, K, P, hd)
peft64(x_ids, labels=x_ids).loss.backward()
err = rel_err(encoder.embedding.weight.grad, reference.permute(3, 0, 1, 2, 4).reshape(P, -1))
print(f"dL/d(table) vs the model's dL/d(past_key_values): relative error {err:.1e}")
assert err < 1e-12
assert all(p.grad is None for p in peft64.base_model.parameters())  # the model is frozen

# %% [markdown]
# ## 4. Reparameterisation
#
# Li & Liang report that optimising the table directly was unstable and worse, and instead produce it with
# an MLP from a smaller matrix (their section 4.3):
#
# $$\text{prefix} = \mathrm{Linear}_{E \to L \cdot 2 \cdot K h_d}\big(\tanh(\mathrm{Linear}_{K h_d \to E}(\text{embedding}))\big)
# \qquad \text{embedding}: (P, K h_d)$$
#
# After training only the table matters: the MLP is thrown away (PEFT saves only the table). With
# `prefix_projection=True` minipeft builds the same module as PEFT's `PrefixEncoder`.
#
# Nothing about the *model* changes, only the parameters the optimizer sees. By the chain rule the MLP's
# gradients are the table's gradient pulled back through the MLP, $\partial L/\partial \theta = J^\top
# \partial L / \partial\, \text{table}$ ($J$ the MLP's Jacobian): check it. But a step on $\theta$ moves the
# table by $J J^\top$ times its gradient, not by the gradient itself: every row and every layer of the table
# moves together, through shared weights. A different geometry for the same loss.

# %%
torch.manual_seed(0)
reparam = get_peft_model(copy.deepcopy(m64), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
enc = reparam.prompt_encoder["default"]
print(enc.transform)
mlp_params = [p for p in reparam.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in mlp_params):,} (MLP + embedding) for a table of {enc.prefix().numel():,}")

table = enc.prefix()  # (P, L*2*K*hd), a function of the MLP's parameters
table.retain_grad()
kv = table.view(P, 2 * L, K, hd).permute(1, 2, 0, 3)[:, None]  # (2L, 1, K, P, hd): what prefix.py builds
m64(x_ids, past_key_values=[(kv[2 * i], kv[2 * i + 1]) for i in range(L)], labels=x_ids).loss.backward()
pulled_back = torch.autograd.grad(enc.prefix(), mlp_params, grad_outputs=table.grad)  # J^T dL/d(table)
reparam.zero_grad()
reparam(x_ids, labels=x_ids).loss.backward()
err = max(rel_err(p.grad, g) for p, g in zip(mlp_params, pulled_back))
print(f"MLP gradients vs J^T dL/d(table): max relative error {err:.1e}")
assert err < 1e-12

# %% [markdown]
# What the three starting points look like. PEFT initialises a plain table as `nn.Embedding` does, $N(0, 1)$
# per number; the MLP starts from `nn.Linear`'s small uniform init; or (as Li & Liang recommend for small data)
# start from the keys and values of **real words**, which we now know how to compute. Compare their scale with
# the keys and values the model really produces, and the loss each starting point gives:

# %%
init_text = "Sonnet. From fairest creatures we desire increase, that thereby beauty's rose might never die"
P_TRAIN = VIRTUAL_TOKENS
init_ids = torch.tensor([tok.encode(init_text)[:P_TRAIN]])  # its first P_TRAIN tokens


def real_word_table(model_, ids_):  # the cache of real tokens, in the table layout (P, L*2*K*hd)
    with torch.no_grad():
        c = model_(ids_, use_cache=True).past_key_values
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in c]).permute(3, 0, 1, 2, 4).reshape(ids_.size(1), -1)


def make(variant, device=DEVICE):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=device)
    config = PrefixTuningConfig(num_virtual_tokens=P_TRAIN, prefix_projection=(variant == "MLP"))
    peft_model = get_peft_model(base, config)
    if variant == "real words":
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(real_word_table(base, init_ids.to(device)))
    return peft_model


variants = ("random table", "MLP", "real words")
val_batch = next(batches(val_data, BATCH, shuffle=False))["input_ids"]
with torch.no_grad():
    real_rms = real_word_table(model, init_ids).pow(2).mean().sqrt().item()
    for v in variants:
        pm = make(v, "cpu")
        rms = pm.prompt_encoder["default"].prefix().pow(2).mean().sqrt().item()
        print(
            f"{v:13s}: RMS of the prefix {rms:6.3f} (the model's own keys/values: {real_rms:.3f}); "
            f"val loss {pm(val_batch, labels=val_batch).loss.item():.3f}"
        )
    print(f"{'no prefix':13s}: val loss {model(val_batch, labels=val_batch).loss.item():.3f}")
    mlp_rms = make("MLP", "cpu").prompt_encoder["default"].prefix().pow(2).mean().sqrt().item()
assert mlp_rms < real_rms / 2  # the MLP's prefix starts small: its values mix little into the real tokens

# %% [markdown]
# One more instrument before training: how much attention the real tokens pay to the prefix, layer by layer.
# Hook every attention module, recompute its attention probabilities, and sum those on the $P$ prefix positions:

# %%
from minipeft.model import apply_rotary


def prefix_attention(peft_model, ids, P):
    # per layer: the share of attention the real tokens give to the P prefix positions (mean over heads, queries)
    shares = []

    def hook(attn, inputs, output):
        x, cos, sin = inputs[:3]
        B, T, _ = x.shape
        q = apply_rotary(attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)
        k = output[1][0].repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (B, H, P + T, hd)
        S = k.size(2)
        causal = torch.arange(S, device=x.device)[None, :] <= torch.arange(S - T, S, device=x.device)[:, None]
        probs = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        shares.append(probs[..., :P].sum(-1).mean().item())  # probs: (B, H, T, S)

    hooks = [block.self_attn.register_forward_hook(hook) for block in peft_model.base_model.model.layers]
    with torch.no_grad():
        peft_model(ids)
    for h in hooks:
        h.remove()
    return shares


# %% [markdown]
# ## 5. Train the three
#
# Same data and the training budget of lessons 02-08: `minipeft finetune`'s (`STEPS` steps of `BATCH` x `SEQ_LEN`
# tokens, 5% warmup, gradients clipped to norm 1, the loss on `VAL_BATCHES` held-out batches), so the held-out
# losses compare with the other lessons'. The two tables train at finetune's learning rate for prefix tuning,
# `lr("prefix")`; the MLP gets a ten times smaller one, because each of its weights moves every row of the table
# at once, and at the tables' rate its loss goes up instead of down (try it: set `LRS["MLP"] = lr("prefix")`).

# %%
LRS = {"random table": lr("prefix"), "MLP": lr("prefix") / 10, "real words": lr("prefix")}


def finetune(variant):
    peft_model = make(variant)
    shares_at_init[variant] = prefix_attention(peft_model, val_batch.to(DEVICE), P_TRAIN)
    config = finetune_config("prefix", lr=LRS[variant], eval_every=max(1, STEPS // 3))
    before, metrics = train_and_report(variant, peft_model, train_data, val_data, config)
    return peft_model, before, metrics


shares_at_init = {}
runs = {v: finetune(v) for v in variants}
no_prefix = evaluate(model.to(DEVICE), val_data, BATCH, VAL_BATCHES)[0]
fig, ax = plt.subplots(figsize=(8, 3.6))
for v, (_, before, metrics) in runs.items():
    ax.plot(
        [0] + [e["step"] for e in metrics["eval"]], [before] + [e["val_loss"] for e in metrics["eval"]], "o-", label=v
    )
ax.axhline(no_prefix, color="k", ls="--", lw=1, label="the model without a prefix")
ax.set_ylim(top=max(no_prefix + 0.6, min(before for _, before, _ in runs.values()) + 0.1))
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend()
plt.show()
for v, (_, before, metrics) in runs.items():
    assert metrics["val_loss"] < before, v
final = {v: metrics["val_loss"] for v, (_, _, metrics) in runs.items()}
n_trainable = {v: runs[v][0].num_parameters(trainable_only=True) for v in runs}
print(
    f"no prefix: {no_prefix:.3f}; the three end within {max(final.values()) - min(final.values()):.3f} of each "
    f"other; the MLP trains {n_trainable['MLP'] / n_trainable['random table']:.1f} times the table's parameters"
)
assert runs["random table"][1] > no_prefix  # a random prefix starts worse than no prefix at all
if not FAST:  # what the full budget shows (a few fast-mode steps are too few to separate the curves)
    assert all(loss < no_prefix for loss in final.values())
    assert max(final.values()) - min(final.values()) < 0.1

# %% [markdown]
# How to read it (full mode; fast mode is too short to separate the curves). The **random table** starts far off,
# worse than no prefix at all (asserted): random keys and values of about the model's own scale (the RMS printed
# before training) draw a large share of every layer's attention (section 6 prints it, layer by layer) and mix
# noise into every token; its first steps are spent getting back. The **MLP**'s prefix draws a share of the
# attention too, but its values are small (its RMS, printed, is under half the model's own: asserted), so it mixes
# in little and starts near the model without a prefix. The **real-word** prefix starts where a real prompt
# would. After the budget the three end close together and all below the model without a prefix (both asserted
# in full mode), the MLP with several times the trainable parameters (printed; thrown away after training). At
# this scale the starting point matters more than the parameterisation; Li & Liang saw the instability on much
# larger models, so treat "the MLP helps" as something to measure on your problem, not to assume.
#
# ## 6. Look at it
#
# How much attention do the real tokens pay to the prefix, layer by layer, before and after training?

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
width = 0.8 / len(runs)
for j, (v, (peft_model, _, _)) in enumerate(runs.items()):
    trained_shares = prefix_attention(peft_model, val_batch.to(DEVICE), P_TRAIN)
    for ax, shares in ((axes[0], shares_at_init[v]), (axes[1], trained_shares)):
        ax.bar([i + j * width for i in range(L)], shares, width, label=v)
    assert all(0 < s_ < 1 for s_ in trained_shares)
    print(
        f"{v:13s} attention on the prefix, layers 0..{L - 1}: at init "
        + " ".join(f"{s_:.2f}" for s_ in shares_at_init[v])
        + "   trained "
        + " ".join(f"{s_:.2f}" for s_ in trained_shares)
    )
for ax, title in zip(axes, ("at init", "after training")):
    ax.set_xticks([i + width for i in range(L)], [f"layer {i}" for i in range(L)])
    ax.set_title(title)
axes[0].set_ylabel("share of attention on the prefix")
axes[0].legend(fontsize=8)
plt.show()

best = min(runs, key=lambda v: runs[v][2]["val_loss"])
prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=DEVICE)
with torch.no_grad():  # temperature 0.8, top-k 50, a fixed seed: greedy decoding of a model this small loops
    out = runs[best][0].generate(
        prompt, 48, temperature=0.8, top_k=50, generator=torch.Generator(DEVICE).manual_seed(0)
    )
print(f"with the trained prefix ({best}):\n" + tok.decode(out[0].tolist()))

# %% [markdown]
# Saving writes PEFT's `adapter_model.safetensors` with the table as `prompt_embeddings` (what HF PEFT loads),
# plus minipeft's `adapter_raw.safetensors` with the trainable parameters (the MLP, when there is one), so
# training can resume. Loading gives the same outputs:

# %%
trained = runs["MLP"][0]
with tempfile.TemporaryDirectory() as d:
    trained.save_pretrained(d)
    print(sorted(os.listdir(d)), {k: tuple(v.shape) for k, v in trained.adapter_state_dict("default").items()})
    fresh, _ = load_pretrained(MODEL, device=DEVICE)
    loaded = PeftModel.from_pretrained(fresh, d)
    with torch.no_grad():
        assert torch.allclose(loaded(val_batch.to(DEVICE)).logits, trained(val_batch.to(DEVICE)).logits, atol=1e-5)
print("saved, loaded: same logits")

# %% [markdown]
# ## Summary
#
# * A prefix is a **learned KV cache**: $P$ keys and values per layer, handed to the frozen model as
#   `past_key_values`; the real tokens sit at positions $P, P+1, \dots$ and the prefix keys are used as stored.
# * Set to the cache of real tokens $p$, it reproduces the model on $[p; x]$ **exactly**; its gradient is the
#   model's gradient with respect to its cache (checked in float64: the relative error printed in section 3).
# * **Reparameterisation** (an MLP producing the table) changes the optimisation geometry, not the model; after
#   training only the table is kept. Here the starting points differed far more than where the three ended.
# * It lives in **`minipeft/prefix.py`** (`PrefixTuningConfig`, `PrefixEncoder`), in HF PEFT's table layout.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it, which checks your function against the library on its own inputs: "correct", or what differs.

# %% [markdown]
# **Exercise 1.** The reparameterisation of section 4, by hand: the table from the embedding and the MLP's four
# tensors, viewed as $(P, 2L, K, h_d)$: virtual token, then layer $i$'s key at $2i$ and its value at $2i + 1$, then
# kv head. The check compares with the library's `PrefixEncoder` (`prefix_projection=True`) on a small model, and
# pulls a gradient back through your table to the embedding.

# %%
from exercises.l04 import check_cache_to_table, check_prefix_table


def prefix_table(embedding, w1, b1, w2, b2, L, K):
    """embedding (P, K*hd), w1 (E, K*hd), b1 (E,), w2 (L*2*K*hd, E), b2 (L*2*K*hd,) -> (P, 2L, K, hd).

    Hint: PEFT's PrefixEncoder is Linear, tanh, Linear; then one view of the (P, L*2*K*hd) table."""
    raise NotImplementedError  # your code


# %%
exercise("prefix_table", prefix_table, check_prefix_table)

# %% [markdown]
# **Exercise 2.** Turn the KV cache of real tokens $p$ into the library's table, so that the prefix model on $x$
# is exactly the model on $[p; x]$ (section 3 did it from our `(L, 2, K, P, hd)` tensor; here you start from the
# cache itself). The check loads your table into a small float64 model's prefix and compares logits.


# %%
def cache_to_table(cache):
    """cache: a list over L layers of (k, v), each (1, K, P, hd) -> the table (P, L * 2 * K * hd).

    Hint: stack into (L, 2, K, P, hd) first; the table's row j is virtual token j, laid out [L, 2, K, hd]."""
    raise NotImplementedError  # your code


# %%
exercise("cache_to_table", cache_to_table, check_cache_to_table)
