"""Host time of one call of the 4-bit layers' opaque op (fast_nf4: minipeft::nf4_matmul) and of its parts.

    python benchmarks/nf4_op_host.py --out benchmarks/results/NAME.json     # on a GPU (the Triton kernel)

A 7B QLoRA step in checkpointed Blocks calls the op ~670 times and its GPU waited on the host (step_anatomy in
benchmarks/results/h200-2026-11-30-mem5-7b.json), so what one call costs the host is what this measures: the
time per call of N calls in a row before synchronizing, on a small weight (its GPU work is shorter than its host
work, so the host is what is timed) and on the 7B MLP's (then the GPU). Contenders: F.linear with W already
dense; the Triton dequantization alone; the op (torch.library.Library); the same function registered with
torch.library.custom_op (how it was first written, defined here for the comparison); the op with its gradient
(fast.nf4_matmul: an autograd.Function, eager).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from minipeft import fast_nf4  # noqa: E402
from minipeft.nf4 import quantize_nf4  # noqa: E402


@torch.library.custom_op("nf4_op_host::custom", mutates_args=())
def _custom(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, offset: torch.Tensor | None,
            nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, out_features: int, in_features: int,
            blocksize: int, nested_blocksize: int, transposed: bool) -> torch.Tensor:  # fmt: skip
    return fast_nf4._nf4_matmul_impl(x, packed, absmax, offset, nested_absmax, nested_code, out_features,
                                     in_features, blocksize, nested_blocksize, transposed)  # fmt: skip


_custom.register_autograd(lambda ctx, grad: (None,) * 11, setup_context=lambda ctx, inputs, output: None)


def per_call_us(fn, calls, device):
    """(time for `calls` calls in a row before synchronizing) / calls, in microseconds."""
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def contenders(out_f, in_f, tokens, device, dtype):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(out_f, in_f, device=device, dtype=dtype), 64, True)
    fields = (q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code)
    meta = (out_f, in_f, 64, q.nested_blocksize)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    dequantize = fast_nf4._dequantizer(device)
    w = dequantize(*fields, (out_f, in_f), 64, q.nested_blocksize, dtype)
    return {
        "linear, W dense": lambda: torch.nn.functional.linear(x, w),
        "dequantize alone": lambda: dequantize(*fields, (out_f, in_f), 64, meta[3], dtype),
        "op (Library)": lambda: torch.ops.minipeft.nf4_matmul.default(x, *fields, *meta, False),
        "op (custom_op)": lambda: torch.ops.nf4_op_host.custom.default(x, *fields, *meta, False),
        "fast.nf4_matmul (eager, with its gradient)": lambda: fast_nf4.nf4_matmul(x, *fields, *meta, False),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    shapes = [((256, 256), 16)] + [((11008, 4096), 4096)] * (device.type == "cuda")  # (the large one: GPU only)
    for (out_f, in_f), tokens in shapes:
        fns = contenders(out_f, in_f, tokens, device, dtype)
        for fn in fns.values():
            fn()  # a warm-up call each
        times = {name: [] for name in fns}
        for _ in range(args.repeats):  # the contenders in turn, every repeat: a slow moment of the host hits all
            for name, fn in fns.items():
                times[name].append(per_call_us(fn, args.calls, device))
        for name, us in times.items():
            rows.append(dict(weight=[out_f, in_f], tokens=tokens, contender=name, us_per_call=round(min(us), 1),
                             median_us=round(statistics.median(us), 1)))  # fmt: skip
            print(f"W {out_f}x{in_f}, {tokens} tokens  {name:45s} {min(us):8.1f} us/call (fastest repeat), "
                  f"{statistics.median(us):8.1f} (median)", flush=True)  # fmt: skip
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    torch=torch.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, command=" ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
