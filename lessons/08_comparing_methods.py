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
# # 08 · Comparing the methods
#
# Lessons 01–07 built full fine-tuning, LoRA, DoRA, bottleneck adapters, prefix tuning, prompt tuning and
# QLoRA one at a time. Here they meet on one task with one budget, and the library does the measuring:
# `minipeft compare` runs `minipeft finetune --method M` for each method, one after the other, on the same model,
# data, steps and batch, and prints one table. This lesson's work is to **read that table**.
#
# **What you will do:**
# 1. run `minipeft compare` from Python: `main(["compare", ...])` returns one row per method;
# 2. derive its **trainable parameters** from the model's shapes, method by method, and check them against it;
# 3. derive its **memory** column (on a CPU: the bytes of the training state — weights, gradients, AdamW's two
#    moments) from those counts, including QLoRA's 4-bit weights;
# 4. read the **step times**, and the **held-out losses** and loss curves each run wrote to its `metrics.json`.
#
# **What you need to know first:** lesson 01 (the memory bill) and lesson 02 (LoRA); lessons 03–07 for the
# other methods (the table below is enough to read the results).
#
# The budget is `minipeft finetune`'s (lessons 02–07 train on it too): 60 steps of 8 blocks of 128 tokens, each
# method at its default learning rate, which `benchmarks/sweep_defaults.py` picked from a sweep on this model and
# on SmolLM2-135M. A caveat to keep in mind: that is one short run per method. The *costs* (parameters, memory)
# are exact; the *losses* rank the methods on this budget only.
#
# Full mode runs `minipeft compare` with its defaults, which takes most of this notebook's time (see the line
# under the title); `MINIPEFT_FAST=1` (the tests) trains 20 steps of 32-token blocks per method.

# %%
import contextlib
import io
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import DEVICE, FAST, exercise, lr, sweep

from minipeft import load_pretrained
from minipeft.cli import main
from minipeft.compare import METHODS

device = DEVICE
torch.manual_seed(0)  # each finetune run seeds itself (--seed 0); this fixes the notebook's own randomness
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## The contenders
#
# | compare's name | what trains | lesson |
# |---|---|---|
# | `full` | every weight | 01 |
# | `lora` | `B A` (r=8) beside `q_proj` and `v_proj` | 02 |
# | `dora` | the same LoRA plus one magnitude per output row | 02 |
# | `adapter` | Houlsby bottleneck MLPs (b=64), after attention and after the MLP | 03 |
# | `prefix` | 20 learned keys and values in every layer | 04 |
# | `prompt` | 20 learned input embeddings | 05 |
# | `qlora` | LoRA (r=8) beside every linear layer of a base frozen in 4-bit NF4 | 06, 07 |
#
# Each is one `minipeft finetune` command; compare adds the shared flags (model, data, batch, block length,
# `--out`). Its `--methods` flag picks others (`ia3` is there too, not run by default).

# %%
for name, flags in METHODS.items():
    print(f"{name:8s} minipeft finetune {' '.join(flags)}")

# %% [markdown]
# ## Running `minipeft compare`
#
# `--out` keeps every run: `<out>/<method>/` is a whole `finetune` run directory (the adapter or model, its
# `metrics.json`, `command.txt`), and `<out>/compare.png` the figure. The runs print a log; we keep it aside and
# show the commands and the table.

# %%
OUT = Path(tempfile.mkdtemp(prefix="minipeft-compare-"))  # a new, empty folder: compare refuses a used one
SHORT = ["--steps", "20", "--seq-len", "32"] if FAST else []  # full mode: compare's defaults
argv = ["compare", "--out", str(OUT), *SHORT]
print("minipeft " + " ".join(argv) + "\n")
log = io.StringIO()
with contextlib.redirect_stdout(log):
    rows = main(argv)  # the same function the `minipeft` command runs
text = log.getvalue()
print("\n".join(line for line in text.splitlines() if line.startswith("===")))
print(text[text.index("| method") :])

