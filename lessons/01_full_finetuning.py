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
# # 01 · Full fine-tuning: the baseline
#
# Every parameter-efficient method is measured against one thing: training **all** the weights. This lesson
# builds that baseline and finds out what it costs.
#
# **What you will build:**
# 1. a training loop in a dozen lines, and a check that [`minipeft/train.py`](../minipeft/train.py)'s
#    `train()` computes *exactly* the same weights;
# 2. a full fine-tune of the bundled `tiny-shakespeare` model on Shakespeare's sonnets (which it has never
#    seen), with its learning curves and a sample before and after;
# 3. the memory bill: weights, gradients, AdamW's two states and the activations, each computed by hand and
#    then measured.
#
# **What you need to know first:** lesson 00 (the model); what a gradient is and what an optimizer step does;
# roughly what Adam does (a running mean and a running mean of squares of each gradient).

# %%
import time

import matplotlib.pyplot as plt
import torch

# the lessons' shared settings (common.py): the device, and the one training budget of `minipeft finetune`
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, exercise, lr

torch.manual_seed(0)
print(f"torch {torch.__version__} on {DEVICE}{' (fast mode)' if FAST else ''}")
print(f"the budget of every training run: {STEPS} steps of {BATCH} x {SEQ_LEN} tokens, lr {lr('full')} (full)")

# %% [markdown]
# ## The task: the sonnets
#
# `load_text_dataset` turns the text into one token stream, holds out its **last** 10% for validation (text
# that comes after everything trained on) and cuts both parts into blocks of `seq_len` tokens
# ([`minipeft/data.py`](../minipeft/data.py)). The held-out loss is what every lesson reports.
#
# `common.py` fixes one budget for every training run of lessons 01-08, the one of `minipeft finetune`:
# `STEPS` optimizer steps of `BATCH` blocks of `SEQ_LEN` tokens, its default learning rate per method
# (`lr("full")`, `lr("lora")`, ... measured by `benchmarks/sweep_defaults.py`), its 5% warmup, and the held-out
# loss over `VAL_BATCHES` batches (here: the whole held-out set). So the held-out losses of the lessons compare.

# %%
import copy

from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import Dataset, batch_stream, load_text_dataset
from minipeft.train import TrainConfig, evaluate, train

SONNETS = ASSETS / "data" / "sonnets.txt"  # the bundled fine-tuning data

model, tok = load_pretrained("tiny-shakespeare", device=DEVICE)
train_data, val_data = load_text_dataset(SONNETS, tok, seq_len=SEQ_LEN)
P = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # unique (lm_head is tied)
print(
    f"{len(train_data)} training blocks ({train_data.num_tokens():,d} tokens) and {len(val_data)} held-out blocks"
    f" of {SEQ_LEN} tokens; {STEPS} steps of {BATCH} blocks are {STEPS * BATCH / len(train_data):.1f} passes; "
    f"the model has {P:,d} parameters"
)
base_loss, base_ppl = evaluate(model, val_data, batch_size=BATCH, max_batches=VAL_BATCHES)
print(f"before fine-tuning: held-out loss {base_loss:.3f} (perplexity {base_ppl:.1f})")

prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=DEVICE)


def sample(m, n=20 if FAST else 60):
    out = m.generate(
        prompt, max_new_tokens=n, temperature=0.8, top_k=50, generator=torch.Generator(device=DEVICE).manual_seed(0)
    )
    return tok.decode(out[0].tolist())


before = sample(model)
print(before)


# %% [markdown]
# ## A training loop by hand
#
# One step: take a batch, compute the mean next-token loss, backpropagate, clip the gradient norm, let AdamW
# update every parameter, clear the gradients. `batch_stream(data, batch_size, seed)` gives batches in an
# order that depends only on the seed, so two runs see the same data.


