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
# # 09 · Many adapters on one base
#
# An adapter is small next to its base model (below, one adapter's file is a few percent of the base's weights).
# So one base can serve many tasks: keep the base in memory once, and switch, combine or mix the small adapters.
#
# **What you will build:** two LoRA adapters on one `tiny-shakespeare` base — one for the sonnets, one for the
# sonnets in CAPITALS — then
# 1. **swap** between them, and check each against a model that has only that adapter, loaded from disk;
# 2. **combine** them with `add_weighted_adapter` in its three ways (`cat`, `linear`, `svd`), checking each
#    against the exact weighted sum of the updates;
# 3. serve a **mixed batch**, in which every row uses its own adapter (or none: `"__base__"`), in `forward`
#    and in `generate`.
#
# **What you need to know first:** lesson 02 (LoRA: `ΔW = s·BA`, merging); the singular value decomposition
# (for `svd`).
#
# Runs in about 3 minutes on a 2-core CPU (measured on 2026-11-30 in full mode, on a machine shared with
# other jobs); `MINIPEFT_FAST=1` (the tests) trains 10 steps instead of 60.

# %%
import math

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, VAL_BATCHES, exercise, finetune_config

device = DEVICE
torch.manual_seed(0)
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## Two tasks, two adapters
#
# The second task is the same poems in upper case: easy to tell apart at a glance, and a real shift for the
# model (its training text has capitals mainly in speakers' names). Both use the same LoRA configuration, and
# the one training budget of lessons 02-08 (`lessons/common.py`, `minipeft finetune --method lora`'s).

# %%
import copy
import tempfile
from pathlib import Path

from minipeft import LoraConfig, PeftModel, get_peft_model, load_pretrained
from minipeft.checkpoint import ASSETS
from minipeft.data import load_text_dataset
from minipeft.train import evaluate, train

base, tok = load_pretrained("tiny-shakespeare", device=device)
sonnets = ASSETS / "data" / "sonnets.txt"  # the bundled fine-tuning data
workdir = Path(tempfile.mkdtemp())
caps = workdir / "sonnets_caps.txt"
caps.write_text(sonnets.read_text().upper())
data = {"sonnets": load_text_dataset(sonnets, tok, SEQ_LEN), "caps": load_text_dataset(caps, tok, SEQ_LEN)}
for task, (tr, va) in data.items():
    print(
        f"{task:8s} {len(tr):4d} training and {len(va):3d} held-out blocks;",
        repr(tok.decode(va.input_ids[0][:16].tolist())),
    )

lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])

# %% [markdown]
# `get_peft_model` creates the first adapter, named here; `add_adapter` puts a second one beside it in the same
# layers. Only the **active** adapter trains (`set_adapter` switches which one that is), so the same
# `train()` call trains whichever is active.

# %%
torch.manual_seed(0)
model = get_peft_model(copy.deepcopy(base), lora, adapter_name="sonnets")
model.add_adapter("caps", lora)
print(model.adapters, "active:", model.active_adapter)
print(model.base_model.model.layers[0].self_attn.q_proj.lora_A)

for task in ["sonnets", "caps"]:
    model.set_adapter(task)
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {task}  # ...lora_A.<adapter>.weight: only the active adapter trains
    tr, va = data[task]
    m = train(model, tr, va, finetune_config("lora"))
    print(f"trained {task!r}: held-out loss on its task {m['val_loss']:.3f}")

# %% [markdown]
# ## Swapping
#
# `set_adapter(name)` changes which adapter every LoRA layer uses; nothing is copied. Each adapter saves to its
# own folder (`<dir>/<name>/`, Hugging Face PEFT's layout), and loads onto a fresh base alone. The adapted model
# must give the same logits in both cases:

# %%
model.save_pretrained(workdir / "adapters")
print(sorted(str(p.relative_to(workdir)) for p in (workdir / "adapters").rglob("*")))
adapter_kb = (workdir / "adapters" / "sonnets" / "adapter_model.safetensors").stat().st_size / 1e3
base_kb = sum(p.numel() * p.element_size() for p in base.parameters()) / 1e3
print(f"one adapter's file: {adapter_kb:,.0f} kB; the base model's weights: {base_kb:,.0f} kB")
ids = data["sonnets"][1].input_ids[0][None].to(device)

for task in ["sonnets", "caps"]:
    model.set_adapter(task)
    alone = PeftModel.from_pretrained(copy.deepcopy(base), workdir / "adapters" / task)
    with torch.no_grad():
        diff = (model(ids).logits - alone(ids).logits).abs().max().item()
    print(f"{task:8s} switched vs loaded alone: max |logit difference| {diff:.1e}")
    assert diff < 1e-5


