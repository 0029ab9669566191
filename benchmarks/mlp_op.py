"""One LoRA MLP's forward and backward at a Block's shape: fast_mlp's op (SwiGLU and the adapters with a hand-written
backward, what checkpointed compiled Blocks run) against the same MLP compiled by inductor.

    python benchmarks/mlp_op.py --out benchmarks/results/NAME.json     # on a GPU

Shape: the 1B row's (4 x 1024 tokens, hidden 2048, intermediate 8192, r = 16 on gate, up and down; bf16 weights,
float32 adapters, bf16 autocast), or --shape 135m. Contenders, each timed over --iters forward + backward calls
with CUDA events after warm-up, with its peak memory above the inputs, then profiled once (its kernels' GPU time
by name, and the host's time per call):
    compiled   torch.compile of the reference MLP (model.MLP with lora.LoraLayer), as a compiled Block without
               checkpointing runs it
    op         fast_mlp.lora_mlp, eager (the casts autocast would do, by hand)
    op_compiled  torch.compile of the MLP with fast_mlp's forward installed (what a checkpointed compiled Block runs)
"""

import argparse
import json
import os
import sys
import types

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from minipeft import LoraConfig, fast_mlp, get_peft_model  # noqa: E402
from minipeft.model import ModelConfig, Transformer  # noqa: E402

SHAPES = {"1b": (4096, 2048, 8192), "135m": (4096, 576, 1536)}


def build(tokens, hidden, inter, r):
    cfg = ModelConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["gate_proj", "up_proj", "down_proj"],
                                             init_lora_weights=False))  # fmt: skip
    return model.base_model.model.layers[0].mlp


def contenders(mlp):
    compiled = torch.compile(mlp.forward)
    fused = types.MethodType(fast_mlp._mlp_forward, mlp)
    op_compiled = torch.compile(fused)

    def op(x):
        return fast_mlp.lora_mlp(x, *fast_mlp.mlp_operands(mlp, torch.bfloat16, True))

    return {"compiled": compiled, "op": op, "op_compiled": op_compiled}


def step(fn, x, g):
    with torch.autocast("cuda", torch.bfloat16):
        y = fn(x)
    y.backward(g)


def measure(name, fn, x, g, iters):
    for _ in range(3):
        step(fn, x, g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(fn, x, g)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(fn, x, g)
        torch.cuda.synchronize()
    kernels = sorted(
        ((e.key, e.device_time_total / 3, e.count // 3) for e in prof.key_averages() if e.device_time_total > 0
         and e.device_type.name == "CUDA"), key=lambda k: -k[1])  # fmt: skip
    print(f"{name:12s} {ms:7.3f} ms  peak {peak:7.1f} MiB above the inputs")
    for k, us, n in kernels[:12]:
        print(f"    {us:9.1f} us  x{n:3d}  {k[:110]}")
    return {"ms": ms, "peak_mib": peak, "kernels": [{"name": k, "us": us, "count": n} for k, us, n in kernels]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1b", choices=SHAPES)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tokens, hidden, inter = SHAPES[args.shape]
    mlp = build(tokens, hidden, inter, args.r)
    mlp.train()
    x = torch.randn(tokens // 1024, 1024, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    mlp.__dict__["_fast_checkpointed"] = True  # (read by fast_mlp._mlp_forward, as checkpoint_blocks sets it)
    results = {n: measure(n, fn, x, g, args.iters) for n, fn in contenders(mlp).items()}
    info = {"shape": args.shape, "tokens": tokens, "hidden": hidden, "intermediate": inter, "r": args.r,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