# %%
def train_by_hand(model, data, steps, lr, batch_size, seed=0):
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stream = batch_stream(data, batch_size, seed)
    losses = []
    model.train()
    for _step in range(steps):
        batch = next(stream)
        loss = model(batch["input_ids"].to(DEVICE), labels=batch["labels"].to(DEVICE)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# Overfit one batch: a loop that cannot do this has a bug.
one_batch = Dataset(train_data.input_ids[:BATCH], train_data.labels[:BATCH])
m, _ = load_pretrained("tiny-shakespeare", device=DEVICE)
losses = train_by_hand(m, one_batch, steps=15, lr=1e-3, batch_size=BATCH)
print(" ".join(f"{l:.2f}" for l in losses))
assert losses[-1] < 0.5 * losses[0]

# %% [markdown]
# ### The library's `train()` does exactly this
#
# `train()` adds what a real run needs (a warmup + cosine schedule, gradient accumulation, evaluation,
# checkpoints, a stop on a non-finite loss) but its core is the loop above. With the schedule flat
# (`min_lr_ratio=1.0`, no warmup), the two must produce the **same weights**. We compare in float64: a CPU's
# matrix kernels may round a float32 product differently from one call to the next (it can depend on how the
# memory is aligned), and Adam's first steps magnify tiny differences in tiny gradients; in float64 that
# noise is far below anything we look at.

# %%
start, _ = load_pretrained("tiny-shakespeare", dtype="float64", device=DEVICE)
a, b = copy.deepcopy(start), copy.deepcopy(start)
train_by_hand(a, train_data, steps=3, lr=5e-4, batch_size=BATCH)
train(
    b,
    train_data,
    None,
    TrainConfig(steps=3, lr=5e-4, batch_size=BATCH, min_lr_ratio=1.0, max_grad_norm=1.0, progress=False),
)
diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), start.parameters()))
print(f"the weights moved by up to {moved:.1e}; the two loops differ by at most {diff:.1e}")
assert diff < 1e-9 and moved > 1e-4
del a, b, m, start

# %% [markdown]
# ### One speed switch: compiled blocks
#
# `TrainConfig(compile=True)` (`minipeft finetune --compile`) runs each block through `torch.compile` while
# training ([`fast.compile_blocks`](../minipeft/fast.py), the speed seam): PyTorch traces the block once, and its
# compiler fuses the small operations (RMSNorm, rotary embeddings, SwiGLU, an adapter's additions) into a few
# generated kernels and keeps fewer activations for backward. The math does not change, so the losses must
# match the plain loop's up to float rounding (bf16 on a GPU). The first step pays for the compilation; what it
# buys on a GPU is measured in `benchmarks/README.md`. On a small CPU there is little to win: this cell checks
# the math, not the speed.

# %%
start, _ = load_pretrained("tiny-shakespeare", device=DEVICE)
runs = {}
for compiled in (False, True):
    m = copy.deepcopy(start)
    t0 = time.perf_counter()
    met = train(
        m,
        train_data,
        None,
        TrainConfig(steps=3, lr=5e-4, batch_size=BATCH, log_every=1, progress=False, compile=compiled),
    )
    runs[compiled] = [e["loss"] for e in met["train"]], time.perf_counter() - t0
for compiled, (losses, seconds) in runs.items():
    note = ", the compilation included" if compiled else ""
    print(f"compile={compiled}: losses {' '.join(f'{l:.5f}' for l in losses)} ({seconds:.1f}s{note})")
gap = max(abs(x - y) for x, y in zip(runs[False][0], runs[True][0]))
assert gap < (1e-4 if DEVICE == "cpu" else 2e-2), gap
del m, start

# %% [markdown]
# ## Fine-tuning all the weights
#
# Now the real run, with `minipeft finetune --method full`'s budget: its learning rate `lr("full")`, a warmup
# over the first 5% of the steps, then a cosine decay to a tenth of the peak (`train()`'s `lr_multiplier`, which
# exercise 1 asks you to write), evaluating on the held-out sonnets along the way.

