"""How fast can NF4 dequantization go? Formulations of dequantize_nf4 through torch.compile, and one handwritten
Triton kernel, against a device-to-device copy: GB/s (bytes read + bf16 bytes written) and bit equality with
the library's dequantize_nf4 (which equals bitsandbytes'); bitsandbytes' own kernel and the write-only ceiling
for reference. bench_finetune.py --extras dequant runs the same into its JSON and markdown.

    python benchmarks/dequant_kernels.py                 # on a GPU (Triton kernel too, where triton imports)
    python benchmarks/dequant_kernels.py --quick --device cpu   # smoke run: tiny weight, the compiled variants

The library keeps its one plain formulation; this script is the evidence behind the benchmark README's
"70% of copy is missed by every kernel tried". Timing: CUDA events over back-to-back calls.
"""

import argparse
import functools
import json
import time

import torch

import minipeft.nf4 as nf4

_CODES = {}


def nf4_code(device):  # the 16 NF4 values on the device, copied once (a copy per call would cost a host sync)
    if device not in _CODES:
        _CODES[device] = nf4.NF4_CODE.to(device)
    return _CODES[device]


def nibbles(q):  # a 16-entry table and two nibble lookups per byte, instead of the library's 256 x 2 pair table
    code = nf4_code(q.packed.device)
    p = q.packed.to(torch.int32)
    vals = torch.stack([code[p >> 4], code[p & 15]], -1).view(-1, q.blocksize)
    return (vals * nf4._block_absmax(q)[:, None]).to(q.dtype).view(q.shape)


def per_block(q):  # the packed bytes viewed per block (n_blocks, blocksize / 2): absmax indexed by row
    code = nf4_code(q.packed.device)
    p = q.packed.view(-1, q.blocksize // 2).to(torch.int32)
    vals = torch.stack([code[p >> 4], code[p & 15]], -1)
    return (vals * nf4._block_absmax(q)[:, None, None]).to(q.dtype).view(q.shape)


VARIANTS = dict(library=nf4.dequantize_nf4, nibbles=nibbles, per_block=per_block)


def triton_variant():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(packed, absmax, code, out, n_bytes, BLOCK: tl.constexpr, HALF_BLOCKSIZE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # BLOCK bytes -> 2 * BLOCK values
        mask = offs < n_bytes
        byte = tl.load(packed + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax + offs // HALF_BLOCKSIZE, mask=mask, other=0.0)
        hi, lo = tl.load(code + (byte >> 4)) * scale, tl.load(code + (byte & 15)) * scale  # float32, as bnb
        o = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + o, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=o < 2 * n_bytes)

    def run(q, block):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.packed.device)
        absmax, code = nf4._block_absmax(q), nf4_code(q.packed.device)
        n = q.packed.numel()
        kernel[(triton.cdiv(n, block),)](q.packed, absmax, code, out, n, BLOCK=block, HALF_BLOCKSIZE=q.blocksize // 2)
        return out

    return run


def ms_per_call(fn, arg, device, reps):
    for _ in range(3):
        fn(arg)
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn(arg)
        return 1e3 * (time.perf_counter() - t) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(arg)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a 64 x 256 weight, 3 calls each: a smoke run")
    ap.add_argument("--shape", default=None, help="OUT,IN of the weight (default 16384,8192; 64,256 with --quick)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape, reps = ((64, 256), 3) if args.quick else ((16384, 8192), 50)
    if args.shape:
        shape = tuple(int(x) for x in args.shape.split(","))
    w = torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    ref = nf4.dequantize_nf4(q)
    moved = sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.nested_absmax, q.nested_code))
    moved += ref.numel() * ref.element_size()
    dst = torch.empty_like(w)
    copy_ms = ms_per_call(dst.copy_, w, device, reps)
    res = dict(device=str(device), shape=list(shape), copy=dict(ms=copy_ms, gbps=2 * w.nbytes / copy_ms / 1e6))
    fns = {f"compiled_{k}": torch.compile(v) for k, v in VARIANTS.items()}
    fns["eager_library"] = nf4.dequantize_nf4
    if device.type == "cuda":
        try:
            run = triton_variant()
            fns.update({f"triton_{b}": functools.partial(run, block=b) for b in (512, 1024, 2048, 4096)})
        except ImportError as e:
            res["triton"] = f"not run: {e}"
    for name, fn in fns.items():
        torch._dynamo.reset()
        ms = ms_per_call(fn, q, device, reps)
        gbps = moved / ms / 1e6
        res[name] = dict(
            ms=ms, gbps=gbps, pct_of_copy=100 * gbps / res["copy"]["gbps"], bit_identical=bool(torch.equal(fn(q), ref))
        )
        print(f"{name:22s} {ms:8.3f} ms {gbps:8.0f} GB/s {res[name]['pct_of_copy']:5.1f}% of copy  "
              f"bit-identical {res[name]['bit_identical']}", flush=True)  # fmt: skip
    ms = ms_per_call(lambda _: dst.fill_(1.0), None, device, reps)  # the ceiling: writing the output, nothing read
    res["write_only"] = dict(ms=ms, gbps=w.nbytes / ms / 1e6)
    try:  # bitsandbytes' kernel on the same weight (its own quantization of it: not bit-compared)
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ms = ms_per_call(lambda _: bnbf.dequantize_4bit(packed, state), None, device, reps)
        res["bitsandbytes"] = dict(
            ms=ms, gbps=moved / ms / 1e6, pct_of_copy=100 * moved / ms / 1e6 / res["copy"]["gbps"]
        )
    except Exception as e:  # noqa: BLE001
        res["bitsandbytes"] = f"not run: {type(e).__name__}: {e}"[:300]
    print(f"write_only {res['write_only']['gbps']:.0f} GB/s; bitsandbytes {res['bitsandbytes']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def markdown(res):
    lines = [f"## dequantize_nf4 ({res['shape'][0]} x {res['shape'][1]}, blocksize 64, double quant)", "",
             f"GB/s of bytes read + bf16 bytes written; copy {res['copy']['gbps']:.0f} GB/s, writing the output alone "
             f"{res['write_only']['gbps']:.0f} GB/s.", "", "| kernel | GB/s | % of copy | bit-identical to eager |",
             "|---|---:|---:|---|"]  # fmt: skip
    for name, r in res.items():
        if isinstance(r, dict) and "pct_of_copy" in r:
            lines.append(f"| {name} | {r['gbps']:.0f} | {r['pct_of_copy']:.1f}% | {r.get('bit_identical', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
