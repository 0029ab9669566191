"""Lesson 11's worker: what each of the N processes that torchrun starts runs (CPU, gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py OUT STEPS SEQ_LEN

Every rank trains the bundled tiny-shakespeare model (float64) three times, each run with batch_size 2 per rank
(a global batch of 2 x N rows):
  1. DDP, LoRA (q_proj, v_proj, r 8): a communication hook counts what each all-reduce carries;
  2. DDP, full fine-tuning: the same count;
  3. FSDP2, full fine-tuning: the bytes of this rank's parameter shards and of its AdamW states.
Each rank writes OUT/rank<r>.json with its losses and its counts; the lesson reads them.
"""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import FSDPModule

import minipeft.distributed as distributed
import minipeft.fast as fast
import minipeft.train as train_module
from minipeft import LoraConfig, get_peft_model, load_pretrained
from minipeft.checkpoint import ASSETS
from minipeft.data import load_text_dataset
from minipeft.train import TrainConfig, train

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def model(method):
    """The bundled model in float64 (so that N processes and one agree to rounding), with a LoRA adapter or not;
    seeded, so every rank and the lesson's one-process run build the same one."""
    torch.manual_seed(0)
    base, _ = load_pretrained("tiny-shakespeare", dtype=torch.float64)
    return get_peft_model(base, LoraConfig(**LORA)) if method == "lora" else base


def config(steps, **changes):  # batch_size is per rank: the global batch is batch_size x N
    return TrainConfig(**{"steps": steps, "lr": 1e-3, "batch_size": 2, "grad_accum": 2, "eval_every": steps,
                          "eval_batches": 2, "max_grad_norm": 1.0, "seed": 0, "progress": False, **changes})  # fmt: skip


def data(seq_len):
    _, tokenizer = load_pretrained("tiny-shakespeare")
    return load_text_dataset(ASSETS / "data" / "sonnets.txt", tokenizer, seq_len)


def ddp_run(method, steps, train_set, val_set):
    """train() under DDP, every all-reduce counted: [(numel, bytes)] per call, and the metrics."""
    calls, plain = [], fast.parallel

    def counting(m, cfg, device):  # fast.parallel wraps the model in DDP; we add a hook that counts, then reduces
        par = plain(m, cfg, device)

        def hook(state, bucket):
            calls.append((bucket.buffer().numel(), bucket.buffer().numel() * bucket.buffer().element_size()))
            return allreduce_hook(state, bucket)

        par.module.register_comm_hook(None, hook)
        return par

    fast.parallel = counting
    try:
        metrics = train(model(method), train_set, val_set, config(steps))
    finally:
        fast.parallel = plain
    return {"calls": calls, "train": metrics["train"], "eval": metrics["eval"]}


def fsdp_run(steps, train_set, val_set):
    """train(fsdp=True), keeping its optimizer: this rank's bytes of weights and AdamW states, and shard shapes."""
    kept, plain = [], train_module.build_optimizer

    def keeping(*args, **kwargs):
        kept.append(plain(*args, **kwargs))
        return kept[-1]

    m = model("full")
    full_bytes = sum(p.numel() * p.element_size() for p in m.parameters())  # before sharding: one whole copy
    train_module.build_optimizer = keeping
    try:
        metrics = train(m, train_set, val_set, config(steps, fsdp=True))
    finally:
        train_module.build_optimizer = plain
    for unit in m.modules():  # the root keeps its weights gathered after a forward: back to the shards
        if isinstance(unit, FSDPModule):
            unit.reshard()
    local = {n: p.to_local() for n, p in m.named_parameters()}  # this rank's shard of each (DTensor) weight
    states = [v.to_local() for s in kept[0].state.values() for k, v in s.items() if k != "step"]
    return {
        "full_param_bytes": full_bytes,
        "param_bytes": sum(t.numel() * t.element_size() for t in local.values()),
        "adam_bytes": sum(t.numel() * t.element_size() for t in states),
        "shapes": {n: [list(p.shape), list(local[n].shape)] for n, p in m.named_parameters()},
        "train": metrics["train"],
        "eval": metrics["eval"],
    }


def main(out, steps, seq_len):
    distributed.setup("cpu")  # joins the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR in the env)
    torch.set_num_threads(1)
    rank, world = distributed.world()
    train_set, val_set = data(seq_len)
    result = {"world": world}
    for method in ("lora", "full"):
        result[f"ddp_{method}"] = ddp_run(method, steps, train_set, val_set)
    result["fsdp"] = fsdp_run(steps, train_set, val_set)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