# %%
cfg = TrainConfig(
    steps=STEPS,
    lr=lr("full"),
    batch_size=BATCH,
    warmup_ratio=0.05,
    log_every=1,
    eval_every=max(1, STEPS // 5),
    eval_batches=VAL_BATCHES,
    seed=0,
    progress=False,
)
t0 = time.perf_counter()
metrics = train(model, train_data, val_data, cfg)
seconds = time.perf_counter() - t0
for e in metrics["eval"]:
    print(f"step {e['step']:4d}: held-out loss {e['val_loss']:.3f}")
print(f"{STEPS} steps in {seconds:.1f}s; held-out loss {base_loss:.3f} -> {metrics['val_loss']:.3f}")
assert metrics["val_loss"] < base_loss

# %%
fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.5))
epoch = len(train_data) // BATCH  # optimizer steps per pass over the training blocks
for k in range(epoch, STEPS + 1, epoch):
    ax.axvline(k + 0.5, color="gray", ls=":", lw=1)  # from here on, batches the model has already seen
ax.plot([e["step"] for e in metrics["train"]], [e["loss"] for e in metrics["train"]], label="training batch")
ax.plot(
    [0] + [e["step"] for e in metrics["eval"]],
    [base_loss] + [e["val_loss"] for e in metrics["eval"]],
    "o-",
    label="held-out sonnets",
)
ax.set_xlabel("optimizer step")
ax.set_ylabel("loss (nats/token)")
ax.legend()
ax.set_title("full fine-tuning")
ax_lr.plot([e["step"] for e in metrics["train"]], [e["lr"] for e in metrics["train"]], ".-")
ax_lr.set_xlabel("optimizer step")
ax_lr.set_ylabel("learning rate")
ax_lr.set_title("warmup, then cosine down to lr / 10")
plt.tight_layout()
plt.show()

# %% [markdown]
# The held-out loss is the number that matters. Dotted lines (if the run is long enough to have any) mark the
# end of an epoch: after one, every training batch is text the model has already seen, and a training loss
# that keeps falling while the held-out loss stalls is the model memorising its training tokens (a few tens of
# thousands) with its millions of parameters (both printed at the top). A sample before and after:

# %%
print("BEFORE:\n" + before + "\n")
print("AFTER:\n" + sample(model))

# %% [markdown]
# ## Where the memory goes
#
# Training with AdamW in float32 keeps, for **every trainable** parameter:
#
# | what | bytes per parameter |
# |---|---|
# | the weight | 4 |
# | its gradient | 4 |
# | AdamW's `exp_avg` (first moment) | 4 |
# | AdamW's `exp_avg_sq` (second moment) | 4 |
#
# 16 bytes a parameter: four copies of the model, before a single activation. Let us compute that, then
# measure it on a real optimizer after one step.

# %%
from minipeft.train import build_optimizer, trainable_parameters


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


params = {id(p): p for p in model.parameters()}.values()  # unique: lm_head is tied to the embedding
P = sum(p.numel() for p in params)
predicted = {"weights": 4 * P, "gradients": 4 * P, "AdamW states": 8 * P}

optimizer = build_optimizer(trainable_parameters(model), TrainConfig(lr=1e-5))
batch = next(batch_stream(train_data, BATCH, seed=0))
model(batch["input_ids"].to(DEVICE), labels=batch["labels"].to(DEVICE)).loss.backward()
optimizer.step()  # creates the states
measured = {
    "weights": nbytes(params),
    "gradients": nbytes(p.grad for p in params),
    "AdamW states": nbytes(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0),
}
optimizer.zero_grad(set_to_none=True)
for k in predicted:
    print(f"{k:13s} predicted {predicted[k] / 2**20:7.2f} MiB   measured {measured[k] / 2**20:7.2f} MiB")
    assert predicted[k] == measured[k]


# %% [markdown]
# ### Activations
#
# The fourth item grows with the batch: everything the forward pass **saves for backward** (inputs of each
# matmul, normalised activations, attention statistics...). PyTorch lets us watch exactly that:
# `torch.autograd.graph.saved_tensors_hooks` calls a function on every tensor autograd saves. We add up the
# bytes of their storages, skipping the parameters themselves (already counted) and counting a shared
# storage once.


# %%
def activation_bytes(model, ids, return_logits=True):
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, return_logits=return_logits).loss
    del loss  # the graph (and what it saved) is freed here
    return sum(saved.values())