# %% [markdown]
# ### Who is good at what
#
# Every adapter on every task's held-out text (and the base, inside `disable_adapter()`):


# %%
def losses_of(adapter):
    if adapter == "base":
        with model.disable_adapter():
            return [evaluate(model, data[t][1], BATCH, VAL_BATCHES)[0] for t in data]
    model.set_adapter(adapter)
    return [evaluate(model, data[t][1], BATCH, VAL_BATCHES)[0] for t in data]


table = {a: losses_of(a) for a in ["base", "sonnets", "caps"]}
for a, row in table.items():
    print(f"{a:8s} " + "  ".join(f"{t}: {l:.3f}" for t, l in zip(data, row)))
assert table["sonnets"][0] < table["caps"][0] and table["sonnets"][0] < table["base"][0]
assert table["caps"][1] < table["sonnets"][1] and table["caps"][1] < table["base"][1]

# %% [markdown]
# ## Combining: `add_weighted_adapter`
#
# A new adapter from existing ones with weights `w_i`. The target is the weighted sum of their updates,
# `ΔW = Σ w_i s_i B_i A_i`. Hugging Face PEFT offers three ways, and they are not equally exact:
#
# * **`cat`** stacks the factors: `A = [A_1; A_2]`, `B = [w_1 s_1 B_1, w_2 s_2 B_2]`. Then `BA` is *exactly*
#   the weighted sum, at rank `r_1 + r_2`.
# * **`linear`** adds the factors: `A = Σ √(w_i s_i) A_i`, `B = Σ √(w_i s_i) B_i`, keeping rank `r`. But the
#   product has cross terms `B_1 A_2 + B_2 A_1`: it is **not** the weighted sum (kept for parity with PEFT).
# * **`svd`** forms the exact sum and truncates it to rank `svd_rank` with an SVD: the best rank-`k`
#   approximation, whose squared error is the sum of the dropped squared singular values.
#
# (The new adapters have `lora_alpha = r`, so their scaling is 1.)

# %%
weights = [0.5, 0.5]
svd_errors = {}
for kind in ["cat", "linear", "svd"]:
    svd_errors[kind] = model.add_weighted_adapter(
        ["sonnets", "caps"], weights, f"mix_{kind}", combination_type=kind, svd_rank=8
    )

name = "model.layers.2.self_attn.v_proj"
layer = model.base_model.get_submodule(name)
exact = sum(w * layer.delta_weight(a) for a, w in zip(["sonnets", "caps"], weights))  # Σ w_i s_i B_i A_i
with torch.no_grad():
    for kind in ["cat", "linear", "svd"]:
        delta = layer.delta_weight(f"mix_{kind}")
        err = ((delta - exact).norm() / exact.norm()).item()
        print(
            f"{kind:6s} rank {layer.lora_A[f'mix_{kind}'].weight.shape[0]:2d}  "
            f"relative distance to the weighted sum: {err:.1e}"
        )
    assert torch.allclose(layer.delta_weight("mix_cat"), exact, atol=1e-6)  # cat is exact
    assert not torch.allclose(layer.delta_weight("mix_linear"), exact, atol=1e-3)  # linear is not
    sq_err = ((layer.delta_weight("mix_svd") - exact) ** 2).sum().item()
    assert math.isclose(sq_err, svd_errors["svd"][name], rel_tol=1e-3, abs_tol=1e-9)  # svd's error, as reported

# %% [markdown]
# The picture of `svd`: the exact sum of two rank-8 updates has up to 16 non-zero singular values; keeping 8
# drops the shaded ones, and the reported error is exactly their squared sum.

# %%
S = torch.linalg.svdvals(exact.detach().double().cpu())
plt.figure(figsize=(6, 3))
plt.bar(range(20), S[:20], color=["C0"] * 8 + ["C3"] * 12)
plt.axvline(7.5, color="k", ls="--")
plt.xlabel("singular value index")
plt.ylabel("σ")
plt.title(f"{name}: 0.5 ΔW_sonnets + 0.5 ΔW_caps")
plt.show()
assert math.isclose((S[8:] ** 2).sum().item(), svd_errors["svd"][name], rel_tol=1e-3, abs_tol=1e-9)

# %%
for a in ["mix_cat", "mix_linear", "mix_svd"]:
    table[a] = losses_of(a)
