"""Where a compiled training step's time goes on the host: is the GPU waiting for Python?

    python benchmarks/host_time.py --shape llama-1b --method lora_all                        # compile_blocks()
    python benchmarks/host_time.py --shape llama-1b --method lora_all --mode reduce-overhead  # + CUDA graphs
    python benchmarks/host_time.py --shape tiny --method lora_all --device cpu               # a smoke run

Builds the benchmark's minipeft model (contenders.py) (random bf16 weights), compiles its blocks, runs warm-up steps, then
prints: the median step time; the host time of one forward and of one backward (the time until the Python call
returns, before synchronizing) against their total (after synchronizing): when the two are close, the GPU was
waiting for the host; and the top host-side operations of one profiled step. The numbers quoted in
benchmarks/README.md ("31-34 ms of host time in forward ...", "906 aten::mm calls") came from the first
version of this script, on an H200 on 2026-11-30.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import contenders  # noqa: E402
import harness  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-1b", choices=list(harness.SHAPES))
    ap.add_argument("--method", default="lora_all", choices=harness.METHODS)
    ap.add_argument("--mode", default=None, help="a torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    spec = harness.SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        env = contenders.Env(args.shape, device, tmp)
        model = contenders.minipeft_model(env, args.method).train()
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
        )
        contenders._apply_levers(model, opt, compile={"mode": args.mode})
        ids = torch.randint(0, env.cfg.vocab_size, (spec["batch"], spec["seq"]), device=device)
        autocast = torch.autocast(device.type, dtype=harness.DTYPE)

        def forward():
            torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                return model(input_ids=ids, labels=ids, return_logits=False).loss

        def step():
            forward().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # the first compiles
            step()
        times = []
        for _ in range(args.steps):
            harness.sync(device)
            t = time.perf_counter()
            step()
            harness.sync(device)
            times.append(1e3 * (time.perf_counter() - t))
        print(f"{args.shape} {args.method} mode={args.mode}: step {statistics.median(times):.1f} ms (median)")
        out = {}
        for name, fn in (
            ("forward", lambda: out.setdefault("loss", forward())),
            ("backward", lambda: out["loss"].backward()),
        ):
            harness.sync(device)
            t = time.perf_counter()
            fn()
            host = 1e3 * (time.perf_counter() - t)
            harness.sync(device)
            print(f"{name}: host {host:.1f} ms, total {1e3 * (time.perf_counter() - t):.1f} ms")
        opt.zero_grad(set_to_none=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            harness.sync(device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