ids = batch["input_ids"].to(DEVICE)
a1, a2 = activation_bytes(model, ids[:1]), activation_bytes(model, ids[:2])
print(f"saved for backward: {a1 / 2**20:.2f} MiB for one sequence of {SEQ_LEN} tokens, {a2 / 2**20:.2f} MiB for two")
assert abs(a2 / a1 - 2) < 0.05  # linear in the batch

# %% [markdown]
# Per token that is a lot: the logits alone are `vocab_size` numbers per token, and the softmax of the loss
# keeps as many again. `train()` therefore asks the model for the loss only (`return_logits=False`), which it
# computes from the last hidden states in chunks, so the `(B, T, V)` logits never exist all at once:

# %%
chunked = activation_bytes(model, ids[:1], return_logits=False)
V, D = model.config.vocab_size, model.config.hidden_size
print(
    f"per token: {a1 / SEQ_LEN / 1024:.1f} KiB with the logits, {chunked / SEQ_LEN / 1024:.1f} KiB without "
    f"(one float32 logit row is {V * 4 / 1024:.0f} KiB, one hidden vector {D * 4 / 1024:.0f} KiB)"
)
assert chunked < a1

# %% [markdown]
# On a GPU PyTorch can also report the peak it actually allocated, which includes temporary buffers; on a
# CPU there is no such counter, so there we rely on the accounting above.

# %%
if DEVICE == "cuda":
    import gc

    del optimizer
    gc.collect()
    torch.cuda.empty_cache()  # drop what earlier cells left behind
    optimizer = build_optimizer(trainable_parameters(model), TrainConfig(lr=1e-5))
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(ids, labels=ids, return_logits=False).loss.backward()
    optimizer.step()
    peak = torch.cuda.max_memory_allocated()
    accounted = sum(predicted.values()) + activation_bytes(model, ids, return_logits=False)
    print(
        f"CUDA: {start / 2**20:.1f} MiB allocated before the step, peak {peak / 2**20:.1f} MiB;"
        f" accounted for: {accounted / 2**20:.1f} MiB (the rest: temporary buffers of the kernels)"
    )
    optimizer.zero_grad(set_to_none=True)
else:
    print("no GPU here: peak memory is not measured, only accounted for (weights, gradients, states, activations)")

# %% [markdown]
# The same bill for SmolLM2-135M, the real model from lesson 00, at a batch of 8 sequences of 512 tokens.
# The weights, gradients and states are `P` times 4, 4 and 8 bytes; the activations (loss computed in chunks,
# as `train()` does) are measured on one short sequence and scaled linearly: they are linear in the number
# of sequences, and about linear in the length with an attention kernel that does not store the `T × T`
# attention matrix (PyTorch's `scaled_dot_product_attention` does not).

# %%
from minipeft.checkpoint import download

download("smollm2-135m-instruct")
smol, _ = load_pretrained("smollm2-135m-instruct", device=DEVICE)
rows, sizes = {}, {}
for name, m, n_seq, T in [("tiny-shakespeare", model, 8, 128), ("SmolLM2-135M", smol, 8, 512)]:
    P_m = sizes[name] = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    probe = 32
    probe_ids = torch.zeros(1, probe, dtype=torch.long, device=DEVICE)
    per_token = activation_bytes(m, probe_ids, return_logits=False) / probe
    rows[name] = {
        "weights": 4 * P_m,
        "gradients": 4 * P_m,
        "AdamW states": 8 * P_m,
        f"activations ({n_seq}×{T})": per_token * n_seq * T,
    }
del smol

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (name, parts) in zip(axes, rows.items()):
    bottom = 0
    for k, v in parts.items():
        ax.bar([0], [v / 2**20], bottom=bottom, width=0.6, label=f"{k}: {v / 2**20:,.0f} MiB")
        bottom += v / 2**20
    ax.set_xlim(-0.5, 2.2)
    ax.set_title(name)
    ax.set_ylabel("MiB")
    ax.set_xticks([])
    ax.legend(fontsize=8)
