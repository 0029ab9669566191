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
# An adapter is a few hundred kilobytes; the base model is the big part. So one base can serve many tasks:
# keep the base in memory once, and switch, combine or mix the small adapters.
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
# ## Two tasks, two adapters
#
# The second task is the same poems in upper case: easy to tell apart at a glance, and a real shift for the
# model (its training text has capitals mainly in speakers' names). Both use the same LoRA configuration.

# %%
import copy
import tempfile
from pathlib import Path

from minipeft import LoraConfig, PeftModel, get_peft_model, load_pretrained
from minipeft.checkpoint import ASSETS
from minipeft.data import load_text_dataset
from minipeft.train import TrainConfig, evaluate, train

SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
STEPS = 8 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
EVAL_BATCHES = 4 if FAST else None  # None: the whole held-out set

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
    m = train(
        model,
        tr,
        va,
        TrainConfig(
            steps=STEPS, lr=2e-3, batch_size=BATCH, warmup_ratio=0.1, eval_batches=EVAL_BATCHES, progress=False, seed=0
        ),
    )
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
            return [evaluate(model, data[t][1], BATCH, EVAL_BATCHES)[0] for t in data]
    model.set_adapter(adapter)
    return [evaluate(model, data[t][1], BATCH, EVAL_BATCHES)[0] for t in data]


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
# **1.** What rank does `combination_type="cat"` give for an adapter of rank 8 and one of rank 4? And which
# combination type would you use to get **exactly** `0.7·ΔW_sonnets + 0.3·ΔW_caps`? Answer `(rank, type)`.

# %%
answer = None  # your code: (int, str)

# %%
if answer is None:
    print("not answered yet")
elif tuple(answer) == (12, "cat"):
    print("right: cat stacks the factors, so ranks add and the sum is exact")
else:
    print(f"not quite: {answer}. Which method keeps every factor, unchanged but scaled?")

# %% [markdown]
# **2.** Using only the singular values `S` of the exact sum computed above, what would `svd`'s squared
# error be for `svd_rank=4` in that layer? Then check yourself with `add_weighted_adapter`.

# %%
answer = None  # your code: a float

# %%
if answer is None:
    print("not answered yet")
else:
    got = model.add_weighted_adapter(["sonnets", "caps"], weights, "mix_svd4", combination_type="svd", svd_rank=4)
    model.delete_adapter("mix_svd4")
    if math.isclose(answer, got[name], rel_tol=1e-3):
        print(f"right: {answer:.4g}, the sum of the squared singular values after the 4th")
    else:
        print(f"not quite: {answer:.4g}; add_weighted_adapter reports {got[name]:.4g}")

# %% [markdown]
# **3.** Mixed batches work for LoRA layers only while they are unmerged: what does `model.merge_adapter()`
# followed by a forward with `adapter_names` do? Try it and put the exception's class in `answer`
# (then call `model.unmerge_adapter()` to restore the model).

# %%
answer = None  # your code: e.g. try: ... except Exception as e: answer = type(e)

# %%
model.unmerge_adapter()  # in case the exercise left it merged
if answer is None:
    print("not answered yet")
elif answer is ValueError:
    print("right: a merged weight is W + sBA for ONE adapter, so rows cannot choose anymore")
else:
    print(f"not quite: {answer}")
