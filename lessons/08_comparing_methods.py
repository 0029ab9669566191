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
# QLoRA one at a time. Here they meet on one task, under one training loop, with the same data, steps and
# batch, and every number below is computed in this notebook when you run it.
#
# **What you will build:** one function that fine-tunes a fresh copy of `tiny-shakespeare` on the sonnets with
# a given method and measures four things —
# 1. **trainable parameters** (checked against each method's closed form),
# 2. **memory** for training: weights + gradients + AdamW states (counted from the tensors) + activations
#    (measured with autograd's saved-tensor hooks); on a GPU also the peak that CUDA allocated,
# 3. **step time**, 4. **held-out loss** —
# then one table and one figure.
#
# **What you need to know first:** lesson 01 (the memory bill) and lesson 02 (LoRA); lessons 03–07 for the
# other methods (the one-line descriptions below are enough to read the results).
#
# A caveat to keep in mind: each method gets one reasonable learning rate (not a tuned one) and a short run.
# The *costs* (parameters, memory) are exact; the *losses* rank the methods on this budget only.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("MINIPEFT_FAST") == "1"  # the tests set this: fewer steps, every cell still runs
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")

# %%
import copy
import dataclasses
import gc
import statistics

from minipeft import (
    AdapterConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    load_pretrained,
    quantize_model,
)
from minipeft.checkpoint import ASSETS
from minipeft.data import batch_stream, load_text_dataset
from minipeft.train import TrainConfig, evaluate, train

SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
STEPS = 10 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
EVAL_BATCHES = 6 if FAST else None  # None: the whole held-out set

base, tok = load_pretrained("tiny-shakespeare", device=device)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
base_loss, _ = evaluate(base, val_data, BATCH, max_batches=EVAL_BATCHES)
cfg = base.config
print(
    f"tiny-shakespeare: {sum(p.numel() for p in base.parameters()):,d} parameters; "
    f"held-out loss before fine-tuning {base_loss:.3f}; {STEPS} steps of {BATCH}×{SEQ_LEN} tokens per method"
)

# %% [markdown]
# ## The contenders
#
# | method | what trains | lesson |
# |---|---|---|
# | full fine-tuning | every weight | 01 |
# | LoRA r=8 on q, v | `B A` beside `q_proj`, `v_proj` | 02 |
# | LoRA r=8, all linear | `B A` beside every linear layer of every block | 02 |
# | DoRA r=8, all linear | LoRA plus one magnitude per output row | 02 |
# | adapters (Houlsby), b=32 | a bottleneck MLP after attention and after the MLP | 03 |
# | adapters (Pfeiffer), b=32 | one bottleneck MLP after the MLP | 03 |
# | prefix tuning, P=16 | 16 learned keys and values in every layer | 04 |
# | prompt tuning, P=16 | 16 learned input embeddings | 05 |
# | QLoRA r=8, all linear | LoRA on a base frozen in 4-bit NF4 | 06, 07 |
#
# Each entry builds its model from a fresh copy of the base, gives the trainable-parameter count its
# method's formula predicts (`D` hidden, `L` layers, `K·hd` the key/value width, `I` the MLP width), and a
# learning rate: 5e-4 for full fine-tuning, 2e-3 for the LoRA family and adapters, and for prompt and prefix
# tuning, which need much larger steps, the best of 1e-2, 3e-2 and 1e-1 in a short trial on this task.

# %%
D, L, I, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
P_full = sum(p.numel() for p in base.parameters())
r, b, P = 8, 32, 16
lora_qv = L * r * ((D + D) + (D + kv))  # q: D -> D, v: D -> kv
lora_all = L * r * ((D + D) + 2 * (D + kv) + (D + D) + 3 * (D + I))  # q, k, v, o, gate, up, down
dora_rows = L * (D + 2 * kv + D + 2 * I + D)  # one magnitude per output row of each adapted layer
adapter = 2 * D * b + b + D  # down (b, D) + bias b, up (D, b) + bias D


def peft(config, quantize=False, **kw):
    def build():
        model = copy.deepcopy(base)
        if quantize:
            model = quantize_model(model)  # every Linear but the (tied) lm_head in NF4
        return get_peft_model(model, config, **kw)

    return build


def full():
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