plt.suptitle("full fine-tuning with AdamW in float32")
plt.tight_layout()
plt.show()
for name, parts in rows.items():
    largest = max(parts, key=parts.get)
    print(f"{name}: the largest item is {largest}")
    assert largest.startswith("activations")

# %% [markdown]
# At these batch sizes the activations are the largest item. They can be cut without touching the model:
# smaller micro-batches with gradient accumulation, or gradient checkpointing (recompute each block in
# backward instead of storing it). The other three quarters of the fixed bill, gradients and AdamW states,
# exist only because every weight is trainable. Freeze the base and train a few thousand parameters instead,
# and they all but vanish: that is the promise of parameter-efficient fine-tuning (the activations stay:
# backward still has to pass through the frozen layers). Lesson 02 starts with LoRA.
#
# ### The gradients need not all exist at once
#
# `optimizer.step()` needs every gradient only because it runs after backward. Backward finishes the gradients
# one parameter at a time, so each parameter can take its AdamW step the moment its gradient is complete, and
# the gradient can be freed at once: the model's gradients then never exist together.
# `TrainConfig(optimizer_in_backward=True)` (`minipeft finetune --optimizer-in-backward`) does this with one
# hook per parameter, `step_in_backward` in [`minipeft/fast.py`](../minipeft/fast.py). The price: no clipping
# by the norm of all gradients, and no accumulation, since both need every gradient at once. Below, one step
# each way from the same weights: the same result, and the most gradient bytes alive at any moment of
# backward.

# %%
import copy

from minipeft.fast import step_in_backward


def one_step(in_backward):
    m = copy.deepcopy(model)
    opt = build_optimizer(trainable_parameters(m), TrainConfig(lr=1e-4, max_grad_norm=None))
    alive = [0]  # the most gradient bytes that existed at one moment of backward

    def watch(p):  # runs when p's gradient is complete (before the step hook, registered after it)
        alive[0] = max(alive[0], nbytes(q.grad for q in m.parameters() if q.grad is not None))

    hooks = [p.register_post_accumulate_grad_hook(watch) for p in m.parameters()]
    hooks += step_in_backward(opt) if in_backward else []
    m(ids, labels=ids, return_logits=False).loss.backward()
    opt.step()  # in backward: nothing is left to do here, no parameter has a gradient any more
    for h in hooks:
        h.remove()
    return m, alive[0]


plain, plain_bytes = one_step(False)
in_bwd, in_bwd_bytes = one_step(True)
same = all(torch.allclose(p, q, rtol=1e-6, atol=1e-9) for p, q in zip(plain.parameters(), in_bwd.parameters()))
print(
    f"same weights after the step: {same}; gradient bytes alive at most: {plain_bytes / 2**20:.2f} MiB "
    f"after backward, {in_bwd_bytes / 2**20:.2f} MiB stepped in backward (the largest one: the embedding)"
)
assert same and in_bwd_bytes == max(nbytes([p]) for p in model.parameters())  # one gradient at a time
del plain, in_bwd

# %% [markdown]
# It pays when the optimizer step is the peak: a big model at a small batch. The benchmarks measured one
# training step of a 7B model (Llama-2-7B's shape, bf16 weights, gradients and AdamW states, one sequence of 512
# tokens) on an H200; their result file, read here:

# %%
import json
from pathlib import Path

runs_7b = json.loads(Path("../benchmarks/results/memory-7b-2026-11-30-oib.json").read_text())
print(f"{runs_7b['gpu']}, {runs_7b['date']} (benchmarks/memory_7b.py --optimizer-in-backward --methods full)")
peak = {}
for row in runs_7b["rows"]:
    if not row["activation_checkpointing"]:
        peak[row["in_backward"]] = row["peak_gib"]
        print(f"  stepped in backward: {row['in_backward']!s:5}  peak {row['peak_gib']:.1f} GiB")
