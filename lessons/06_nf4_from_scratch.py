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
# # 06 · NF4 from scratch
#
# QLoRA keeps a frozen model in **4 bits per weight** and still fine-tunes it about as well as in 16 bits. The
# format that makes this work is **NF4**, "4-bit NormalFloat" (Dettmers et al. 2023, *QLoRA: Efficient Finetuning
# of Quantized LLMs*). In this lesson you build it from nothing, in a few lines per step:
#
# 1. the 16 NF4 values, from quantiles of the normal distribution;
# 2. blockwise absmax quantization: every 64 weights share one scale;
# 3. packing: two 4-bit codes in one byte;
# 4. double quantization: the scales themselves stored in 8 bits;
# 5. then you measure NF4 against FP4 and int4, on normal data and on real weights (the bundled tiny-shakespeare
#    model's, stored in float32 and never quantized), and count the bits each weight costs.
#
# Each step is checked with an `assert` against what you built before, then against the library file,
# `minipeft/nf4.py`, and (when it is installed) against bitsandbytes itself, byte for byte.
#
# **What you need first.** The normal distribution's CDF $\Phi$ and its inverse, the quantile function
# $\Phi^{-1}$ (`torch.special.ndtri`: $\Phi^{-1}(0.975) = 1.96$). Bits, bytes and hexadecimal. Nothing of the
# earlier lessons but the fact that a `Linear` layer holds a weight matrix $W$ (out, in).
#
# Runs in about RUNTIME minutes on a 2-core CPU (measured, full mode); the tests run it in a shorter mode.

# %%
import matplotlib.pyplot as plt
import torch
from common import DEVICE, FAST, exercise

MODEL = "tiny-shakespeare"
torch.manual_seed(0)
print(f"device: {DEVICE}, fast: {FAST}, torch {torch.__version__}")

# %% [markdown]
# ## 1. Sixteen values from the normal distribution
#
# A 4-bit code names 16 values. Which 16? Trained weights are roughly bell-shaped around zero (section 6 checks
# this on a real model), so put the values where the weights are: close together near 0, far apart in the tails.
# NF4 takes **quantiles** of N(0, 1), the points that cut the distribution into pieces of equal probability. If
# the data followed that distribution, every value would be used about equally often, so each 4-bit code would
# carry nearly its full 4 bits.
#
# Two details make it concrete:
#
# * The quantiles at probability 0 and 1 are $\mp\infty$, so the outermost probability is pulled in to
#   $p_{\max} = 0.9677083$. That number is bitsandbytes' constant (the `offset` of its `create_normal_map`),
#   hard-coded without a derivation. What follows is **our reconstruction** of where it comes from, the one
#   `minipeft/nf4.py` documents: "half a bin from the end", $1 - \frac{1}{2k}$, averaged over the $k = 15$ and
#   $k = 16$ levels of the two halves, $\frac12\left[(1 - \frac1{30}) + (1 - \frac1{32})\right] = 0.96770833\ldots$,
#   which matches all 7 digits (the cell below checks it). Its quantile, printed below, is where the outermost
#   values sit, in standard deviations.
# * Zero must be exact (padding, pruned weights, and the most common value of all), and 16 values symmetric
#   around 0 cannot include 0. So NF4 takes **8 positive** quantiles, **7 negative** ones and **0**, then
#   divides by the largest, so the code spans $[-1, 1]$.

# %%
from torch.special import ndtri  # ndtri(p) = the x with P(X <= x) = p, for X ~ N(0, 1)

p_max = 0.9677083  # bitsandbytes' constant; our reconstruction: ((1 - 1/30) + (1 - 1/32)) / 2 = 0.96770833...
print(f"p_max = {p_max:.7f}, ndtri(p_max) = {ndtri(torch.tensor(p_max)).item():.4f}")

# Rounded the way bitsandbytes made its table: float32 probabilities, float64 quantiles, float32 code.
positive = ndtri(torch.linspace(p_max, 0.5, 9)[:-1].double())  # 8 quantiles > 0 (p = 0.5 would give 0 itself)
negative = -ndtri(torch.linspace(p_max, 0.5, 8)[:-1].double())  # 7 quantiles < 0, mirrored
levels = torch.cat([negative, positive, torch.zeros(1, dtype=torch.float64)]).float().sort().values
code = levels / levels.max()  # (16,) in [-1, 1]
print(code)

