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
# 1. **trainable parameters** (and, in the exercises, each method's closed form for them),
# 2. **memory** for training: weights + gradients + AdamW states (counted from the tensors) + activations
#    (measured with autograd's saved-tensor hooks); on a GPU also the peak that CUDA allocated,
# 3. **step time**, 4. **held-out loss** —
# then one table and one figure.
#
# **What you need to know first:** lesson 01 (the memory bill) and lesson 02 (LoRA); lessons 03–07 for the
# other methods (the one-line descriptions below are enough to read the results).
#
# Every run is a `minipeft finetune` run: the one budget of lessons 02-08 (`lessons/common.py`: 60 steps of 8
# blocks of 128 tokens), each method with its command's defaults and its default learning rate, which
# `benchmarks/sweep_defaults.py` picked from a sweep on this model and on SmolLM2-135M. A caveat to keep in mind:
# that is one short run per method. The *costs* (parameters, memory) are exact; the *losses* rank the methods on
# this budget only.
#
# Runs in about 10 minutes on a 2-core CPU (measured on 2026-11-30 in full mode, on a machine shared
# with other jobs: nine training runs of 60 steps); `MINIPEFT_FAST=1` (the tests) trains 10 steps each.

# %%
import time

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, exercise, finetune_config, lr, sweep

device = DEVICE
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
from minipeft.train import evaluate, train

base, tok = load_pretrained("tiny-shakespeare", device=device)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
base_loss, _ = evaluate(base, val_data, BATCH, max_batches=VAL_BATCHES)
cfg = base.config
print(
    f"tiny-shakespeare: {sum(p.numel() for p in base.parameters()):,d} parameters; "
    f"held-out loss before fine-tuning {base_loss:.3f}; {STEPS} steps of {BATCH}×{SEQ_LEN} tokens per method "
    f"({STEPS * BATCH / len(train_data):.1f} passes over the {len(train_data) * SEQ_LEN:,d} training tokens)"
)

# %% [markdown]
# ## The contenders
#
# | method | what trains | lesson | the command |
# |---|---|---|---|
# | full fine-tuning | every weight | 01 | `--method full` |
# | LoRA r=8 on q, v | `B A` beside `q_proj`, `v_proj` | 02 | `--method lora` |
# | LoRA r=8, all linear | `B A` beside every linear layer of every block | 02 | `--method lora --targets all-linear` |
# | DoRA r=8, all linear | LoRA plus one magnitude per output row | 02 | `... --targets all-linear --dora` |
# | adapters (Houlsby), b=64 | a bottleneck MLP after attention and after the MLP | 03 | `--method adapter` |
# | adapters (Pfeiffer), b=64 | one bottleneck MLP after the MLP | 03 | `... --placement pfeiffer` |
# | prefix tuning, P=20 | 20 learned keys and values in every layer | 04 | `--method prefix` |
# | prompt tuning, P=20 | 20 learned input embeddings (random init) | 05 | `--method prompt` |
# | QLoRA r=8, all linear | LoRA on a base frozen in 4-bit NF4 | 06, 07 | `--method qlora` |
#
# Each entry builds its model from a fresh copy of the base and takes its command's learning rate, `lr(method)`:
# the LoRA variants share LoRA's, both adapter placements the adapters'. Prompt and prefix tuning need much
# larger steps than the others.