# %% [markdown]
# `main` returns what it tabulated, one dict per method:

# %%
print({k: v for k, v in rows["lora"].items() if k != "curve"})
print("curve (step, held-out loss):", [(s, round(v, 4)) for s, v in rows["lora"]["curve"]])

# %% [markdown]
# ## Reading the table: trainable parameters
#
# Every count follows from the model's shapes. The bundled model is a small Llama: `D` wide, `L` blocks, an
# MLP of width `I`, grouped-query attention (queries `heads × head_dim` wide, keys and values
# `kv_heads × head_dim`), and an embedding tied to the output layer. With finetune's defaults (rank `r`,
# bottleneck `b`, `P` virtual tokens):
#
# * **full**: every parameter of the model;
# * **lora**: `r × (in + out)` per adapted Linear (`A` is `r × in`, `B` is `out × r`), in each of the `L` blocks;
# * **dora**: LoRA's, plus one magnitude per output row of each adapted Linear;
# * **adapter** (Houlsby): two bottlenecks per block, each `D → b → D` with biases;
# * **prefix**: a key and a value for each virtual token in each layer, as wide as the model's *keys*
#   (`kv_heads × head_dim`, not `D`: grouped-query attention stores fewer keys than queries);
# * **prompt**: one input embedding (`D`) per virtual token;
# * **qlora**: LoRA on every Linear of every block (`all-linear`: all seven, not `lm_head`).

# %%
base, _ = load_pretrained("tiny-shakespeare")
cfg = base.config
V, D, I, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
shapes = {
    "q_proj": (D, q_width),
    "k_proj": (D, kv_width),
    "v_proj": (D, kv_width),
    "o_proj": (q_width, D),
    "gate_proj": (D, I),
    "up_proj": (D, I),
    "down_proj": (I, D),
}  # fmt: skip  (in, out) of each Linear
linear_per_block = sum(i * o for i, o in shapes.values())
P_full = V * D + L * (linear_per_block + 2 * D) + D  # the (tied) embedding, L blocks with two norms, a final norm
assert P_full == sum(p.numel() for p in base.parameters())
print(f"D={D} I={I} L={L} heads={cfg.num_attention_heads} kv_heads={cfg.num_key_value_heads} "
      f"head_dim={cfg.head_dim} V={V}: {P_full:,d} parameters")  # fmt: skip

r, b, P = 8, 64, 20  # finetune's defaults: rank, bottleneck, virtual tokens


def lora_count(targets):
    return L * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


trainable = {
    "full": P_full,
    "lora": lora_count(["q_proj", "v_proj"]),
    "dora": lora_count(["q_proj", "v_proj"]) + L * (q_width + kv_width),
    "adapter": L * 2 * (D * b + b + b * D + D),
    "prefix": P * L * 2 * kv_width,
    "prompt": P * D,
    "qlora": lora_count(shapes),
}
assert sorted(trainable, key=trainable.get) == ["prompt", "prefix", "lora", "dora", "qlora", "adapter", "full"]
for m, n in trainable.items():
    assert rows[m]["trainable"] == n, (m, rows[m]["trainable"], n)
    print(
        f"{m:8s} {n:>10,d} trainable = compare's {rows[m]['trainable']:>10,d}  ({100 * n / P_full:7.3f}% of the model)"
    )