grads_gib = 2 * runs_7b["rows"][0]["trainable"] / 2**30  # 2 bytes a parameter
saved = peak[False] - peak[True]
print(f"  {saved:.1f} GiB ({saved / peak[False]:.0%}) off the peak; all the gradients in bf16: {grads_gib:.1f} GiB")
assert 0.14 < saved / peak[False] < 0.2 and saved < grads_gib

# %% [markdown]
# A sixth of the peak, though less than all the gradients weigh: at the new peak something else is alive
# besides the weights and the states (the benchmark does not break it down). At the batch sizes above the
# activations peak first, and stepping in backward saves nothing there.
#
# ## Summary
#
# You wrote a training loop and verified that [`minipeft/train.py`](../minipeft/train.py)'s `train()` computes
# the same weights; you fine-tuned every weight of `tiny-shakespeare` on the sonnets with the budget every later
# lesson uses, and watched the held-out loss fall; and you accounted for the memory — 16 bytes per parameter
# for weights, gradients and AdamW, plus activations linear in the batch — checking each number against the
# tensors themselves, and saw how stepping inside backward keeps the gradients from existing all at once.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l01.py`](solutions/l01.py).)
#
# **1. The learning-rate schedule** of `train()`, plotted above.

# %%
from exercises.l01 import CHECKS


def lr_multiplier(step, steps, warmup_steps, min_lr_ratio):
    """The factor on the peak lr at optimizer step `step` (0 .. steps - 1), a float.

    Warmup: for step < warmup_steps, rise linearly, but never give 0: step 0 gets 1 / (warmup_steps + 1),
    and the last warmup step warmup_steps / (warmup_steps + 1).
    Then a cosine (half a period) from 1 at step warmup_steps down to min_lr_ratio at the last step,
    steps - 1. (If that leaves fewer than 2 steps, divide by 1 instead of 0: the cosine starts at 1.)
    Hint: a progress that goes from 0 at step warmup_steps to 1 at step steps - 1, and math.cos(math.pi * ...).
    """
    raise NotImplementedError  # your code


# %%
exercise("lr_multiplier", lr_multiplier, CHECKS["lr_multiplier"])


# %% [markdown]
# **2. Gradient accumulation, weighted by targets.** A batch too big for memory runs as several micro-batches,
# and their gradients add up in `.grad`. With packed text every micro-batch has as many target tokens; with
# padded instruction data (labels `-100` where a token is not a target) they do not, and the weighting matters.


# %%
def accumulate_gradients(model, micro_batches):
    """Run backward once per micro-batch so that, afterwards, every parameter's .grad is the gradient of ONE
    big batch's loss: the mean over all target tokens of all the micro-batches.

    micro_batches: a list of {"input_ids": (b, T), "labels": (b, T)}, labels -100 where not a target.
    model(input_ids, labels=labels).loss is the mean over that micro-batch's targets; the targets of a batch are
    its labels shifted by one (position t predicts labels[:, t + 1]), so they number (labels[:, 1:] != -100).sum().
    The .grad fields start empty (None); return nothing.
    Hint: what must each micro-batch's loss be multiplied by, so that the sum is the big batch's mean?
    """
    raise NotImplementedError  # your code


# %%
exercise("accumulate_gradients", accumulate_gradients, CHECKS["accumulate_gradients"])


# %% [markdown]
# **3. One AdamW step by hand**: what the two states of the memory bill hold, and how they move a weight.


# %%
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """One AdamW step (Loshchilov & Hutter 2019, as torch.optim.AdamW), IN PLACE on param, exp_avg, exp_avg_sq.

    step is this step's number, 1 for the first. In order:
      decoupled weight decay: param shrinks by a factor (1 - lr * weight_decay);
      exp_avg and exp_avg_sq become the running means (betas[0], betas[1]) of grad and of grad²;
      both are divided by their bias correction (1 - beta^step): they started at 0;
      param moves by -lr * corrected exp_avg / (sqrt(corrected exp_avg_sq) + eps).
    Returns nothing. Hint: tensor.mul_, .add_, .addcmul_, .addcdiv_ work in place.
    """
    raise NotImplementedError  # your code


# %%
exercise("adamw_step", adamw_step, CHECKS["adamw_step"])