assert abs(p_max - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 1e-7  # the reconstruction matches all 7 digits
assert code.numel() == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
assert (code[:7] < 0).all() and (code[8:] > 0).all()  # 7 negative values, an exact zero, 8 positive
assert (code.diff() > 0).all()  # sorted: code index 0..15 = the 4-bit number stored

# %% [markdown]
# The table printed in the QLoRA paper (appendix E) and hard-coded in bitsandbytes. Ours must be the same
# float32 numbers, bit for bit, and so must the library's `NF4_CODE`:

# %%
from minipeft import nf4

published = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
assert torch.equal(code, published)
assert torch.equal(code, nf4.NF4_CODE)
print("our 16 values == the published NF4 table == minipeft.nf4.NF4_CODE, bit for bit")

# %% [markdown]
# Compare the three 4-bit codes this lesson measures, on the same axis. **int4** spreads 15 values evenly over
# $[-1, 1]$ (the 16th, $-8/7$, is unused in the symmetric form). **FP4** is bitsandbytes' other 4-bit type,
# E2M1: 1 sign bit, 2 exponent bits, 1 mantissa bit. Build it the way a float is built: with exponent field
# $e \in \{1, 2, 3\}$ and mantissa bit $m$ a value is $(1 + m/2) \cdot 2^{e}$ (bitsandbytes' bias), so
# 2, 3, 4, 6, 8, 12; exponent field 0 holds zero and one subnormal, which bitsandbytes sets to 0.0625. With the
# sign, that is 15 distinct values (and a $-0$), divided by the largest, 12: dense near 0 like any float.
# **NF4** follows the bell curve.

# %%
normals = [(1 + m / 2) * 2**e for e in (1, 2, 3) for m in (0, 1)]  # 2, 3, 4, 6, 8, 12
magnitudes = torch.tensor([0.0, 0.0625] + normals)  # exponent field 0: zero and bitsandbytes' subnormal
fp4 = torch.cat([-magnitudes, magnitudes]).sort().values / 12  # (16,) with 0 twice (+0 and -0): 15 distinct
assert torch.equal(fp4, nf4.FP4_CODE.sort().values)  # the library's table (bitsandbytes' bit order), sorted
print("FP4 (E2M1) / 12:", [round(v, 4) for v in fp4.unique().tolist()])
int4 = torch.arange(-7, 8) / 7
x = torch.linspace(-1.1, 1.1, 400)
scale = ndtri(torch.tensor(p_max))  # NF4's +-1 sit at +-1.848 standard deviations

fig, ax = plt.subplots(figsize=(9, 3.2))
ax.plot(x, torch.exp(-0.5 * (x * scale) ** 2), color="0.7", label="N(0, 1) density, NF4's scale")
for y, (name, levels_) in enumerate([("int4", int4), ("FP4", fp4), ("NF4", code)]):
    ax.scatter(levels_, torch.full_like(levels_, -0.15 - 0.15 * y), marker="|", s=300, label=name)
ax.set_yticks([])
ax.set_xlabel("value / absmax")
ax.legend(loc="upper right", fontsize=8)
ax.set_title("Sixteen values each: where the three 4-bit codes put them")
plt.show()


# %% [markdown]
# ## 2. Blockwise absmax quantization
#
# To use the code, scale the weights into $[-1, 1]$ and replace each one by the index of its nearest value.
# One scale for a whole matrix would let a single large weight (LLMs have such outliers) squeeze all the others
# into the few values near zero. So the weight, flattened row-major, is cut into **blocks of 64**, and each block
# is scaled by its own largest magnitude, its **absmax**:
#
# $$q_i = \arg\min_j \left|\,\mathrm{code}_j - \frac{w_i}{\mathrm{absmax}_b}\right| \qquad
# \hat w_i = \mathrm{code}_{q_i} \cdot \mathrm{absmax}_b \qquad b = \lfloor i / 64 \rfloor$$
#
# "Nearest value" is "how many of the 15 midpoints between neighbouring values lie below $x$", which is
# `torch.bucketize`. A value exactly on a midpoint goes to the lower code, as in bitsandbytes.


# %%
def quantize_blocks(w, code, blocksize=64):
    # w: numel a multiple of blocksize -> codes (n,) uint8 in 0..15, absmax (n_blocks,) float32
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, blocksize), row-major
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1 / absmax)[:, None]  # in [-1, 1] (times the reciprocal, as bitsandbytes computes it)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,) the decision boundaries
    codes = torch.bucketize(scaled, midpoints)  # the nearest value's index; a tie goes to the lower one
    return codes.reshape(-1).to(torch.uint8), absmax