names = list(table)
grid = torch.tensor([table[a] for a in names])
plt.figure(figsize=(5.5, 4))
plt.imshow(grid, cmap="viridis_r", aspect="auto")
plt.xticks(range(len(data)), list(data))
plt.yticks(range(len(names)), names)
plt.xlabel("held-out text")
plt.ylabel("adapter")
for i in range(len(names)):
    for j in range(len(data)):
        plt.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w")
plt.colorbar(label="held-out loss")
plt.title("adapter × task")
plt.show()

# %% [markdown]
# `cat` applies exactly half of each update, so it is a compromise between the two specialists; `svd`
# approximates `cat` at half its rank. `linear`'s update is far from the weighted sum (printed above), so
# when it lands near the same losses that is luck, not design: check the update, not only the loss.
#
# ## Mixed batches
#
# Serving many users at once: each row of one batch names its adapter, `"__base__"` for none. Inside each
# LoRA layer the rows are grouped by adapter, so every row gets exactly what that adapter alone would give.

# %%
model.set_adapter("sonnets")
prompt = tok.encode("WHEN forty winters shall besiege thy brow,\n")
batch_ids = torch.tensor([prompt] * 3, device=device)
rows = ["sonnets", "caps", "__base__"]
with torch.no_grad():
    mixed = model(batch_ids, adapter_names=rows).logits
    for i, a in enumerate(rows):
        if a == "__base__":
            with model.disable_adapter():
                single = model(batch_ids[i : i + 1]).logits
        else:
            model.set_adapter(a)
            single = model(batch_ids[i : i + 1]).logits
        assert torch.allclose(mixed[i], single[0], atol=1e-5), a
print("each row of the mixed batch = that adapter alone")

gen = torch.Generator(device=device).manual_seed(0)
out = model.generate(
    batch_ids, max_new_tokens=24 if FAST else 60, temperature=0.7, top_k=40, generator=gen, adapter_names=rows
)
for a, row in zip(rows, out):
    print(f"--- {a}\n{tok.decode(row[len(prompt) :].tolist())}\n")

# %% [markdown]
# ## Summary
#
# You trained two LoRA adapters on one base and switched between them with `set_adapter`, checking each
# against the same adapter loaded alone from disk; combined them with `add_weighted_adapter` and measured how
# close `cat` (exact), `linear` (cross terms) and `svd` (best rank-k, error reported) come to the weighted sum
# of updates; and served a batch whose rows use different adapters, in `forward` and `generate`. The code is in
# [`minipeft/peft.py`](../minipeft/peft.py) (`add_adapter`, `set_adapter`, `add_weighted_adapter`,
# `adapter_names`) and [`minipeft/lora.py`](../minipeft/lora.py) (`combine_adapters`, the per-row forward of
# `LoraLayer`).
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l09.py`](solutions/l09.py).)
#
# **1. The routing of a mixed batch.** Write what one LoRA layer does with `adapter_names`; the check runs a small
# `PeftModel` with `adapter_names` and compares your layer's output with what its `q_proj` returned.

# %%
from exercises.l09 import CHECKS


def mixed_lora(x, base_out, adapters, row_adapters):
    """One LoRA layer on a mixed batch.

    x (B, T, in): the layer's input; base_out (B, T, out): the base layer's output for it (W x + b);
    adapters: {name: (A (r, in), B (out, r), scaling)}; row_adapters: B names, one per row, "__base__" for none.
    Returns (B, T, out): row i is base_out[i] + s B A x[i] for its adapter, or base_out[i] for "__base__".
    Do not modify base_out in place. Hint: gather the rows of each adapter with an index tensor, x[rows].
    """
    raise NotImplementedError  # your code


# %%
exercise("mixed_lora", mixed_lora, CHECKS["mixed_lora"])


# %% [markdown]
# **2. The `svd` combination.** Build `add_weighted_adapter(..., combination_type="svd")`'s factors from the
# adapters; the check compares them with the library's on a small model, and your error with the one it reports.


# %%
def svd_combine(adapters, weights, rank):
    """The best rank-`rank` approximation of sum_i w_i s_i B_i A_i, as factors, and what it drops.

    adapters: a list of (A_i (r_i, in), B_i (out, r_i), s_i); weights: a list of floats w_i.
    Returns (A (rank, in), B (out, rank), error): B @ A is the truncated sum (the new adapter's scaling is 1),
    error a float, the squared Frobenius norm of (the exact sum - B @ A).
    Hint: torch.linalg.svd(delta, full_matrices=False) returns U, S, Vh with delta = U diag(S) Vh.
    """
    raise NotImplementedError  # your code


# %%
exercise("svd_combine", svd_combine, CHECKS["svd_combine"])
