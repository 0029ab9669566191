"""Fine-tuning on the GPUs of one host: tokens/s and per-GPU peak memory on 1 and N processes (torchrun), minipeft's
train() (DDP for adapters, FSDP2 with --fsdp) side by side with transformers + peft under accelerate.

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --shape llama-1b --method lora_all --out r.json
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --shape llama-1b --method full --fsdp --impl hf
    python benchmarks/bench_distributed.py --shape llama-1b --method full          # one process: the baseline

minipeft: the model as `minipeft finetune` builds it (full fine-tuning: float32 weights, bf16 autocast, under
FSDP2 bf16 compute with float32 reduction; adapters: a bf16 base, float32 adapters), train() with TrainConfig
(batch_size per process, the chunked loss, --compile), on random token ids (seeded), no evaluation. HF: the same
shape as LlamaForCausalLM (SDPA), peft for LoRA, accelerate's Accelerator (DDP, or FSDP2 through its
FullyShardedDataParallelPlugin with each decoder layer one unit and the same mixed precision), one plain loop.
Both: AdamW (fused on CUDA), lr 1e-5, clipping at 1.0, --batch rows of --seq tokens per process and step.

tokens/s = tokens of every process in the timed steps / their wall time (host clock, synchronized: the loss is
read each step); timed = all steps after the first --warmup (the compile and the first optimizer step are in
those). Peak = torch.cuda.max_memory_allocated on each process from the model built (and quantized: not the
bf16 model QLoRA quantizes) to the end; with FSDP every process still builds the whole model, then shards it. Weak scaling: the per-process batch stays, so N
processes train an N times larger batch; scaling = tokens/s on N / tokens/s on 1.
Rank 0 prints one JSON line (and writes it to --out).
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from harness import ALPHA, SHAPES, R, emit, model_config, utc_now  # noqa: E402
from harness import LORA_TARGETS as TARGETS  # noqa: E402

import minipeft as mp  # noqa: E402
from minipeft import distributed  # noqa: E402
from minipeft.data import Dataset  # noqa: E402
from minipeft.train import train  # noqa: E402

CONFIGS = {name: dict(cfg=model_config(name), batch=s["batch"], seq=s["seq"]) for name, s in SHAPES.items()}


BUILT = {}


def built(device):  # the model is built (and quantized): peak memory counts from here, the build's transient not
    if device != "cpu":
        BUILT["gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()


def minipeft_run(args, device, ids):
    """train() as `minipeft finetune` runs it; returns the per-step tokens/s."""
    full = args.method == "full"
    torch.manual_seed(0)
    with torch.device(device):
        model = mp.Transformer(mp.ModelConfig(**CONFIGS[args.shape]["cfg"])).to(
            torch.float32 if full else torch.bfloat16
        )
    if args.method == "qlora":
        model = mp.quantize_model(model)
    if not full:
        model = mp.get_peft_model(model, mp.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[args.method]))
    built(device)
    data = Dataset(input_ids=list(ids), labels=list(ids))
    cfg = mp.TrainConfig(steps=args.steps, lr=1e-5, batch_size=args.batch, log_every=1, seed=0, compile=args.compile,
                         fsdp=args.fsdp, eval_batches=None, progress=False)  # fmt: skip
    metrics = train(model, data, None, cfg)
    times = [e["tokens_per_s"] for e in metrics["train"]]  # log_every=1: each step's tokens (every rank's) / its time
    return times, metrics


def hf_run(args, device, ids):
    """transformers + peft under accelerate (DDP, or FSDP2 with --fsdp); returns the per-step tokens/s."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    full = args.method == "full"
    plugin = None
    if args.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="SHARDED_STATE_DICT",
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )  # fmt: skip
    acc = Accelerator(mixed_precision="bf16" if device != "cpu" else "no", fsdp_plugin=plugin, cpu=device == "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIGS[args.shape]["cfg"], use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float32 if full else torch.bfloat16,
                                              attn_implementation="sdpa")  # fmt: skip
    if not full:
        import peft

        lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[args.method])
        model = peft.get_peft_model(model, lora)
        for p in model.parameters():  # float32 adapters on a bf16 base, as minipeft's
            if p.requires_grad:
                p.data = p.data.float()
    if args.compile:
        layers = model.get_base_model().model.layers if not full else model.model.layers
        for layer in layers:
            layer.compile(**({"mode": args.compile} if isinstance(args.compile, str) else {}))
    built(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device != "cpu")
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    rank, world = distributed.world()
    out = []
    for step in range(args.steps):
        rows = [(step * world + rank) * args.batch + i for i in range(args.batch)]
        batch = torch.stack([ids[i % len(ids)] for i in rows]).to(device)
        t = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        acc.backward(loss)
        acc.clip_grad_norm_(params if not args.fsdp else model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # a sync
        out.append(batch.numel() * world / (time.perf_counter() - t))
    return out, {"loss": loss}


def profiled(run, args, rank):
    """run under torch.profiler, stepped by every optimizer step: steps warmup+1 .. warmup+3 are recorded; the
    table (kernels and ops by device time) goes to PREFIX.rankN.txt."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    def wrapped(*a):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts, schedule=schedule(wait=args.warmup, warmup=1, active=3)) as prof:
            hook = register_optimizer_step_post_hook(lambda *_: prof.step())
            try:
                result = run(*a)
            finally:
                hook.remove()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
        with open(f"{args.profile}.rank{rank}.txt", "w") as f:
            f.write(f"{args.impl} {args.method} fsdp={args.fsdp} compile={args.compile}: 3 steps\n{table}\n")
        return result

    return wrapped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-1b", choices=list(CONFIGS))
    ap.add_argument("--method", default="lora_all", choices=["full", *TARGETS])
    ap.add_argument("--impl", default="minipeft", choices=["minipeft", "hf"])
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (else DDP, or one plain process)")
    ap.add_argument("--compile", default=None, help="compile each block: 'default' or a torch.compile mode")
    ap.add_argument("--batch", type=int, help="rows per process and step (default: the shape's)")
    ap.add_argument("--seq", type=int, help="tokens per row (default: the shape's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (gloo)")
    ap.add_argument("--profile", default=None, metavar="PREFIX",
                    help="torch.profiler over 3 steps after --warmup: each rank's table of kernels by device time "
                    "to PREFIX.rankN.txt")  # fmt: skip
    args = ap.parse_args(argv)
    args.compile = {None: False, "default": True}.get(args.compile, args.compile)
    args.batch, args.seq = args.batch or CONFIGS[args.shape]["batch"], args.seq or CONFIGS[args.shape]["seq"]
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must be larger than --warmup {args.warmup}")
    device = distributed.setup(args.device) if distributed.launched() else args.device
    cuda = device.startswith("cuda")
    rank, world = distributed.world()
    g = torch.Generator().manual_seed(1)
    n = args.batch * world * args.steps
    ids = torch.randint(0, CONFIGS[args.shape]["cfg"]["vocab_size"], (n, args.seq), generator=g)
    run = minipeft_run if args.impl == "minipeft" else hf_run
    per_step, extra = profiled(run, args, rank)(args, device, ids) if args.profile else run(args, device, ids)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    if world > 1:
        dist.all_gather(peaks, peak)
    else:
        peaks = [peak]
    timed = per_step[args.warmup :]
    res = dict(shape=args.shape, method=args.method, impl=args.impl, fsdp=args.fsdp, compile=args.compile,
               world=world, batch_per_process=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
               tokens_per_s=len(timed) / sum(1 / x for x in timed), peak_gib=[round(float(p), 3) for p in peaks],
               built_gib=round(BUILT.get("gib", 0.0), 3),
               loss_last=extra.get("loss"), device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               date=utc_now())  # fmt: skip
    if rank == 0:
        emit(res, args.out)
    distributed.teardown()


if __name__ == "__main__":
    main()
