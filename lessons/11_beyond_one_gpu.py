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
# # 11 · Beyond one GPU: data parallel (DDP) and sharded (FSDP2) training
#
# One device runs out in two ways: it is too slow (you want more rows per second), or the model and its optimizer
# no longer fit. PyTorch's answer to both is `torch.distributed`: N processes, one per device, started by
# `torchrun`. **DDP** keeps a whole model on every process and averages the gradients (an *all-reduce*) after each
# backward; **FSDP2** (`fully_shard`) cuts every weight, gradient and optimizer state into N pieces, one per process,
# and gathers a layer's weights only while it computes. minipeft runs on both (`minipeft/distributed.py`).
#
# **What you will build and measure**, on this CPU with 2 processes and the `gloo` backend (the same code runs on N
# GPUs with `nccl`):
# 1. data parallelism by hand, in one process: split a global batch between two "ranks", weight each rank's loss,
#    average the gradients, and get the one-process gradient back;
# 2. what DDP all-reduces per optimizer step, LoRA against full fine-tuning, counted in bytes by a hook inside DDP;
# 3. what FSDP2 keeps on each rank: the bytes of its weight shards and of its AdamW states;
# 4. that 2 processes train exactly what one process trains with the same global batch (float64, every step's loss).
#
# **What you need to know first:** lesson 01 (the training loop, where memory goes), lesson 02 (LoRA).

# %%
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from common import FAST, exercise

