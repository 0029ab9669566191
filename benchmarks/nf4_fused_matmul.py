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
    import triton  # noqa: I001
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

    @triton.jit
    def halves(packed, absmax, nested_absmax, nested_code, offset, code, rows, k0, n_rows, K,
               BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DTYPE: tl.constexpr,
               LOOKUP: tl.constexpr):  # fmt: skip
        """W[rows, k0:k0 + 64:2] and W[rows, k0 + 1:k0 + 64:2] (a byte's high and low nibble) as two (R, 32)
        tiles: no interleaving, and one scale per row (a 64-column piece lies in one block). LOOKUP=False
        skips the code table (the nibble itself as the value: wrong numbers, for timing only)."""
        blk = (rows * K + k0) // BLOCKSIZE
        m = rows < n_rows
        if NESTED:
            c = tl.load(nested_code + tl.load(absmax + blk, mask=m, other=0).to(tl.int32), mask=m, other=0.0)
            scale = c * tl.load(nested_absmax + blk // NESTED_BLOCKSIZE, mask=m, other=0.0) + tl.load(offset)
        else:
            scale = tl.load(absmax + blk, mask=m, other=0.0)
        b = tl.load(packed + rows[:, None] * (K // 2) + k0 // 2 + tl.arange(0, 32)[None, :], mask=m[:, None], other=0)
        b = b.to(tl.int32)
        if LOOKUP:
            hi, lo = tl.load(code + (b >> 4)), tl.load(code + (b & 15))
        else:
            hi, lo = (b >> 4).to(tl.float32), (b & 15).to(tl.float32)
        return (hi * scale[:, None]).to(DTYPE), (lo * scale[:, None]).to(DTYPE)

    @triton.jit
    def nt_split(x, packed, absmax, nested_absmax, nested_code, offset, code, y, M, N, K, BLOCKSIZE: tl.constexpr,
                 NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOOKUP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """nt with the sum over k in two halves per 64 columns: even columns with the high nibbles, odd with the
        low (the same sum, in another order). BK is 64."""
        pm, pn = grid_ids(M, N, BM, BN, GROUP)
        rm, rn = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        even = 2 * tl.arange(0, 32)
        for k0 in range(0, K, 64):
            xa = x + rm[:, None] * K + k0 + even[None, :]
            a_even = tl.load(xa, mask=rm[:, None] < M, other=0.0)
            a_odd = tl.load(xa + 1, mask=rm[:, None] < M, other=0.0)
            hi, lo = halves(packed, absmax, nested_absmax, nested_code, offset, code, rn, k0, N, K, BLOCKSIZE,
                            NESTED_BLOCKSIZE, NESTED, x.dtype.element_ty, LOOKUP)  # fmt: skip
            acc = tl.dot(a_odd, tl.trans(lo), tl.dot(a_even, tl.trans(hi), acc))
        tl.store(
            y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N)
        )

    @triton.jit
    def nn_split(g, packed, absmax, nested_absmax, nested_code, offset, code, dx, M, N, K, BLOCKSIZE: tl.constexpr,
                 NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, LOOKUP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
        """nn with output tiles of 64 columns as two halves (even columns from the high nibbles, odd from the
        low), stored with a stride of 2. BK is 64."""
        pm, pk = grid_ids(M, K, BM, 64, GROUP)
        rm, k0 = pm * BM + tl.arange(0, BM), pk * 64
        acc_even, acc_odd = tl.zeros((BM, 32), dtype=tl.float32), tl.zeros((BM, 32), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            a = tl.load(g + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            hi, lo = halves(packed, absmax, nested_absmax, nested_code, offset, code, rn, k0, N, K, BLOCKSIZE,
                            NESTED_BLOCKSIZE, NESTED, g.dtype.element_ty, LOOKUP)  # fmt: skip
            acc_even, acc_odd = tl.dot(a, hi, acc_even), tl.dot(a, lo, acc_odd)
        out = dx + rm[:, None] * K + k0 + 2 * tl.arange(0, 32)[None, :]
        tl.store(out, acc_even.to(dx.dtype.element_ty), mask=rm[:, None] < M)
        tl.store(out + 1, acc_odd.to(dx.dtype.element_ty), mask=rm[:, None] < M)

    @triton.jit
    def nt_dense(x, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        """nt's loop on a dense W (N, K): what this kernel shape reaches without any dequantization."""
        pm, pn = grid_ids(M, N, BM, BN, GROUP)
        rm, rn = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(x + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(w + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        tl.store(
            y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N)
        )


def kernels(quick=False):
    """The forward and backward kernels, autotuned over CONFIGS (one small tile with quick=True: Triton's
    interpreter cannot time)."""
    tiles = [(32, 64, 128, 4, 2)] if quick else CONFIGS
    tiles64 = [(32, 64, 64, 4, 2)] if quick else [t for t in CONFIGS if t[2] == 64]

    def tuned(f, tiles):
        configs = [
            triton.Config(dict(BM=m, BN=n, BK=k, GROUP=8), num_warps=w, num_stages=st) for m, n, k, w, st in tiles
        ]
        return triton.autotune(configs=configs, key=["M", "N", "K"])(f)

    return dict(interleave=(tuned(nt, tiles), tuned(nn, tiles)), split=(tuned(nt_split, tiles64), tuned(nn_split, tiles64)),
                dense=tuned(nt_dense, tiles))  # fmt: skip


_CODES = {}


def _args(q):
    code = _CODES.get(q.packed.device)
    if code is None:
        code = _CODES[q.packed.device] = nf4.NF4_CODE.to(q.packed.device, torch.float32)
    nested = q.nested_absmax is not None
    extra = (q.nested_absmax, q.nested_code, q.offset) if nested else (q.absmax,) * 3
    return (q.packed, q.absmax, *extra, code), dict(BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize or 1,
                                                  NESTED=nested)  # fmt: skip


def fused(x, q, transposed, fns, variant="interleave", lookup=True):
    """x W^T (transposed=False; x (M, in)) or x W (True; x (M, out)) with W = q in 4 bits, one kernel: variant
    "interleave" (nt, nn) or "split" (nt_split, nn_split; lookup=False: without the code table, timing only)."""
    out_features, in_features = q.shape
    assert q.blocksize % 64 == 0 and in_features % q.blocksize == 0, (q.blocksize, q.shape)
    M = x.shape[0]
    args, meta = _args(q)
    if variant == "split":
        meta["LOOKUP"] = lookup
    kernel = fns[variant][1 if transposed else 0]
    y = x.new_empty(M, in_features if transposed else out_features)
    if not transposed:
        grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(out_features, c["BN"]),)  # noqa: E731
    else:
        grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(in_features, c["BK"]),)  # noqa: E731
    kernel[grid](x, *args, y, M, out_features, in_features, **meta)
    return y


def triton_dense(x, w, fns):
    """x W^T with nt_dense (W dense)."""
    y = x.new_empty(x.shape[0], w.shape[0])
    grid = lambda c: (triton.cdiv(x.shape[0], c["BM"]) * triton.cdiv(w.shape[0], c["BN"]),)  # noqa: E731
    fns["dense"][grid](x, w, y, x.shape[0], w.shape[0], x.shape[1])
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
    ap.add_argument("--only", help="comma-separated substrings of the shapes' names to run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = {"small": (70, 256, 192, False), "small nested": (33, 128, 320, True)} if args.quick else SHAPES
    reps = 2 if args.quick else args.reps
    fns = kernels(args.quick)
    if args.only:
        shapes = {k: v for k, v in shapes.items() if any(o in k for o in args.only.split(","))}
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
            exact = (x.double() @ (dense.double() if transposed else dense.double().T)).float()
            key = "backward dx = dy W" if transposed else "forward y = x W^T"
            r = row[key] = dict(err_library=rel_err(ref, exact))
            for variant in ("interleave", "split"):
                got = fused(x, q, transposed, fns, variant)
                r[f"err_{variant}"] = rel_err(got, exact)  # the output's rounding: ~2e-3 in bf16
                assert r[f"err_{variant}"] < 2 * r["err_library"] + 1e-5, (name, key, variant, r)
            wt = dense if transposed else dense.T
            calls = dict(dense=functools.partial(torch.matmul, x, wt), library=functools.partial(library, x, q, transposed),
                         interleave=functools.partial(fused, x, q, transposed, fns, "interleave"),
                         split=functools.partial(fused, x, q, transposed, fns, "split"),
                         split_no_lookup=functools.partial(fused, x, q, transposed, fns, "split", False))  # fmt: skip
            if not transposed:
                calls["triton_dense"] = functools.partial(triton_dense, x, dense, fns)
            r["ms"] = {k: ms_per_call(f, device, reps) for k, f in calls.items()}
            r["configs"] = {
                v: str(getattr(fns[v][1 if transposed else 0], "best_config", None)) for v in ("interleave", "split")
            }
            print(f"{name:20s} {key:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in r["ms"].items()) + " ms  err "
                  + " / ".join(f"{r[k]:.1e}" for k in r if k.startswith("err")), flush=True)  # fmt: skip
        res["rows"][name] = row
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
