"""Does fusing NF4 dequantization into the matmul pay for QLoRA training? (issue 17's lever "NF4 dequantization
fused into the matmul for QLoRA (Triton)").

A QLoRA layer's two matmuls per step, y = x W^T (forward) and dx = dy W (backward), with W (out, in) held in 4 bits.
The library's op (fast_nf4.nf4_matmul) dequantizes W into a bf16 buffer with one Triton kernel and hands it to
cuBLAS; a fused kernel reads the 4-bit bytes inside the matmul's K loop and never writes W. This script times, at
the 7B and 1B shapes, per matmul:

    dense    cuBLAS on an already dense bf16 W: the floor, what any 4-bit path costs at least
    library  fast_nf4's Triton dequantization + cuBLAS (what a QLoRA step runs now)
    fused    the Triton kernels below (autotuned over tile sizes), W never written

and checks the fused results against the library's (the same bf16 W, so only the order of summation differs).

    python benchmarks/nf4_fused_matmul.py --out benchmarks/results/NAME.json     # on a GPU with Triton
    TRITON_INTERPRET=1 python benchmarks/nf4_fused_matmul.py --quick --device cpu  # correctness, Triton's interpreter

The kernels take W's 4-bit tensors as fast_nf4 does (double quantization included) and dequantize each value as
dequantize_nf4 does (code * float32 scale, rounded once to bf16), tiles of 64 columns at a time, one block scale
per row of a tile (block sizes that are multiples of 64; others are not handled here).
"""

import argparse
import functools
import json
import time

import torch

import minipeft.nf4 as nf4

try:  # the kernels are defined at module level (Triton resolves a kernel's helpers among its globals)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CONFIGS = [  # (BM, BN, BK, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (64, 64, 128, 4, 4),
]  # fmt: skip