def dequantize_blocks(codes, absmax, code, shape, blocksize=64):
    return (code[codes.long()].view(-1, blocksize) * absmax[:, None]).reshape(shape)


torch.manual_seed(0)
w = torch.randn(256, 512) * 0.02  # a weight-like matrix: 2048 blocks of 64
codes, absmax = quantize_blocks(w, code)
w_hat = dequantize_blocks(codes, absmax, code, w.shape)
rel_mse = ((w_hat - w) ** 2).mean() / (w**2).mean()
print(f"codes {tuple(codes.shape)} {codes.dtype}, absmax {tuple(absmax.shape)}, relative MSE {rel_mse:.4f}")

# Each code is the nearest of the 16 values (brute force: the distance to all 16)
scaled = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
dist = (scaled[:, None] - code[None, :]).abs()  # (n, 16)
assert torch.allclose(dist.gather(1, codes.long()[:, None]).squeeze(1), dist.min(dim=1).values, atol=1e-6)
# The largest weight of every block maps to +-1, so it comes back exactly
top = w.reshape(-1, 64).abs().argmax(dim=1)
assert torch.equal(w_hat.reshape(-1, 64).gather(1, top[:, None]), w.reshape(-1, 64).gather(1, top[:, None]))
assert rel_mse < 0.02

# %% [markdown]
# **Why blocks.** Plant one outlier, 50 times the typical weight, and quantize with one scale for the whole
# matrix versus one per 64 weights. Look at the error on *the other* weights:

# %%
w_out = w.clone()
w_out[3, 7] = 1.0  # one weight ~50 standard deviations out
others = torch.ones_like(w_out, dtype=torch.bool)
others[3, 7] = False
errors = {}
for blocksize in (w_out.numel(), 64):
    c_, a_ = quantize_blocks(w_out, code, blocksize)
    w_hat_ = dequantize_blocks(c_, a_, code, w_out.shape, blocksize)
    errors[blocksize] = (((w_hat_ - w_out)[others] ** 2).mean() / (w_out[others] ** 2).mean()).item()
    print(f"blocksize {blocksize:6d}: relative MSE of the other weights {errors[blocksize]:.4f}")
assert errors[64] < errors[w_out.numel()] / 10  # the outlier spoils its own block of 64, not the matrix

# %% [markdown]
# **Is every code used equally often?** Only if $w / \mathrm{absmax}$ were distributed like the quantiles
# assume. It is not: the absmax of 64 normal values is about 2.6 standard deviations (printed below), not 1.85, so the
# scaled weights crowd the middle codes, and the $\pm 1$ codes are used about once per block (by the block's
# own absmax). The histogram shows it; the paper's "information-theoretically optimal" holds for the ideal
# distribution, not exactly for blockwise data.

# %%
usage = torch.bincount(codes.long(), minlength=16).float() / codes.numel()
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.bar(range(16), usage, color="C2")
ax.axhline(1 / 16, color="k", ls="--", lw=1, label="equal use, 1/16")
ax.set_xticks(range(16))
ax.set_xlabel("NF4 code")
ax.set_ylabel("share of weights")
ax.legend()
ax.set_title("How often each code is used (N(0, 1) data, blocks of 64)")
plt.show()
print(f"least used {usage.min():.4f}, most used {usage.max():.4f}; equal use would be {1 / 16:.4f}")
sigmas = (absmax / w.reshape(-1, 64).std(dim=1)).mean()
print(f"a block's absmax is {sigmas:.2f} standard deviations of its weights on average; NF4's +-1 assume 1.85")
assert usage[7] > 1 / 16 > usage[0] and usage[15] > 1 / 64  # the middle crowds; the ends: ~1 per block