# %% [markdown]
# Full fine-tuning trains every number; every other method trains a fraction of a percent, and the fraction
# depends on *where* it attaches (the order is checked below): prompt tuning, which touches only the input, the
# fewest; then prefix tuning, one key and value row per virtual token per layer; LoRA and DoRA on two
# projections; QLoRA's LoRA on all seven Linears; and the adapters, whose bottlenecks are `D × b` twice per
# sublayer, more than all of them.
#
# ## Reading the table: memory
#
# On a GPU, compare's memory column is the peak the CUDA allocator measured over the run (everything: weights,
# gradients, optimizer states, activations, temporary buffers). A CPU has no such counter, so there compare
# reports an *accounting* of the training state: every weight, plus, for each trainable float32 parameter, its
# gradient and AdamW's two moments (`exp_avg`, `exp_avg_sq`): 4 + 4 + 4 + 4 = 16 bytes per trainable parameter
# and 4 per frozen one. QLoRA's frozen Linears are 4-bit codes instead: half a byte per weight, one `uint8`
# scale per block of 64 (double quantization), one float32 per 256 of those scales, and per layer a float32
# offset and a 256-entry float32 table (lesson 06). The activations are not in this column (lesson 01 measures
# them).

# %%
MiB = 2**20
n_linear = L * linear_per_block  # the weights QLoRA stores in 4 bits
nf4_bytes = n_linear // 2 + n_linear // 64 + 4 * (n_linear // (64 * 256)) + 7 * L * (4 + 256 * 4)
frozen_bytes = {m: 0 if m == "full" else 4 * P_full for m in rows}
frozen_bytes["qlora"] = 4 * (P_full - n_linear) + nf4_bytes
state = {m: frozen_bytes[m] + 16 * trainable[m] for m in rows}
print(f"{'method':8s} {'frozen':>9s} {'trainable':>10s} {'grad+AdamW':>11s} {'total':>9s} {'compare':>9s}  (MiB)")
for m in rows:
    print(f"{m:8s} {frozen_bytes[m] / MiB:9.2f} {4 * trainable[m] / MiB:10.2f} {12 * trainable[m] / MiB:11.2f} "
          f"{state[m] / MiB:9.2f} {rows[m]['memory_mib']:9.2f}")  # fmt: skip
    if device == "cpu":  # compare's CPU column is exactly this accounting
        assert round(rows[m]["memory_mib"] * MiB) == state[m], m
print(
    f"QLoRA's linear weights: {8 * nf4_bytes / n_linear:.3f} bits each, against 32; the float32 embedding "
    f"({V}x{D}) is {4 * V * D / MiB:.2f} MiB of its {frozen_bytes['qlora'] / MiB:.2f} MiB of frozen weights"
)

# %% [markdown]
# Full fine-tuning pays 16 bytes for every parameter: the weights, and three more copies of them (the gradient
# and two AdamW moments). Every PEFT method pays 4 bytes per frozen parameter and the 16 only on its small
# trainable set: its training state is the frozen model plus a small remainder. QLoRA stores the Linears at the
# bits per weight printed above instead of 32, but on this model the embedding, which no method quantizes, is a large part of what is left; on a 7B model the
# Linears are nearly all of the weights, which is where QLoRA pays (lesson 07 writes that budget).
#
# ## Reading the table: step time
#
# `ms/step` is the wall-clock time of the optimizer steps alone (no evaluation, no saving), averaged over the
# run. Ratios to LoRA's:

# %%
for m in rows:
    ratio = rows[m]["ms_per_step"] / rows["lora"]["ms_per_step"]
    print(f"{m:8s} {rows[m]['ms_per_step']:7.0f} ms/step  {ratio:5.2f}x LoRA's")
print(f"full fine-tuning trains {trainable['full'] / trainable['lora']:.0f}x LoRA's parameters")
assert rows["full"]["ms_per_step"] < 10 * rows["lora"]["ms_per_step"]  # far less than that: see below