# %%
P_full = sum(p.numel() for p in base.parameters())
r, b, P = 8, 64, 20  # finetune's defaults: rank, bottleneck, virtual tokens


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
METHODS = {  # name: (build, finetune's method (its learning rate), the sweep's name for this run)
    "full fine-tuning": (full, "full", "full"),
    "LoRA q,v": (peft(LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"])), "lora", "lora"),
    "LoRA all-linear": (peft(LoraConfig(**all_linear)), "lora", "lora_all"),
    "DoRA all-linear": (peft(LoraConfig(**all_linear, use_dora=True)), "lora", None),
    "adapters Houlsby": (peft(AdapterConfig(bottleneck_size=b, placement="houlsby")), "adapter", "adapter"),
    "adapters Pfeiffer": (peft(AdapterConfig(bottleneck_size=b, placement="pfeiffer")), "adapter", None),
    "prefix tuning": (peft(PrefixTuningConfig(num_virtual_tokens=P)), "prefix", "prefix"),
    "prompt tuning": (peft(PromptTuningConfig(num_virtual_tokens=P)), "prompt", "prompt"),
    "QLoRA all-linear": (peft(LoraConfig(**all_linear), quantize=True), "qlora", "qlora"),
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
    build, method, _ = METHODS[name]
    gc.collect()  # the previous method's model and optimizer are garbage now: free them
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # the base model and whatever else the notebook holds
    torch.manual_seed(0)  # as `minipeft finetune`: the adapter's initial weights come from the global RNG
    model = build()
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    if hasattr(model, "get_nb_trainable_parameters"):  # a PeftModel counts its own (PEFT's method)
        assert trainable == model.get_nb_trainable_parameters()[0]
    batch = next(batch_stream(train_data, BATCH, seed=0))
    weights = memory_report(model)["total_bytes"]
    activations = activation_bytes(model, batch)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, states = optimizer_bytes(model, batch)
    assert grads == 4 * trainable and states == 8 * trainable  # float32 gradient, exp_avg, exp_avg_sq
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # lr 0: nothing moved
    del start
    metrics = train(model, train_data, val_data, finetune_config(method, log_every=1))
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
    f"{'total':>7s} {'step ms':>8s} {'held-out':>8s} {'sweep':>6s}"
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
    _, method, variant = METHODS[name]
    swept = sweep(variant, lr(method)) if variant else None  # the same command in benchmarks/README.md's sweep
    line += f" {swept['last']:>6.3f}" if swept else f" {'-':>6s}"
    if device == "cuda":
        line += f" {r_['cuda_peak'] / MiB:>8.1f}M"
    print(line)
print(
    f"\nbase model, no training: held-out loss {base_loss:.3f}.  Memory in MiB (2**20 bytes); "
    f"{'accounted on the CPU (no allocator counter there)' if device != 'cuda' else 'CUDA peak measured'}.\n"
    f"sweep: the held-out loss of the same `minipeft finetune` run in benchmarks/README.md's learning-rate sweep "
    f"(60 steps, this model, a 2-core CPU){'; this run is fast mode: ' + str(STEPS) + ' steps' if FAST else ''}."
)
if not FAST and device == "cpu":  # the same runs: equal up to the order of floating-point sums (thread count)
    for name, (_, method, variant) in METHODS.items():
        if variant:
            assert abs(results[name]["val_loss"] - sweep(variant, lr(method))["last"]) < 0.01, name

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
# The numbers the discussion below rests on, from the runs above:

# %%
lora_all = results["LoRA all-linear"]
print(
    f"full fine-tuning trains {results['full fine-tuning']['trainable'] / lora_all['trainable']:.0f}x the parameters "
    f"of LoRA all-linear and keeps {fixed['full fine-tuning'] / MiB:.1f} MiB of gradients and AdamW states, "
    f"against {fixed['LoRA all-linear'] / MiB:.2f} MiB"
)
print(
    f"weights: QLoRA {results['QLoRA all-linear']['weights'] / MiB:.1f} MiB, LoRA {lora_all['weights'] / MiB:.1f} MiB "
    f"(of which the float32 embedding: {base.model.embed_tokens.weight.numel() * 4 / MiB:.1f} MiB)"
)
print(f"activations: DoRA {results['DoRA all-linear']['activations'] / lora_all['activations']:.2f}x LoRA's")
print("step time against LoRA all-linear: " + ", ".join(
    f"{n} {results[n]['step_ms'] / lora_all['step_ms']:.2f}x" for n in ("full fine-tuning", "QLoRA all-linear")))  # fmt: skip
print(f"trainable: prompt tuning {results['prompt tuning']['trainable']:,d}, "
      f"prefix tuning {results['prefix tuning']['trainable']:,d}")  # fmt: skip
print("held-out loss, lowest first: " + ", ".join(
    f"{n} {results[n]['val_loss']:.3f}" for n in sorted(results, key=lambda n: results[n]["val_loss"])))  # fmt: skip

# %% [markdown]
# * **Memory.** Full fine-tuning's gradients and AdamW states are three copies of the model; every PEFT
#   method shrinks them to almost nothing. What is left is the frozen weights (QLoRA keeps its linear layers in 4
#   bits instead of 32, but this model's float32 embedding, which no method quantizes, is a large part of its
#   bytes) and the activations, which **no** method removes: backward must still pass through every frozen
#   layer. At this model size the activations dominate; for a 7B model the weights and optimizer states do, which
#   is where LoRA and QLoRA pay off (lesson 07 writes that budget). DoRA keeps more activations than LoRA: in
#   every adapted layer it multiplies both the base output and the LoRA output by the magnitude ratio
#   `m / ‖W + sBA‖`, and autograd keeps both `(tokens × out_features)` products for backward, where LoRA keeps
#   only its `r`-wide intermediate.
# * **Time.** A PEFT step is not much cheaper than a full one: the forward and backward passes through the
#   frozen model are the bulk of the work (the step-time ratios above). QLoRA also dequantizes every weight on
#   every pass, in forward and again in backward, which a fused 4-bit kernel would avoid. On a shared CPU the
#   step times are noisy: compare ratios within one run, not across runs.
# * **Quality.** Compare the held-out losses with the base model's (the dashed line) and with each other, on this
#   budget only. Prompt and prefix tuning train the fewest numbers and need the largest learning rates; prefix
#   tuning also starts *behind*: its keys and values start random and every token attends to them, so its first
#   losses are above the base model's (see its curve) and its first steps go to undoing that. The `sweep` column
#   is the same command run by `benchmarks/sweep_defaults.py`: on a CPU the two agree up to the order of
#   floating-point sums.
#
# ## Summary
#
# You trained nine methods on one task under one loop — [`minipeft/train.py`](../minipeft/train.py), on the
# budget of `minipeft finetune` — and measured trainable parameters, memory (weights via
# [`minipeft/nf4.py`](../minipeft/nf4.py)'s `memory_report`, gradients and optimizer states from the
# optimizer's own tensors, activations from autograd's saved tensors), step time and held-out loss. The
# methods live in [`lora.py`](../minipeft/lora.py), [`adapter.py`](../minipeft/adapter.py),
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