torch.manual_seed(0)
torch.set_num_threads(1)  # as torchrun gives each worker (OMP_NUM_THREADS=1); a small model gains nothing from more
STEPS, SEQ_LEN = (2, 64) if FAST else (6, 128)
print(f"torch {torch.__version__}, {STEPS} optimizer steps, {SEQ_LEN} tokens a row{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## Data parallel by hand
#
# A *global batch* of `per_rank x N` rows is drawn exactly as one process would draw it; rank `r` takes the rows
# `r*per_rank .. (r+1)*per_rank - 1` (`Parallel.rows` in `distributed.py`). Each rank computes the gradient of its
# own rows; DDP then sums the gradients of all ranks and divides by N.
#
# The one subtle point is the loss. The one-process loss is the mean over *all target tokens* of the global batch.
# If rank 0's rows have more targets than rank 1's (padding, prompt tokens masked with -100), the plain average of
# the two ranks' means is not that mean. So each rank weights its mean by `n_r / n_total` (its share of the targets:
# every rank can count all of them, it holds the whole global batch's labels) and by N (undoing DDP's division).
# We check this on the bundled model with LoRA, in float64, with a few labels of rank 1 masked.

# %%
from distributed_worker import LORA, config, data, model

from minipeft.train import train

train_set, val_set = data(SEQ_LEN)
lora = model("lora")
world, per_rank = 2, 2
rows = range(world * per_rank)  # a global batch: the first 4 rows of the training set
batch = {
    "input_ids": torch.stack([train_set.input_ids[i] for i in rows]),
    "labels": torch.stack([train_set.labels[i] for i in rows]),
}  # fmt: skip  (new tensors: safe to edit)
batch["labels"][2, : SEQ_LEN // 2] = -100  # rank 1's first row: half of its targets masked


def grads(b):
    lora.zero_grad()
    loss = lora(b["input_ids"], labels=b["labels"]).loss
    loss.backward()
    return loss, [p.grad.clone() for p in lora.parameters() if p.requires_grad]


def targets(b):
    return int((b["labels"][:, 1:] != -100).sum())  # labels are shifted inside the model


loss_one, grad_one = grads(batch)  # one process, the whole global batch
n_total = targets(batch)
averaged, plain_average = None, None
for r in range(world):
    mine = {k: v[r * per_rank : (r + 1) * per_rank] for k, v in batch.items()}
    loss_r, grad_r = grads(mine)
    n_r = targets(mine)
    print(f"rank {r}: rows {r * per_rank}..{(r + 1) * per_rank - 1}, {n_r} of {n_total} targets, loss {loss_r:.4f}")
    weighted = [g * (n_r / n_total * world) / world for g in grad_r]  # weight, then DDP's average over ranks
    averaged = weighted if averaged is None else [a + w for a, w in zip(averaged, weighted)]
    plain = [g / world for g in grad_r]
    plain_average = plain if plain_average is None else [a + p for a, p in zip(plain_average, plain)]

flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
err_weighted = float((flat(averaged) - flat(grad_one)).norm() / flat(grad_one).norm())
err_plain = float((flat(plain_average) - flat(grad_one)).norm() / flat(grad_one).norm())
print(f"weighted by n_r / n_total: rel. difference from one process {err_weighted:.1e}")
print(f"plain average of the means: rel. difference {err_plain:.1e}")
assert err_weighted < 1e-12 and err_plain > 1e-4

# %% [markdown]
# ## What DDP sends: only the trainable gradients, once per optimizer step
#
# DDP all-reduces the gradient of every parameter that *requires grad*, in buckets, while backward still runs. A
# frozen base has no gradient, so LoRA moves only the adapter. With gradient accumulation, the micro-batches before
# the last one run under `no_sync()`: their gradients accumulate locally, and one all-reduce per optimizer step
# carries the sum. Our runs use 2 micro-batches per step (`grad_accum=2`), so without `no_sync` they would send
# twice as much. Before measuring, the prediction: bytes per step = trainable values x 8 (float64).

# %%
full = model("full")
n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
n_full = sum(p.numel() for p in full.parameters())  # tied embeddings: one tensor, counted once
predicted = {"lora": n_lora * 8, "full": n_full * 8}
print(f"LoRA {LORA}: {n_lora:,} trainable values -> {predicted['lora'] / 1e6:.3f} MB per step")
print(f"full fine-tuning: {n_full:,} values -> {predicted['full'] / 1e6:.1f} MB per step")
print(f"full / LoRA: {predicted['full'] / predicted['lora']:.0f}x")

# %% [markdown]
# ## Two processes, started by torchrun
#
# `torchrun --nproc-per-node 2 script.py` (here `python -m torch.distributed.run`, the same program) starts two
# Python processes and tells each its `RANK`, `WORLD_SIZE` and where to meet (`MASTER_ADDR`, `MASTER_PORT`);
# `distributed.setup()` joins them into one process group. Each runs [`distributed_worker.py`](distributed_worker.py):
# DDP with LoRA and with full fine-tuning (a communication hook counts every all-reduce's bytes), then FSDP2 full
# fine-tuning (it keeps this rank's bytes of weights and AdamW states). `minipeft finetune --nproc 2` does the same
# launch through torchrun's Python API.

# %%
out = Path(tempfile.mkdtemp())
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       "distributed_worker.py", str(out), str(STEPS), str(SEQ_LEN)]  # fmt: skip
start = time.perf_counter()
done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
print(f"torchrun exited with {done.returncode} after {time.perf_counter() - start:.0f} s")
assert done.returncode == 0, done.stderr[-3000:]
ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
assert [r["world"] for r in ranks] == [2, 2]

# %% [markdown]
# What the hook saw on rank 0 (rank 1 sends the same): the number of all-reduce calls, and their bytes per
# optimizer step. Full fine-tuning's gradients travel in several buckets (DDP's `bucket_cap_mb`), LoRA's in one.

# %%
for method in ("lora", "full"):
    calls = ranks[0][f"ddp_{method}"]["calls"]
    sent = sum(b for _, b in calls) / STEPS
    print(f"DDP {method:4s}: {len(calls)} all-reduce calls in {STEPS} steps, {sent / 1e6:8.3f} MB per step "
          f"(predicted {predicted[method] / 1e6:8.3f} MB)")  # fmt: skip
    assert sent == predicted[method], (method, sent, predicted[method])
    assert ranks[1][f"ddp_{method}"]["calls"] == calls
print(
    f"measured full / LoRA: {sum(b for _, b in ranks[0]['ddp_full']['calls']) / sum(b for _, b in ranks[0]['ddp_lora']['calls']):.0f}x"
)  # noqa: E501

# %% [markdown]
# ## The same run as one process
#
# Two processes with 2 rows each should train exactly what one process trains with 4 rows: the same global
# batches, the same summed gradient, the same AdamW steps. In float64 the only differences are the order of
# additions. We train once more here, in this one process, with `batch_size=4`, and compare every logged loss
# (the training loss of the last step, the held-out loss at step 0 and at the end) of DDP LoRA, DDP full and
# FSDP2 full.

# %%
one = {m: train(model(m), train_set, val_set, config(STEPS, batch_size=4)) for m in ("lora", "full")}
rel = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
worst = 0.0
for name, method in [("ddp_lora", "lora"), ("ddp_full", "full"), ("fsdp", "full")]:
    got, ref = ranks[0][name], one[method]
    pairs = [(a["loss"], b["loss"]) for a, b in zip(got["train"], ref["train"], strict=True)]
    pairs += [(a["val_loss"], b["val_loss"]) for a, b in zip(got["eval"], ref["eval"], strict=True)]
    d = max(rel(a, b) for a, b in pairs)
    worst = max(worst, d)
    print(f"{name:9s} losses {[round(a, 6) for a, _ in pairs]}  one process {[round(b, 6) for _, b in pairs]}  "
          f"max rel. difference {d:.1e}")  # fmt: skip
assert worst <= 1e-10

# %% [markdown]
# ## What FSDP2 shards
#
# `fully_shard` replaces each weight by a `DTensor` sharded on dim 0: rank r keeps the r-th of N chunks
# (`torch.chunk`'s cut: `ceil(d0 / N)` rows each, the last one shorter). Each transformer block is one unit: its
# weights are all-gathered just before its forward (and again for its backward) and freed after. Gradients are
# *reduce-scattered* (each rank receives the sum of its own chunk only), so AdamW steps only the local shard, and its
# two moments are shard-sized too. What the worker measured after training:

# %%
fsdp = [r["fsdp"] for r in ranks]
one_adam = 2 * fsdp[0]["full_param_bytes"]  # AdamW keeps two moments per weight: one process, unsharded
for r, f in enumerate(fsdp):
    print(f"rank {r}: weights {f['param_bytes'] / 1e6:.2f} MB of {f['full_param_bytes'] / 1e6:.2f} MB "
          f"({f['param_bytes'] / f['full_param_bytes']:.3f}), AdamW states {f['adam_bytes'] / 1e6:.2f} MB of "
          f"{one_adam / 1e6:.2f} MB")  # fmt: skip
assert sum(f["param_bytes"] for f in fsdp) == fsdp[0]["full_param_bytes"]
assert sum(f["adam_bytes"] for f in fsdp) == one_adam
for n, (shape, _) in fsdp[0]["shapes"].items():  # every shard is torch.chunk's piece along dim 0
    chunks = torch.chunk(torch.empty(shape), 2, dim=0)
    assert [f["shapes"][n][1] for f in fsdp] == [list(c.shape) for c in chunks], n
print(
    f"embed_tokens {fsdp[0]['shapes']['model.embed_tokens.weight'][0]} -> rank 0 "
    f"{fsdp[0]['shapes']['model.embed_tokens.weight'][1]}, rank 1 {fsdp[1]['shapes']['model.embed_tokens.weight'][1]}"
)  # noqa: E501

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
labels = ["one process", "FSDP2 rank 0", "FSDP2 rank 1"]
weights = [fsdp[0]["full_param_bytes"]] + [f["param_bytes"] for f in fsdp]
adam = [one_adam] + [f["adam_bytes"] for f in fsdp]
ax.bar(labels, [w / 1e6 for w in weights], label="weights")
ax.bar(labels, [a / 1e6 for a in adam], bottom=[w / 1e6 for w in weights], label="AdamW states")
ax.set_ylabel("MB (float64)")
ax.set_title("full fine-tuning of the bundled model: what each process holds")
ax.legend()
plt.show()

# %% [markdown]
# ## Summary
#
# You split a global batch between ranks and saw why each rank's loss is weighted by its share of the targets;
# counted, inside DDP, that LoRA all-reduces only the adapter's gradients, once per optimizer step, against the
# whole model's for full fine-tuning; measured that FSDP2 leaves each of 2 ranks half of the weights and half of
# AdamW's states; and checked that both train exactly what one process trains with the same global batch. The code
# is [`minipeft/distributed.py`](../minipeft/distributed.py) (`setup`, `Parallel`: `rows`, `sync`, `shard`), behind
# `fast.parallel()` in [`minipeft/train.py`](../minipeft/train.py)'s loop; the command is
# `minipeft finetune --nproc N` (add `--fsdp` for sharded full fine-tuning, `--global-batch G` to fix the rows per
# step whatever N). Not measured here: speed and memory on GPUs.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell below
# it. The check calls your function on fixed inputs and compares it with an independent reference; it says what
# differs, never the answer. (Stuck? [`solutions/l11.py`](solutions/l11.py).)
#
# **1. A rank's rows.** The rows of a global batch that rank `rank` trains on; the check compares with
# `Parallel.rows`, on full batches and on the short last batch of a held-out set.

# %%
from exercises.l11 import CHECKS


def rank_rows(batch, rank, world, per_rank):
    """batch: {"input_ids": (R, T), "labels": (R, T), "attention_mask": (R, T) or None}, R <= per_rank x world rows.
    Returns the same keys holding this rank's rows (none, when the batch ends before them); None stays None."""
    raise NotImplementedError  # your code


# %%
exercise("rank_rows", rank_rows, CHECKS["rank_rows"])


# %% [markdown]
# **2. What DDP sends for a LoRA config.** From a model's sizes alone (no model built), the bytes DDP all-reduces
# per optimizer step. Mind grouped-query attention: `k_proj` and `v_proj` are narrower than `q_proj`.


# %%
def lora_allreduce_bytes(config, r, target_modules, bytes_per_value):
    """config: a minipeft ModelConfig (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim or None: hidden_size // num_attention_heads); target_modules: names among
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. Returns an int."""
    raise NotImplementedError  # your code


# %%
exercise("lora_allreduce_bytes", lora_allreduce_bytes, CHECKS["lora_allreduce_bytes"])


# %% [markdown]
# **3. A shard's size.** How many elements of a parameter of `shape` rank `rank` of `world` holds under FSDP2
# (dim-0 chunks, as measured above). Try a parameter with fewer rows than ranks.


# %%
def shard_numel(shape, world, rank):
    """shape: a tuple of ints; returns an int (0 when this rank's chunk is empty)."""
    raise NotImplementedError  # your code


# %%
exercise("shard_numel", shard_numel, CHECKS["shard_numel"])