# %% [markdown]
# A full step is nowhere near as much slower as its trainable count would suggest (under 10x LoRA's time,
# checked, against the parameter ratio printed above): the forward pass, and the backward pass through every frozen layer down to
# the first trainable parameter, are the bulk of the work whatever trains. What PEFT saves is
# the weight gradients of the frozen layers and the optimizer update of every weight. QLoRA also dequantizes every
# weight on every pass, in forward and again in backward, which a fused 4-bit kernel would avoid. On a shared
# CPU these times are noisy (other programs take turns on the cores): compare ratios within one run, not across
# runs.
#
# ## Reading the table: held-out loss, and the curves
#
# Three losses per method, on the same held-out blocks: `base` (the model before any adapter), `start` (step 0,
# the adapted model before training) and `end`. Each run's `metrics.json` holds the whole history: the held-out
# loss at every evaluation (compare's curve) and the training loss of every 10th step. On a GPU the runs compute
# in bf16 (autocast), the adapters on a bf16 copy of the base and full fine-tuning on its float32 weights, so there
# full fine-tuning's `base` differs from the others' in the last digits; on a CPU all are float32 and equal.

# %%
metrics = {m: json.loads((OUT / m / "metrics.json").read_text()) for m in rows}
for m, r_ in rows.items():
    assert [(e["step"], e["val_loss"]) for e in metrics[m]["eval"]] == r_["curve"]  # what compare tabulated
base_loss = rows["lora"]["base"]
# one base model, one held-out set: one base loss (on a GPU, full fine-tuning's differs a little: see above)
assert all(r_["base"] == base_loss for m, r_ in rows.items() if m != "full" or device == "cpu")
assert abs(rows["full"]["base"] - base_loss) < 0.01 * base_loss

fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
for i, m in enumerate(rows):
    axes[0].plot(*zip(*rows[m]["curve"]), marker="o", color=f"C{i}", label=m)
    axes[1].plot([e["step"] for e in metrics[m]["train"]], [e["loss"] for e in metrics[m]["train"]], marker=".",
                 color=f"C{i}", label=m)  # fmt: skip
    axes[2].scatter(rows[m]["trainable"], rows[m]["after"], color=f"C{i}", s=60)
    axes[2].annotate(m, (rows[m]["trainable"], rows[m]["after"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
for ax in (axes[0], axes[2]):
    ax.axhline(base_loss, color="gray", ls="--", label="base model")
axes[0].set(xlabel="optimizer step", ylabel="held-out loss", title="held-out loss (metrics.json: eval)")
axes[1].set(xlabel="optimizer step", ylabel="training loss (one batch)", title="training loss (metrics.json: train)")
axes[2].set(xscale="log", xlabel="trainable parameters", ylabel="held-out loss at the end", title="loss vs size")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %%
for m, r_ in rows.items():
    print(f"{m:8s} base {r_['base']:.4f}  start {r_['before']:.4f} ({r_['before'] - r_['base']:+.4f})  "
          f"end {r_['after']:.4f} ({r_['after'] - r_['before']:+.4f})")  # fmt: skip

# %% [markdown]
# What the starts say, checked below: full fine-tuning, LoRA (`B = 0`) and the adapters (their up-projection
# starts at zero) start *exactly* as the base model; DoRA starts equal up to rounding (its magnitude is the
# weight's own row norm); QLoRA starts at the 4-bit model, a little above the base (the quantization error of
# lesson 06); prefix and prompt tuning start from random keys, values and embeddings that every token attends
# to, so above the base, and their first steps go to undoing that (they also take the largest learning rates).

# %%
for m in ("full", "lora", "adapter"):  # each against its own base (see above)
    assert rows[m]["before"] == rows[m]["base"], m
# DoRA: W's scale m / ||W + BA|| is 1 up to rounding: 1e-4 in float32 (the CPU), a few 1e-4 in bf16 (a GPU)
assert abs(rows["dora"]["before"] - rows["dora"]["base"]) < (1e-4 if device == "cpu" else 1e-3)
for m in ("qlora", "prefix", "prompt"):
    assert rows[m]["before"] > rows[m]["base"], m
for m in ("full", "lora", "dora", "adapter", "qlora"):  # training helped the methods that start at the model
    assert rows[m]["after"] < rows[m]["before"], m
if not FAST and device == "cpu":  # the same commands as benchmarks/README.md's sweep on this CPU: equal results
    for m, r_ in rows.items():  # up to the order of floating-point sums (thread count)
        swept = sweep(m, lr(m if m != "dora" else "lora"))
        print(f"{m:8s} end {r_['after']:.4f}, the sweep's {swept['last']:.4f}")
        assert abs(r_["after"] - swept["last"]) < 0.01, m
print("held-out loss at the end, lowest first: " + ", ".join(
    f"{m} {rows[m]['after']:.4f}" for m in sorted(rows, key=lambda m: rows[m]["after"])))  # fmt: skip

# %% [markdown]
# * **Costs** are exact and follow from shapes: trainable parameters from where the method attaches, the
#   training state from 16 bytes per trainable parameter and 4 (or about half a byte, in NF4) per frozen one.
# * **Time** hardly depends on how much trains: every method runs the whole model forward and backward.
# * **Quality**, on this budget only: compare each method's end with the base model's loss (the dashed line) and
#   with the others; a method that starts above the base (prefix, prompt) spends steps getting back to it. In
#   full mode on a CPU the ends equal the runs of `benchmarks/sweep_defaults.py`, the sweep that chose the
#   learning rates (checked above): the table is reproducible.
#
# ## Summary
#
# You ran every method on one task with one command — [`minipeft/compare.py`](../minipeft/compare.py), which
# runs [`minipeft finetune`](../minipeft/cli.py) per method on [`train()`](../minipeft/train.py) — and read
# its table: the trainable counts from the model's shapes, the training state from bytes per parameter
# (QLoRA's from [`nf4.py`](../minipeft/nf4.py)'s layout), the step times, and the loss curves in each run's
# `metrics.json`. The methods live in [`lora.py`](../minipeft/lora.py), [`adapter.py`](../minipeft/adapter.py),
# [`prefix.py`](../minipeft/prefix.py), [`prompt.py`](../minipeft/prompt.py) and
# [`nf4.py`](../minipeft/nf4.py), all behind [`peft.py`](../minipeft/peft.py)'s `get_peft_model`.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l08.py`](solutions/l08.py).)
#
# **1. LoRA's trainable parameters in closed form.** The table's `trainable` column, without building the model: the
# check compares your count with `PeftModel.get_nb_trainable_parameters()` on small models, with grouped-query
# attention and with DoRA.

# %%
from exercises.l08 import CHECKS


def lora_trainable(config, r, target_modules, use_dora=False):
    """Trainable parameters of LoraConfig(r=r, target_modules=target_modules, use_dora=use_dora) on a model of
    this ModelConfig. Returns an int.

    target_modules: a list of names among "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
    "down_proj", each present once in every one of config.num_hidden_layers blocks. An adapted Linear (out, in)
    gets A (r, in) and B (out, r); DoRA adds one magnitude per output row. Use config.hidden_size,
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads and config.head_dim.
    Hint: model.py's Attention says each projection's (in, out).
    """
    raise NotImplementedError  # your code


# %%
exercise("lora_trainable", lora_trainable, CHECKS["lora_trainable"])


# %% [markdown]
# **2. Prefix tuning's trainable parameters**, with and without the reparameterisation MLP (lesson 04).


# %%
def prefix_trainable(config, num_virtual_tokens, prefix_projection=False, encoder_hidden_size=None):
    """Trainable parameters of PrefixTuningConfig(num_virtual_tokens, prefix_projection, encoder_hidden_size) on a
    model of this ModelConfig. Returns an int.

    Without projection the table itself trains: for each virtual token, a key and a value in every layer, each
    of the key/value width (token_dim). With projection: an embedding (P, token_dim) and an MLP token_dim -> E ->
    num_hidden_layers * 2 * token_dim, two nn.Linear with biases; E = encoder_hidden_size, or token_dim if None.
    Hint: with grouped-query attention, how wide is one layer's key?
    """
    raise NotImplementedError  # your code


# %%
exercise("prefix_trainable", prefix_trainable, CHECKS["prefix_trainable"])