# %% [markdown]
# ## 3. Packing: two codes a byte
#
# A code fits in 4 bits, a "nibble", so each byte holds two: the first of a pair in the **high** nibble, the
# second in the low one (bitsandbytes' order). Byte `0x3C` holds code 3 first, then code 12.
#
# The library does the packing: `quantize_nf4(w, blocksize=64, double_quant=False)` returns an `NF4Weight`
# holding `packed` (the bytes) and `absmax`. Read its bytes back, two codes each, and they must be exactly our
# codes; its absmax must be ours, and its dequantized weight ours, bit for bit. (Packing is exercise 1.)


# %%
def unpack(packed):  # (n/2,) uint8 -> (n,) uint8: the high nibble, then the low one
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


assert unpack(torch.tensor([0x3C], dtype=torch.uint8)).tolist() == [3, 12]
q = nf4.quantize_nf4(w, blocksize=64, double_quant=False)
print(f"{codes.numel()} codes -> {q.packed.numel()} bytes ({q.packed.dtype}); absmax {tuple(q.absmax.shape)}")
assert torch.equal(unpack(q.packed), codes) and torch.equal(q.absmax, absmax)
assert torch.equal(nf4.dequantize_nf4(q), w_hat)
print("inline quantize / dequantize == minipeft.nf4, and its bytes unpack to our codes, bit for bit")

# %% [markdown]
# ## 4. Double quantization
#
# Each block of 64 weights also stores its absmax, a float32: $32 / 64 = 0.5$ bit per weight, 12.5% on top of
# the 4. **Double quantization** stores the absmax values themselves in 8 bits:
#
# 1. subtract their mean, the `offset` (all absmax are positive: centred, they use both halves of a signed code);
# 2. cut them into blocks of 256 and scale each block by *its* absmax (one float32 per 256 blocks);
# 3. round to the nearest of 256 values of bitsandbytes' **dynamic map** (Dettmers 2016): fine near 0, coarse
#    near $\pm 1$. Decade $i = 0 \dots 6$ holds $2^i$ values $\pm 10^{i-6} m$, with $m$ the centres of $2^i$ equal
#    bins of $[0.1, 1]$; with 0 and 1 that is $2 \cdot 127 + 2 = 256$ values. Build it:
#
# Cost: $4 + \frac{8}{64} + \frac{32}{64 \cdot 256} = 4.127$ bits per weight instead of 4.5.

# %%
values = [torch.tensor([0.0, 1.0])]
for i in range(7):  # decade i: 2^i values between 10^(i-6) * 0.1 and 10^(i-6), each sign
    edges = torch.linspace(0.1, 1.0, 2**i + 1)
    centres = (edges[:-1] + edges[1:]) / 2  # (2^i,)
    values += [10 ** (i - 6) * centres, -(10 ** (i - 6)) * centres]
dynamic = torch.cat(values).sort().values  # (256,) in [-1, 1]
assert dynamic.numel() == 256 and torch.equal(dynamic, nf4.DYNAMIC_MAP)  # bitsandbytes' map, as the library has it
print("dynamic map: near 0", dynamic[127:131].tolist(), "... near 1", dynamic[-3:].tolist())

torch.manual_seed(1)
w = torch.randn(1024, 1024) * 0.02  # 16384 blocks of 64 -> 64 blocks of 256 absmax values
codes, absmax = quantize_blocks(w, code)

offset = absmax.mean()  # one float32
centred = (absmax - offset).view(-1, 256)  # (64, 256)
nested_absmax = centred.abs().amax(dim=1)  # (64,) float32: the only 32-bit numbers left
absmax_codes = torch.bucketize(centred / nested_absmax[:, None], (dynamic[:-1] + dynamic[1:]) / 2)  # 0..255
absmax_hat = (dynamic[absmax_codes] * nested_absmax[:, None]).reshape(-1) + offset