all_linear = dict(r=r, lora_alpha=16, target_modules="all-linear")
METHODS = {  # name: (build, expected trainable parameters, learning rate)
    "full fine-tuning": (full, P_full, 5e-4),
    "LoRA q,v": (peft(LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"])), lora_qv, 2e-3),
    "LoRA all-linear": (peft(LoraConfig(**all_linear)), lora_all, 2e-3),
    "DoRA all-linear": (peft(LoraConfig(**all_linear, use_dora=True)), lora_all + dora_rows, 2e-3),
    "adapters Houlsby": (peft(AdapterConfig(bottleneck_size=b, placement="houlsby")), 2 * L * adapter, 2e-3),
    "adapters Pfeiffer": (peft(AdapterConfig(bottleneck_size=b, placement="pfeiffer")), L * adapter, 2e-3),
    "prefix tuning": (peft(PrefixTuningConfig(num_virtual_tokens=P)), P * L * 2 * kv, 1e-1),
    "prompt tuning": (
        peft(
            PromptTuningConfig(
                num_virtual_tokens=P,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="Shall I compare thee to a summer's day?",
            ),
            tokenizer=tok,
        ),
        P * D,
        3e-2,
    ),
    "QLoRA all-linear": (peft(LoraConfig(**all_linear), quantize=True), lora_all, 2e-3),
}

# %% [markdown]
# ## Measuring
#
# * **weights**: the bytes of every parameter and buffer, the 4-bit codes and scales of NF4 layers included
#   (`nf4.memory_report` counts them);
# * **gradients + AdamW**: 4 + 8 bytes per trainable float32 parameter — checked against the tensors the
#   optimizer actually holds after a step;
# * **activations**: the bytes autograd saves for backward in one training step (lesson 01's hook), weights
#   excluded;
# * on a GPU, also `torch.cuda.max_memory_allocated()` over building the model and the whole training run,
#   minus what was allocated before (the base model the notebook keeps). It includes what the accounting
#   leaves out: temporary buffers, bfloat16 copies of weights under autocast, the evaluation. On a CPU PyTorch
#   has no such counter, so there the total is an *accounting*;
# * **step time**: the median wall-clock time of an optimizer step, as `train()` logs it;
# * **held-out loss**: on the same held-out blocks for every method.

# %%
from minipeft.nf4 import memory_report
from minipeft.train import trainable_parameters


def weight_storages(model):  # everything that is model state, not activation
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if hasattr(m, "qweight"):  # NF4Linear: packed codes and scales live in a dataclass
            q = m.qweight
            tensors += [getattr(q, f.name) for f in dataclasses.fields(q) if torch.is_tensor(getattr(q, f.name))]
    return {t.untyped_storage().data_ptr() for t in tensors}


def activation_bytes(model, batch):
    skip, saved = weight_storages(model), {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = batch["input_ids"].to(device)
    model.train()
    bf16 = device == "cuda"  # as train() does: bfloat16 autocast on a GPU, float32 on a CPU
    with (
        torch.autocast(device, dtype=torch.bfloat16, enabled=bf16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss = model(ids, labels=ids, return_logits=False).loss
    del loss
    return sum(saved.values())


def optimizer_bytes(model, batch):  # gradients + AdamW states, measured after one step with lr = 0
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=0.0)  # creates states, moves nothing
    ids = batch["input_ids"].to(device)
    model(ids, labels=ids, return_logits=False).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for _, p in trainable_parameters(model))
    opt.step()
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    opt.zero_grad(set_to_none=True)
    return grads, states


# %%
def run(name):
    build, expected, lr = METHODS[name]
    gc.collect()  # the previous method's model and optimizer are garbage now: free them
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # the base model and whatever else the notebook holds
    torch.manual_seed(0)
    model = build()
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    assert trainable == expected, f"{name}: {trainable} trainable parameters, the formula says {expected}"
    batch = next(batch_stream(train_data, BATCH, seed=0))
    weights = memory_report(model)["total_bytes"]
    activations = activation_bytes(model, batch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, states = optimizer_bytes(model, batch)
    assert grads == 4 * trainable and states == 8 * trainable  # float32 gradient, exp_avg, exp_avg_sq
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # lr 0: nothing moved
    del start
    metrics = train(
        model,
        train_data,
        val_data,
        TrainConfig(
            steps=STEPS,
            lr=lr,
            batch_size=BATCH,
            warmup_ratio=0.1,
            log_every=1,
            eval_batches=EVAL_BATCHES,
            progress=False,
            seed=0,
        ),
    )
    step_s = statistics.median(BATCH * SEQ_LEN / e["tokens_per_s"] for e in metrics["train"][1:])
    return dict(
        trainable=trainable,
        weights=weights,
        grads=grads,
        states=states,
        activations=activations,
        cuda_peak=torch.cuda.max_memory_allocated() - before if device == "cuda" else None,
        step_ms=1000 * step_s,
        val_loss=metrics["val_loss"],
        curve=[e["loss"] for e in metrics["train"]],
    )


results = {}
for name in METHODS:
    t0 = time.perf_counter()
    results[name] = run(name)
    print(f"{name:18s} done in {time.perf_counter() - t0:5.1f}s: held-out loss {results[name]['val_loss']:.3f}")

# %% [markdown]
# ## The table

# %%
MiB = 2**20
header = (
    f"{'method':18s} {'trainable':>10s} {'%':>7s} {'weights':>8s} {'grad+Adam':>9s} {'activ.':>7s} "
    f"{'total':>7s} {'step ms':>8s} {'held-out':>8s}"
)
if device == "cuda":
    header += f" {'CUDA peak':>9s}"
print(header + "\n" + "-" * len(header))
for name, r_ in results.items():
    total = r_["weights"] + r_["grads"] + r_["states"] + r_["activations"]
    line = (
        f"{name:18s} {r_['trainable']:>10,d} {100 * r_['trainable'] / P_full:>6.2f}% "
        f"{r_['weights'] / MiB:>7.1f}M {(r_['grads'] + r_['states']) / MiB:>8.1f}M "
        f"{r_['activations'] / MiB:>6.1f}M {total / MiB:>6.1f}M {r_['step_ms']:>8.0f} {r_['val_loss']:>8.3f}"
    )
    if device == "cuda":
        line += f" {r_['cuda_peak'] / MiB:>8.1f}M"
    print(line)
print(
    f"\nbase model, no training: held-out loss {base_loss:.3f}.  Memory in MiB (2**20 bytes); "
    f"{'accounted on the CPU (no allocator counter there)' if device != 'cuda' else 'CUDA peak measured'}."
)

# %% [markdown]
# Checks that hold whatever the random seeds: only full fine-tuning pays gradients and AdamW states for every
# weight; the 4-bit base makes QLoRA's weights the smallest; prompt and prefix tuning train the fewest
# parameters; DoRA keeps more activations than LoRA of the same rank (see below). And training must have
# helped at least the methods that adapt every layer.

# %%
fixed = {n: r_["grads"] + r_["states"] for n, r_ in results.items()}
assert fixed["full fine-tuning"] > 10 * max(v for n, v in fixed.items() if n != "full fine-tuning")
assert results["QLoRA all-linear"]["weights"] < 0.7 * results["LoRA all-linear"]["weights"]
fewest = sorted(results, key=lambda n: results[n]["trainable"])[:2]
assert set(fewest) == {"prompt tuning", "prefix tuning"}, fewest
assert results["DoRA all-linear"]["activations"] > 1.3 * results["LoRA all-linear"]["activations"]
# the first step's loss is on the same batch for everyone; LoRA starts exactly as the base model
assert results["prefix tuning"]["curve"][0] > results["LoRA all-linear"]["curve"][0]
for n in ["full fine-tuning", "LoRA all-linear", "DoRA all-linear", "QLoRA all-linear"]:
    assert results[n]["val_loss"] < base_loss, n

# %% [markdown]
# ## The picture
#
# Left: what each method buys per trainable parameter (log scale). Middle: the memory bill, stacked.
# Right: the training curves.

# %%
names = list(results)
colors = {n: f"C{i}" for i, n in enumerate(names)}
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

ax = axes[0]
for n in names:
    ax.scatter(results[n]["trainable"], results[n]["val_loss"], color=colors[n], s=60)
    ax.annotate(
        n, (results[n]["trainable"], results[n]["val_loss"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
    )
ax.axhline(base_loss, color="gray", ls="--", label="base model")
ax.set_xscale("log")
ax.set_xlabel("trainable parameters")
ax.set_ylabel("held-out loss")
ax.legend()
ax.set_title("held-out loss vs trainable parameters")

ax = axes[1]
bottom = torch.zeros(len(names))
for part in ["weights", "grads", "states", "activations"]:
    v = torch.tensor([results[n][part] / MiB for n in names], dtype=torch.float32)
    ax.barh(names, v, left=bottom, label={"states": "AdamW states"}.get(part, part))
    bottom += v
ax.invert_yaxis()
ax.set_xlabel("MiB")
ax.legend(fontsize=8)
ax.set_title(f"training memory (activations: {BATCH}×{SEQ_LEN} tokens)")

ax = axes[2]
smooth = lambda c, k=5: [sum(c[max(0, i - k + 1) : i + 1]) / len(c[max(0, i - k + 1) : i + 1]) for i in range(len(c))]
for n in names:
    ax.plot(smooth(results[n]["curve"]), color=colors[n], label=n, lw=1)
ax.set_xlabel("step")
ax.set_ylabel("training loss (mean of the last 5 steps)")
ax.legend(fontsize=7)
ax.set_title("training curves")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the results
#
# * **Memory.** Full fine-tuning's gradients and AdamW states are three copies of the model; every PEFT
#   method shrinks them to almost nothing. What is left is the frozen weights (which QLoRA cuts by ~8× against
#   float32 where it quantizes; the embedding stays in float32 here) and the activations, which **no** method removes:
#   backward must still pass through every frozen layer. At this model size the activations dominate; for a
#   7B model the weights and optimizer states do, which is where LoRA and QLoRA pay off. DoRA keeps more
#   activations than LoRA: in every adapted layer it multiplies both the base output and the LoRA output by
#   the magnitude ratio `m / ‖W + sBA‖`, and autograd keeps both `(tokens × out_features)` products for
#   backward, where LoRA keeps only its `r`-wide intermediate.
# * **Time.** A PEFT step is not much cheaper than a full one: the forward and backward passes through the
#   frozen model are the bulk of the work. QLoRA is slower per step: it dequantizes every weight on every
#   pass (a fused 4-bit kernel would not).
# * **Quality.** With a short budget and untuned learning rates, methods that touch every layer's weights
#   (full, LoRA, DoRA, QLoRA) adapt fastest; prompt and prefix tuning train a few thousand numbers and move
#   slowly on a small model (the prompt-tuning paper found it only catches up at billions of parameters).
#   Prefix tuning also starts *behind*: its keys and values start random, and every token attends to them, so
#   its first losses are above the base model's (see its curve) and the first steps go to undoing that.
#   Full fine-tuning trains 25 times more parameters than LoRA all-linear and is the first to overfit the
#   26,000 training tokens (lesson 01's curves).
#
# ## Summary
#
# You trained nine methods on one task under one loop — [`minipeft/train.py`](../minipeft/train.py) — and
# measured trainable parameters (matching each method's formula), memory (weights via
# [`minipeft/nf4.py`](../minipeft/nf4.py)'s `memory_report`, gradients and optimizer states from the
# optimizer's own tensors, activations from autograd's saved tensors), step time and held-out loss. The
# methods live in [`lora.py`](../minipeft/lora.py), [`adapter.py`](../minipeft/adapter.py),
# [`prefix.py`](../minipeft/prefix.py), [`prompt.py`](../minipeft/prompt.py) and
# [`nf4.py`](../minipeft/nf4.py), all behind [`peft.py`](../minipeft/peft.py)'s `get_peft_model`.
#
# ## Exercises
#
# **1.** Which **PEFT** method (that is, not full fine-tuning) reached the lowest held-out loss in your run?
# Give its name as in the table — and before you look, guess.

# %%
answer = None  # your code: a name from the table, e.g. "LoRA q,v"

# %%
best = min((n for n in results if n != "full fine-tuning"), key=lambda n: results[n]["val_loss"])
if answer is None:
    print("not answered yet")
elif answer == best:
    print(f"right: {best} ({results[best]['val_loss']:.3f})")
else:
    print(f"not quite: {answer!r}. Sort the PEFT rows by the held-out column.")

# %% [markdown]
# **2.** Add a method: LoRA with `r=64` on all linear layers (`lora_alpha=16`, learning rate `2e-3`). Put the
# entry into `METHODS` under the name `"LoRA r=64"` (with its formula for the trainable parameters), run it
# with `run`, and store the result in `answer`.

# %%
answer = None  # your code: METHODS["LoRA r=64"] = (...); answer = run("LoRA r=64")

# %%
if answer is None:
    print("not answered yet")
elif answer["trainable"] == 8 * lora_all:
    print(f"right: {answer['trainable']:,d} trainable parameters (8× r=8), held-out loss {answer['val_loss']:.3f}")
else:
    print(f"not quite: {answer['trainable']:,d} trainable parameters; r=64 has 8× the parameters of r=8")

# %% [markdown]
# **3.** The activations are the one cost no method removes. At what batch size (sequences of `SEQ_LEN`
# tokens) would LoRA all-linear's activations alone exceed full fine-tuning's weights + gradients + AdamW
# states? Use the activation bytes measured above (they are linear in the batch). Answer with the smallest
# such batch size, an int.

# %%
answer = None  # your code: an int

# %%
per_seq = results["LoRA all-linear"]["activations"] / BATCH
full_fixed = sum(results["full fine-tuning"][k] for k in ("weights", "grads", "states"))
expected = math.floor(full_fixed / per_seq) + 1
if answer is None:
    print("not answered yet")
elif answer == expected:
    print(f"right: {expected} sequences of {SEQ_LEN} tokens")
else:
    print(
        f"not quite: {answer}. One sequence saves {per_seq / MiB:.2f} MiB; full fine-tuning's fixed bill is "
        f"{full_fixed / MiB:.1f} MiB."
    )