if triton is not None:

    @triton.jit
    def tile_w(packed, absmax, nested_absmax, nested_code, offset, code, rows, k0, n_rows, K,
               R: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
               NESTED: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
        """W[rows, k0:k0 + BK] as (R, BK) in DTYPE, dequantized as dequantize_nf4 does."""
        sub = tl.arange(0, BK // 64)  # the tile's 64-column pieces: one block scale per row of each
        blk = (rows[:, None] * K + k0 + 64 * sub[None, :]) // BLOCKSIZE  # (R, BK // 64)
        m = (rows[:, None] < n_rows) & (k0 + 64 * sub[None, :] < K)
        if NESTED:
            c = tl.load(nested_code + tl.load(absmax + blk, mask=m, other=0).to(tl.int32), mask=m, other=0.0)
            scale = c * tl.load(nested_absmax + blk // NESTED_BLOCKSIZE, mask=m, other=0.0) + tl.load(offset)
        else:
            scale = tl.load(absmax + blk, mask=m, other=0.0)
        cb = k0 // 2 + tl.arange(0, BK // 2)
        mb = (rows[:, None] < n_rows) & (cb[None, :] < K // 2)
        b = tl.load(packed + rows[:, None] * (K // 2) + cb[None, :], mask=mb, other=0)
        b = b.to(tl.int32)
        vals = tl.interleave(tl.load(code + (b >> 4)), tl.load(code + (b & 15)))  # (R, BK) float32
        vals = tl.reshape(vals, (R, BK // 64, 64)) * scale[:, :, None]
        return tl.reshape(vals, (R, BK)).to(DTYPE)

    @triton.jit
    def grid_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
        pid, n_m, n_n = tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN)  # grouped order: W tiles reused in L2
        group = pid // (GROUP * n_n)
        first = group * GROUP
        size = tl.minimum(n_m - first, GROUP)
        return first + (pid % (GROUP * n_n)) % size, (pid % (GROUP * n_n)) // size

    @triton.jit
    def nt(x, packed, absmax, nested_absmax, nested_code, offset, code, y, M, N, K, BLOCKSIZE: tl.constexpr,
           NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """y (M, N) = x (M, K) W^T, W (N, K) in 4 bits."""
        pm, pn = grid_ids(M, N, BM, BN, GROUP)
        rm, rn = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = tile_w(packed, absmax, nested_absmax, nested_code, offset, code, rn, k0, N, K, BN, BK, BLOCKSIZE,
                       NESTED_BLOCKSIZE, NESTED, x.dtype.element_ty)  # fmt: skip
            acc = tl.dot(a, tl.trans(w), acc)
        tl.store(
            y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N)
        )

    @triton.jit
    def nn(g, packed, absmax, nested_absmax, nested_code, offset, code, dx, M, N, K, BLOCKSIZE: tl.constexpr,
           NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """dx (M, K) = g (M, N) W, W (N, K) in 4 bits: output tiles (BM, BK), the sum over N in steps of BN."""
        pm, pk = grid_ids(M, K, BM, BK, GROUP)
        rm, k0 = pm * BM + tl.arange(0, BM), pk * BK
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            a = tl.load(g + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            w = tile_w(packed, absmax, nested_absmax, nested_code, offset, code, rn, k0, N, K, BN, BK, BLOCKSIZE,
                       NESTED_BLOCKSIZE, NESTED, g.dtype.element_ty)  # fmt: skip
            acc = tl.dot(a, w, acc)
        rk = k0 + tl.arange(0, BK)
        tl.store(
            dx + rm[:, None] * K + rk[None, :], acc.to(dx.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K)
        )


def kernels(quick=False):
    """The forward and backward kernels, autotuned over CONFIGS (one small tile with quick=True: Triton's
    interpreter cannot time)."""
    tiles = [(32, 64, 128, 4, 2)] if quick else CONFIGS
    configs = [triton.Config(dict(BM=m, BN=n, BK=k, GROUP=8), num_warps=w, num_stages=st) for m, n, k, w, st in tiles]
    return [triton.autotune(configs=configs, key=["M", "N", "K"])(f) for f in (nt, nn)]


_CODES = {}


def _args(q):
    code = _CODES.get(q.packed.device)
    if code is None:
        code = _CODES[q.packed.device] = nf4.NF4_CODE.to(q.packed.device, torch.float32)
    nested = q.nested_absmax is not None
    extra = (q.nested_absmax, q.nested_code, q.offset) if nested else (q.absmax,) * 3
    return (q.packed, q.absmax, *extra, code), dict(BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize or 1,
                                                  NESTED=nested)  # fmt: skip


def fused(x, q, transposed, fns):
    """x W^T (transposed=False; x (M, in)) or x W (True; x (M, out)) with W = q in 4 bits, one kernel."""
    import triton

    out_features, in_features = q.shape
    assert q.blocksize % 64 == 0 and in_features % q.blocksize == 0, (q.blocksize, q.shape)
    M = x.shape[0]
    args, meta = _args(q)
    if not transposed:
        y = x.new_empty(M, out_features)
        grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(out_features, c["BN"]),)  # noqa: E731
        fns[0][grid](x, *args, y, M, out_features, in_features, **meta)
        return y
    y = x.new_empty(M, in_features)
    grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(in_features, c["BK"]),)  # noqa: E731
    fns[1][grid](x, *args, y, M, out_features, in_features, **meta)
    return y


def library(x, q, transposed):
    from minipeft.fast_nf4 import _dequantize_from, _dequantizer

    deq = _dequantizer(x.device) if x.device.type == "cuda" else _dequantize_from
    w = deq(q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code, q.shape, q.blocksize, q.nested_blocksize,
            x.dtype)  # fmt: skip
    return x @ w if transposed else x @ w.T


def rel_err(y, exact):
    return ((y.float() - exact).norm() / exact.norm()).item()


def ms_per_call(fn, device, reps):
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


SHAPES = {  # name: (tokens, out_features, in_features)
    "7b gate/up 1x512": (512, 11008, 4096), "7b down 1x512": (512, 4096, 11008), "7b q/k/v/o 1x512": (512, 4096, 4096),
    "7b gate/up 1x4096": (4096, 11008, 4096), "7b down 1x4096": (4096, 4096, 11008),
    "7b q/k/v/o 1x4096": (4096, 4096, 4096),
    "1b gate/up 4x1024": (4096, 8192, 2048), "1b down 4x1024": (4096, 2048, 8192), "1b q/o 4x1024": (4096, 2048, 2048),
}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, a few calls: a correctness run")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = {"small": (70, 256, 192, False), "small nested": (33, 128, 320, True)} if args.quick else SHAPES
    reps = 2 if args.quick else args.reps
    fns = kernels(args.quick)
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", rows={})
    for name, (M, out_f, in_f, *double_quant) in shapes.items():
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # (the interpreter's dot has no bf16)
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
        q = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant[0] if double_quant else True)
        dense = nf4.dequantize_nf4(q)
        row = {}
        for transposed in (False, True):
            x = torch.randn(M, in_f if not transposed else out_f, device=device, dtype=dtype)
            ref = library(x, q, transposed)
            got = fused(x, q, transposed, fns)
            exact = (x.double() @ (dense.double() if transposed else dense.double().T)).float()
            key = "backward dx = dy W" if transposed else "forward y = x W^T"
            r = row[key] = dict(err_library=rel_err(ref, exact), err_fused=rel_err(got, exact))
            assert r["err_fused"] < 2 * r["err_library"] + 1e-5, (name, key, r)  # the output's rounding: ~2e-3 in bf16
            wt = dense if transposed else dense.T
            r["dense_ms"] = ms_per_call(functools.partial(torch.matmul, x, wt), device, reps)
            r["library_ms"] = ms_per_call(functools.partial(library, x, q, transposed), device, reps)
            r["fused_ms"] = ms_per_call(functools.partial(fused, x, q, transposed, fns), device, reps)
            r["fused_x_library"] = r["library_ms"] / r["fused_ms"]
            best = getattr(fns[1 if transposed else 0], "best_config", None)
            r["config"] = str(best) if best is not None else None
            print(f"{name:20s} {key:20s} dense {r['dense_ms']:7.3f} ms  library {r['library_ms']:7.3f}  fused "
                  f"{r['fused_ms']:7.3f} ms ({r['fused_x_library']:.2f}x)  err {r['err_library']:.1e} / "
                  f"{r['err_fused']:.1e}  {r['config']}", flush=True)  # fmt: skip
        res["rows"][name] = row
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