n = w.numel()
bits = 8 * (n // 2 + absmax_codes.numel() * 1 + nested_absmax.numel() * 4 + 4) / n  # codes, uint8, float32s
print(f"absmax relative error: max {((absmax_hat - absmax).abs() / absmax).max():.2e}")
print(f"bits per weight: {bits:.4f} (4 + 8/64 + 32/(64*256) = {4 + 8 / 64 + 32 / (64 * 256):.4f}, plus one offset)")
assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4
assert ((absmax_hat - absmax).abs() / absmax).max() < 0.01

# %% [markdown]
# What does it cost in accuracy? The weights are now rebuilt with the 8-bit absmax. And how close is the
# library (`double_quant=True`, the default)? The library matches bitsandbytes' CPU kernel, which does not take
# the exact nearest of the 256 values: it first snaps $x$ to a grid of 65536 points (a lookup table) and takes
# the value nearest to the grid point. For a handful of absmax values, those within half a grid step of a
# midpoint, that is the neighbouring code. So we expect agreement on nearly all codes, not all.

# %%
w_hat_single = dequantize_blocks(codes, absmax, code, w.shape)
w_hat_double = dequantize_blocks(codes, absmax_hat, code, w.shape)
mse_single = ((w_hat_single - w) ** 2).mean() / (w**2).mean()
mse_double = ((w_hat_double - w) ** 2).mean() / (w**2).mean()
print(f"relative MSE: absmax in float32 {mse_single:.5f}, absmax in 8 bits {mse_double:.5f}")

q2 = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
agree = (q2.absmax == absmax_codes.reshape(-1).to(torch.uint8)).float().mean().item()
print(f"absmax codes equal to the library's: {agree:.2%}; offset equal: {torch.equal(q2.offset, offset)}")
print("library's relative MSE:", (((nf4.dequantize_nf4(q2) - w) ** 2).mean() / (w**2).mean()).item())
assert torch.equal(unpack(q2.packed), codes)  # the 4-bit codes do not depend on how absmax is stored
assert agree > 0.99 and torch.equal(q2.offset, offset) and torch.equal(q2.nested_absmax, nested_absmax)
assert mse_double < mse_single * 1.01  # 0.37 bit per weight saved for < 1% more error

# %% [markdown]
# ## 5. The library in one screen, and bitsandbytes
#
# `minipeft/nf4.py` holds everything above: `create_normal_map` (section 1), `quantize_nf4` /
# `dequantize_nf4` (sections 2-4), and `NF4Linear`, a frozen `Linear` whose weight is stored this way and
# dequantized on the fly in forward. `memory_report` counts its bytes.

# %%
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
linear = nn.Linear(512, 256)
layer = nf4.NF4Linear.from_linear(linear)  # blocksize 64, double quantization: the QLoRA defaults
print(layer)
x = torch.randn(4, 512)
assert torch.equal(layer(x), F.linear(x, layer.dequantize(), linear.bias))  # dequantize, then an ordinary matmul
report = nf4.memory_report(layer)
print({k: report[k] for k in ("quantized_params", "code_bytes", "stats_bytes", "bits_per_param")})
assert abs(report["bits_per_param"] - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-9

# %% [markdown]
# minipeft's NF4 is meant to be bit-compatible with bitsandbytes, so 4-bit checkpoints move between the two.
# If bitsandbytes is installed (it is in the `dev` extra), check that claim on this very tensor:

# %%
try:
    import bitsandbytes.functional as bnbF
except ImportError:  # an optional dependency: the lesson does not need it
    bnbF = None
    print("bitsandbytes is not installed: skipped")
if bnbF is not None:
    packed_bnb, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed_bnb.reshape(-1), q2.packed)
    assert torch.equal(state.absmax, q2.absmax) and torch.equal(state.state2.absmax, q2.nested_absmax)
    assert torch.equal(bnbF.dequantize_4bit(packed_bnb, state), nf4.dequantize_nf4(q2))
    print("bitsandbytes", bnbF.__name__, "gives the same bytes and the same dequantized weights")

# %% [markdown]
# ## 6. How good is NF4? Against FP4 and int4
#
# `nf4.quantization_error(w, blocksizes)` rounds `w` through four 4-bit formats and returns the mean squared
# error for each, per blocksize:
#
# * **nf4**, **fp4**: scale by the block's absmax, take the nearest of 16 values (one float per block);
# * **int4_symmetric**: round $w / (\mathrm{absmax}/7)$ to $-7 \dots 7$ (one float per block);
# * **int4_affine**: round $(w - \min) / \frac{\max - \min}{15}$ to $0 \dots 15$: **two** floats per block.
#
# The last point matters: at the same blocksize, affine int4 spends twice the bits on statistics. A fair
# comparison puts formats at the same **bits per weight**: $4 + 32/\text{blocksize}$ for the first three,
# $4 + 64/\text{blocksize}$ for affine.
#
# First on normal data, where NF4's assumption holds:

# %%
torch.manual_seed(0)
normal = torch.randn(2**18 if FAST else 2**20)
err = nf4.quantization_error(normal)  # {format: {blocksize: mse}}; the data has variance 1
stats_per_block = {"nf4": 1, "fp4": 1, "int4_symmetric": 1, "int4_affine": 2}

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, by_bs in err.items():
    bs = list(by_bs)
    axes[0].plot(bs, list(by_bs.values()), "o-", label=name)
    axes[1].plot([4 + 32 * stats_per_block[name] / b for b in bs], list(by_bs.values()), "o-", label=name)
axes[0].set_xscale("log", base=2)
axes[0].set_xlabel("blocksize")
axes[1].set_xlabel("bits per weight (codes + float32 statistics)")
axes[1].set_xlim(4, 5.1)
for ax in axes:
    ax.set_ylabel("MSE (N(0, 1) data)")
    ax.legend(fontsize=8)
axes[0].set_title("Error by blocksize")
axes[1].set_title("Error by cost")
plt.tight_layout()
plt.show()

for bs in (64, 128):
    print(f"blocksize {bs}: " + ", ".join(f"{k} {v[bs]:.5f}" for k, v in err.items()))
assert all(err["nf4"][bs] < err["fp4"][bs] and err["nf4"][bs] < err["int4_symmetric"][bs] for bs in err["nf4"])
assert err["nf4"][64] < err["int4_affine"][128]  # the same 4.5 bits per weight: NF4 wins
assert err["int4_affine"][64] < err["nf4"][64]  # at the same blocksize affine int4 is better (with twice the floats)

# %% [markdown]
# At the same blocksize affine int4 is slightly *better* than NF4 (it uses the block's minimum too), but it pays
# an extra float per block for it; at the same cost NF4 wins, and FP4 and symmetric int4 lose at every
# blocksize.
#
# **Real weights.** Now the bundled model's own matrices. tiny-shakespeare was trained in float32 and is stored in
# float32: its weights are what training left, never rounded to any 4-bit grid (that matters, see below). Three of
# its matrices: the token embedding, the first block's query projection, the last block's MLP down-projection.

# %%
from minipeft.checkpoint import load_pretrained

tiny, _ = load_pretrained(MODEL)
assert all(p.dtype == torch.float32 for p in tiny.parameters())  # the file holds float32 tensors
real = {
    "embed_tokens": tiny.model.embed_tokens.weight,
    "layers.0 q_proj": tiny.model.layers[0].self_attn.q_proj.weight,
    "layers.4 down_proj": tiny.model.layers[4].mlp.down_proj.weight,
}
real = {k: v.detach().float().contiguous() for k, v in real.items()}
kurtosis = {}
for k, v in real.items():
    z = (v - v.mean()) / v.std()
    kurtosis[k] = ((z**4).mean() - 3).item()
    print(f"{k:20s} {str(tuple(v.shape)):12s} std {v.std():.4f}  excess kurtosis {kurtosis[k]:5.2f}")

# %% [markdown]
# Are they normal? The excess kurtosis of a normal distribution is 0; these are positive but small (printed
# above: all between 0 and 1, asserted), the embedding's the largest: slightly heavier tails than a bell curve,
# which the log scale below shows. (Large pretrained models are known for much heavier tails and rare huge
# outliers; this small model trained on one book is close to normal, which favours NF4 here. Measure your own.)

# %%
assert all(0 < kurt < 1 for kurt in kurtosis.values())
fig, ax = plt.subplots(figsize=(8, 3.2))
grid = torch.linspace(-6, 6, 200)
for k, v in real.items():
    z = ((v - v.mean()) / v.std()).reshape(-1)
    ax.hist(z, bins=120, range=(-6, 6), density=True, histtype="step", label=k)
ax.plot(grid, torch.exp(-0.5 * grid**2) / (2 * torch.pi) ** 0.5, "k--", label="N(0, 1)")
ax.set_yscale("log")
ax.set_ylim(1e-5, 1)
ax.set_xlabel("standardised weight")
ax.legend(fontsize=8)
ax.set_title("Real weights against the normal curve")
plt.show()

# %%
# Every format at 4.5 bits per weight: one float per 64 weights, or two per 128 for affine int4
cost_matched = {"nf4": 64, "fp4": 64, "int4_symmetric": 64, "int4_affine": 128}
rel = {}
for k, v in real.items():
    e = nf4.quantization_error(v, blocksizes=(64, 128))
    rel[k] = {f: e[f][bs] / (v**2).mean().item() for f, bs in cost_matched.items()}  # relative MSE

fig, ax = plt.subplots(figsize=(9, 3.2))
width = 0.2
for i, f in enumerate(cost_matched):
    ax.bar([j + i * width for j in range(len(real))], [rel[k][f] for k in real], width, label=f)
ax.set_xticks([j + 1.5 * width for j in range(len(real))], list(real))
ax.set_ylabel("MSE / mean(w^2)")
ax.legend(fontsize=8)
ax.set_title("4.5 bits per weight on real weights")
plt.show()
for k in real:
    print(f"{k:20s} " + "  ".join(f"{f} {rel[k][f]:.4f}" for f in cost_matched))
    assert rel[k]["nf4"] < rel[k]["fp4"] and rel[k]["nf4"] < rel[k]["int4_symmetric"]
    assert rel[k]["nf4"] < rel[k]["int4_affine"]  # at the same cost

# %% [markdown]
# **Measure what you think you measure.** A model downloaded in a 4-bit file is not a fair test bed. SmolLM2-135M,
# which lessons 00 and 01 load, comes as a llama.cpp **Q4_1** file: its linear layers are stored as
# $w = d \cdot q + m$ with $q \in 0..15$ in blocks of 32, which is exactly affine int4 at blocksize 32. Weights
# that have been through that grid once come back through it with no error at all, and any comparison run on them
# would crown affine int4. Simulate it on our float32 query projection: round it to Q4_1's grid, then measure again.

# %%
w = real["layers.0 q_proj"]
blocks = w.reshape(-1, 32)
lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
step = (hi - lo) / 15
w_q41 = (((blocks - lo) / step).round().clamp(0, 15) * step + lo).reshape(w.shape)  # as a Q4_1 file stores it
for name, v in (("float32 (as trained)", w), ("after a Q4_1 round trip", w_q41)):
    e = nf4.quantization_error(v, blocksizes=(32,))
    print(
        f"{name:24s} relative MSE at blocksize 32: affine int4 {e['int4_affine'][32] / (v**2).mean():.2e}, "
        f"nf4 {e['nf4'][32] / (v**2).mean():.2e}"
    )
e_q41 = nf4.quantization_error(w_q41, blocksizes=(32,))
assert e_q41["int4_affine"][32] / (w_q41**2).mean() < 1e-9 < e_q41["nf4"][32]  # affine int4 finds the grid again

# ## 7. Bits per parameter
#
# What it all costs, per weight, and for the weights of a 7B-parameter model. Double quantization's saving is the
# last line: a third of a GB at 7B, and more for larger models.

# %%
bits_per_weight = {
    "float32": 32,
    "bfloat16": 16,
    "int8 (+ a float32 per row of 4096)": 8 + 32 / 4096,
    "NF4, float32 absmax per 64": 4 + 32 / 64,
    "NF4 + double quantization": 4 + 8 / 64 + 32 / (64 * 256),
}
for name, b in bits_per_weight.items():
    print(f"{name:38s} {b:7.3f} bits   7B weights: {7e9 * b / 8 / 1e9:5.1f} GB")

w_check = nf4.quantize_nf4(torch.randn(4096, 4096), 64, double_quant=True)
measured = 8 * (w_check.packed.numel() + w_check.absmax.numel() + 4 * w_check.nested_absmax.numel()) / 4096**2
assert abs(measured - bits_per_weight["NF4 + double quantization"]) < 1e-9
saved = bits_per_weight["NF4, float32 absmax per 64"] - bits_per_weight["NF4 + double quantization"]
print(f"double quantization saves {saved:.3f} bit per weight: {7e9 * saved / 8 / 1e9:.2f} GB at 7B")

# %% [markdown]
# ## Summary
#
# You built NF4 from scratch and checked each piece against the library and against bitsandbytes:
#
# * **the code**: 16 values from normal quantiles, $p_{\max} = 0.9677083$, 7 negative, 0, 8 positive, in $[-1, 1]$
#   (`create_normal_map`, `NF4_CODE`);
# * **blockwise absmax**: 64 weights share a scale, each weight becomes the nearest value's index, ties to the
#   lower (`quantize_nf4`, `dequantize_nf4`);
# * **packing**: two codes a byte, the first in the high nibble;
# * **double quantization**: absmax minus its mean, 8 bits with the dynamic map, blocks of 256: 4.127 bits per
#   weight instead of 4.5, for under 1% more error;
# * **measurements**: at equal bits NF4 beats FP4, symmetric and affine int4, on normal data and on the bundled
#   model's float32 weights; but its codes are not used equally often, these weights are slightly heavier-tailed
#   than normal, and weights that already went through a 4-bit grid (a Q4_1 file) are no fair test bed.
#
# It all lives in **`minipeft/nf4.py`**, together with `NF4Linear` (the 4-bit frozen layer) and
# `quantize_model`, which lesson 07 uses to put LoRA on a 4-bit base.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it, which checks your function against the library (bit-compatible with bitsandbytes): "correct", or
# what differs.

# %% [markdown]
# **Exercise 1.** Packing, the inverse of section 3's `unpack`: two 4-bit codes a byte, the first of each pair in
# the high nibble. The check packs the codes of a quantized weight with your function and compares with the
# library's bytes.

# %%
from exercises.l06 import check_dequantize, check_pack_nibbles


def pack_nibbles(codes):
    """codes: (n,) uint8 in 0..15, n even -> (n/2,) uint8.

    Hint: `<<` shifts bits, `|` combines them; codes[0::2] are the first of each pair."""
    raise NotImplementedError  # your code


# %%
exercise("pack_nibbles", pack_nibbles, check_pack_nibbles)

# %% [markdown]
# **Exercise 2.** Everything at once: rebuild the weights from what a double-quantized NF4 checkpoint stores, the
# packed codes, the 8-bit absmax codes, one float32 absmax per 256 blocks and the offset. The check compares with
# `minipeft.nf4.dequantize_nf4`, bit for bit: compute in float32, in the order of sections 2 and 4.


# %%
def dequantize(packed, absmax_codes, nested_absmax, offset, shape, code, dynamic, blocksize=64, nested_blocksize=256):
    """packed (n/2,) uint8; absmax_codes (n/blocksize,) uint8 indices into `dynamic`; nested_absmax
    (n_blocks/256,) float32; offset () float32; code (16,) the NF4 values; dynamic (256,) the dynamic map
    -> the weights, float32, of `shape`. (n a multiple of blocksize * nested_blocksize here.)

    Hint: first the absmax of every block (section 4, undone), then the codes (section 3), then section 2."""
    raise NotImplementedError  # your code


# %%
exercise("dequantize", dequantize, check_dequantize)
