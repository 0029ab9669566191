"""NF4: 4-bit NormalFloat weights with blockwise absmax scaling and double quantization, bit-compatible with
bitsandbytes.

QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") freezes
the base model in 4 bits and trains LoRA adapters on top. The weight W (out, in) is flattened row-major and cut
into blocks of `blocksize` (64) values; each block keeps its absmax and each value the index of the nearest of
16 levels, the `code`:

    q_i = argmin_j |code_j - w_i / absmax_b|        w_hat_i = code[q_i] * absmax_b        (b = i // blocksize)

The NF4 code holds quantiles of N(0, 1) at evenly spaced probabilities, scaled to [-1, 1]: one more positive
level than negative, and an exact zero (so padding and zero weights stay exact). That is what the paper's
"information-theoretically optimal for normal data" means: for N(0, 1) inputs scaled so that +-1 is 1.848 sigma,
every level catches about the same probability (0.056 to 0.071, 3.996 of 4 bits of entropy). It is not minimum
squared error (a Lloyd-Max quantizer has less), and real blocks are not that: dividing by a block's absmax
(about 2.6 sigma for 64 normal values) puts one value at +-1 in every block and crowds the rest toward zero,
so the levels are used 1.7% to 9.2% of the time (3.88 bits). `quantization_error` measures NF4 against FP4 and
int4 rather than taking it on faith.

Double quantization stores the float32 absmax (32/64 = 0.5 bit per weight) itself in 8 bits: subtract the mean
(`offset`), quantize blockwise (256) with bitsandbytes' signed dynamic map, keep one float32 absmax per 256
blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight instead of 4.5.

Shapes, for n = out * in weights: packed uint8 ((n+1)//2,), two codes a byte, the first in the high nibble;
absmax float32 (ceil(n/blocksize),), or uint8 codes of the same length with offset float32 (), nested_absmax
float32 (ceil(n_blocks/256),) and nested_code float32 (256,). All of it equals bitsandbytes 0.50.2 on an x86 CPU
byte for byte (tests/test_nf4.py); NF4Linear's state dict uses bnb.nn.Linear4bit's keys, so checkpoints cross both ways.
Not done: FP4 storage, quant_storage other than uint8, fused 4-bit kernels (we dequantize, then matmul).
"""

import dataclasses
import json
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # all powers of two bitsandbytes accepts (also on CPU)
NESTED_BLOCKSIZE = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Why 0.9677083: N(0,1) quantiles at probabilities linspaced from p to 0.5 need a finite extreme quantile, so p < 1.
# QLoRA takes p = 1 - 1/(2k), "half a bin" from the end, averaged over the k = 15 and k = 16 levels of each half:
# ((1 - 1/30) + (1 - 1/32)) / 2 = 0.96770833. ndtri(p) = 1.848: the +-1 codes sit at 1.85 standard deviations.
NF4_OFFSET = 0.9677083


def create_normal_map(offset: float = NF4_OFFSET) -> Tensor:
    """The 16 NF4 levels, sorted: code 0 is -1, code 7 is 0, code 15 is 1. float32 (16,)."""
    # Rounded exactly as bitsandbytes made its table: float32 probabilities, float64 quantiles, float32 storage
    # and normalisation. Any other order of roundings moves some levels by one float32 ulp.
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 levels > 0 (drop p=0.5)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels < 0
    code = torch.cat([negative, positive, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return code / code.max()  # to [-1, 1]; the most negative level is -ndtri(p)/ndtri(p) = -1 too


def create_dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep
    Learning"): +-10^-e * m for decades e = 6..0 with 2^(6-e) linear fraction values m in each, plus 0 and 1.
    Fine near zero, coarse near 1: 127 negative, zero, 128 positive levels. float32 (256,), sorted."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0  # (2^i,) the bin centres in [0.1, 1]
        values += [10 ** (i - 6) * means, -(10 ** (i - 6)) * means]
    return torch.cat(values).sort().values


NF4_CODE = create_normal_map()
DYNAMIC_MAP = create_dynamic_map()
# FP4 (E2M1: sign, 2 exponent bits, 1 mantissa bit) in bitsandbytes' bit order, bias 2 and no infinities; only for
# quantization_error. bnb.functional.get_4bit_type("fp4") is this list divided by its absmax.
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12


@dataclass
class NF4Weight:
    """One quantized tensor. Shapes in the module docstring; the offset/nested fields only when nested.
    bnb's quantize_4bit returns packed as a column ((n+1)//2, 1); we keep it flat and write the column to state
    dicts."""

    packed: Tensor
    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    offset: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @classmethod
    def empty(cls, shape, dtype, blocksize=64, double_quant=True, device=None) -> "NF4Weight":
        """An all-zero weight of `shape`, with no dense work: every absmax (and the offset) is 0, so code * 0 = 0
        whatever the codes hold, and the codes are left unwritten (torch.empty: no memory is touched until a state
        dict is loaded over them). Only the 4-bit sizes are allocated; the placeholder a checkpoint loads into."""
        _check_blocksize(blocksize)
        shape = torch.Size(shape)
        n_blocks = -(-shape.numel() // blocksize)
        packed = torch.empty((shape.numel() + 1) // 2, dtype=torch.uint8, device=device)  # ((n+1)//2,) as quantize_nf4
        if not double_quant:
            return cls(packed, torch.zeros(n_blocks, device=device), shape, dtype, blocksize)
        absmax, offset = torch.zeros(n_blocks, dtype=torch.uint8, device=device), torch.zeros((), device=device)
        nested_absmax = torch.zeros(-(-n_blocks // NESTED_BLOCKSIZE), device=device)
        return cls(packed, absmax, shape, dtype, blocksize, offset, nested_absmax, DYNAMIC_MAP.to(device, copy=True))

    def to(self, device) -> "NF4Weight":
        moved = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **moved)


_TENSOR_FIELDS = ("packed", "absmax", "offset", "nested_absmax", "nested_code")


def _check_blocksize(blocksize) -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))}")


def _check_weight(w) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"expected a torch.Tensor to quantize, got {type(w).__name__}")
    if w.dtype not in DTYPES:
        raise TypeError(f"can only quantize float32, bfloat16, float16 or float64 tensors, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    bad = ~torch.isfinite(w.detach())
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"weight has {int(bad.sum())} non-finite values (NaN or inf); the first at index {first}")


def _midpoints(code: Tensor) -> Tensor:  # (len-1,) the decision boundaries of a sorted code
    return (code[:-1] + code[1:]) / 2


def _blocks(x: Tensor, blocksize: int) -> Tensor:  # (n,) -> (n_blocks, blocksize), the last block zero padded
    return F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize any float tensor to NF4, byte for byte as bitsandbytes.functional.quantize_4bit on CPU."""
    _check_blocksize(blocksize)
    _check_weight(w)
    flat = w.detach().reshape(-1).float()  # (n,) row-major; bf16 and fp16 widen exactly
    n, tail = flat.numel(), flat.numel() % blocksize
    blocks = _blocks(flat, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,) float32
    # w / absmax into [-1, 1], as x * (1/absmax) in float32; clamping absmax maps all-zero blocks to 0, not NaN.
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if tail:  # bnb treats a partial last block apart: it divides (x / absmax can differ from x * (1/absmax) by an
        absmax[-1] = absmax[-1].clamp(min=1e-38)  # ulp) and it stores the clamped absmax (1e-38 if all zero)
        scaled[-1, :tail] = flat[n - tail :] / absmax[-1]
    scaled = scaled.clamp(-1, 1).reshape(-1)[: n + n % 2]  # an odd n keeps one padding 0.0 (code 7)
    # Nearest level: count the midpoints strictly below x. A value exactly on a midpoint goes to the lower code.
    codes = torch.bucketize(scaled, _midpoints(NF4_CODE.to(w.device))).to(torch.uint8)  # (n + n%2,) in 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # ((n+1)//2,) the first element in the high nibble
    q = NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    if not double_quant:
        return q
    offset = absmax.mean()  # absmax >= 0 is one-sided; centred, it uses both halves of the signed map
    q.absmax, q.nested_absmax = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    q.offset, q.nested_code = offset, DYNAMIC_MAP.to(w.device, copy=True)  # each weight its own table, as bnb
    return q


def _quantize_dynamic(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization with the dynamic map, as bitsandbytes' CPU kernel does it: (n,) uint8 codes,
    (ceil(n/blocksize),) float32 absmax."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # here the partial block multiplies too
    v = (blocks * inv[:, None]).clamp(-1, 1)
    # bnb's CPU kernel snaps v to a grid of 65536 points on [-1, 1] (a lookup table) and returns the level nearest
    # to the grid point, not to v. Its CUDA kernel searches the map exactly; the two disagree for a fraction of a
    # percent of values: those within half a grid step (1.5e-5) of a midpoint, or |v| < 1e-3 where the levels are
    # finer than the grid. We follow the CPU kernel, so our bytes equal bnb's on CPU.
    grid = (((v + 1.0) * 0.5) * 65535 + 0.5).to(torch.int32)  # float32 steps as the C code; truncation
    snapped = -1.0 + (2.0 * grid.float()) / 65535
    codes = torch.bucketize(snapped, _midpoints(DYNAMIC_MAP.to(x.device)))  # ties to the lower level, as in NF4
    codes = torch.where(absmax[:, None] > 0, codes, 0)  # an all-zero block stores code 0 (times absmax 0)
    return codes.reshape(-1)[: x.numel()].to(torch.uint8), absmax


def _block_absmax(q: NF4Weight) -> Tensor:  # (n_blocks,) float32, undoing double quantization
    if not q.nested:
        return q.absmax
    n_blocks = q.absmax.numel()
    codes = _blocks(q.nested_code[q.absmax.long()], q.nested_blocksize)  # (n_nested, 256)
    return (codes * q.nested_absmax[:, None]).reshape(-1)[:n_blocks] + q.offset


_PAIR_TABLES = {}  # device -> (256, 2) float32: the two NF4 values each byte holds (high nibble first)


def _pair_table(device) -> Tensor:
    """Decoding a byte at a time halves the lookups, and keeping the table on the device avoids a host copy
    (and a sync) per call: the two things that made the first version of _dequantize slow on a GPU."""
    if device not in _PAIR_TABLES:
        byte = torch.arange(256)
        _PAIR_TABLES[device] = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=-1).to(device)
    return _PAIR_TABLES[device]


def _dequantize(q: NF4Weight, dtype: torch.dtype) -> Tensor:
    n = q.shape.numel()
    # each byte -> its two code values (high nibble first); int32 indices for index_select (int64 ones are slower)
    values = _pair_table(q.packed.device).index_select(0, q.packed.int()).reshape(-1)[:n]  # (n,) float32 codes
    absmax = _block_absmax(q)  # (n_blocks,)
    if n % q.blocksize == 0:  # whole blocks: a view, no padding copy
        w = (values.view(-1, q.blocksize) * absmax[:, None]).reshape(-1)
    else:
        w = values * absmax.repeat_interleave(q.blocksize)[:n]
    return w.to(dtype).reshape(q.shape)  # float32 product, then one rounding to dtype (as bitsandbytes)


def dequantize_nf4(q: NF4Weight) -> Tensor:
    """code[q] * absmax, in the original dtype and shape; equals bitsandbytes.functional.dequantize_4bit."""
    return _dequantize(q, q.dtype)


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W stored in 4 bits. Saves only the quantized tensors: the dense W (out, in) exists
    during forward and is rebuilt in backward, never kept in between. Gradients for x (and b), never for W."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, q: NF4Weight) -> Tensor:
        ctx.save_for_backward(*(getattr(q, f) for f in _TENSOR_FIELDS))
        ctx.q = dataclasses.replace(q, **dict.fromkeys(_TENSOR_FIELDS))  # the metadata, no tensors
        return F.linear(x, _dequantize(q, x.dtype), bias)  # W dequantized straight to x's dtype, as bnb does

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q = dataclasses.replace(ctx.q, **dict(zip(_TENSOR_FIELDS, ctx.saved_tensors)))
        grad_x = grad_out @ _dequantize(q, grad_out.dtype)  # dL/dx = dL/dy W: (..., out) @ (out, in)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear with its weight in NF4. Build with from_linear, or construct (an all-zero weight,
    NF4Weight.empty: 4-bit sizes only, never a dense (out, in) matrix) and load a state dict: bitsandbytes
    Linear4bit keys, `weight` (packed uint8, as a column) and `weight.*`."""

    def __init__(self, in_features, out_features, bias=True, blocksize=64, double_quant=True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.qweight = NF4Weight.empty((out_features, in_features), dtype, blocksize, double_quant, device)
        b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_parameter("bias", b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        q = quantize_nf4(linear.weight, blocksize, double_quant)  # validates before any other work
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant, w.dtype, w.device
        )
        layer.qweight = q  # in place of the empty one, whose codes were never written
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def dtype(self) -> torch.dtype:  # the original weight's (bnb's compute_dtype): what dequantize() returns
        return self.qweight.dtype

    @property
    def device(self) -> torch.device:  # where the 4-bit tensors are, and where forward computes
        return self.qweight.packed.device

    def dequantize(self) -> Tensor:  # (out, in) in self.dtype
        return dequantize_nf4(self.qweight)

    def forward(self, x: Tensor) -> Tensor:  # computes in x's dtype
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return NF4LinearFunction.apply(x, bias, self.qweight)

    def extra_repr(self) -> str:
        q = self.qweight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={q.blocksize}, double_quant={q.nested}, compute_dtype={q.dtype}"
        )

    def _apply(self, fn, recurse=True):  # .to(device) moves the 4-bit weight; .half() must not round its absmax
        self.qweight = self.qweight.to(fn(torch.empty(0, device=self.device)).device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # keys and order as bnb's Linear4bit
        state = _to_bnb(self.qweight)
        destination[prefix + "weight"] = state.pop("weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        destination.update({prefix + k: v for k, v in state.items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        needed = ["weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
        needed += ["bias"] if self.bias is not None else []
        for key in sd:
            if key.startswith("weight.quant_state.bitsandbytes__") and key not in needed:
                raise ValueError(f"{prefix}{key}: quant_type {key.rsplit('__')[-1]!r}, NF4Linear reads only 'nf4'")
        if any(k not in sd for k in needed):
            missing.extend(prefix + k for k in needed if k not in sd)  # reported; nothing loaded
            return
        q = _from_bnb(sd, (self.out_features, self.in_features), prefix)  # pops the keys it reads
        if self.bias is not None:
            bias = sd.pop("bias")
            _expect(prefix + "bias", tuple(bias.shape), tuple(self.bias.shape))
            with torch.no_grad():
                self.bias.copy_(bias)
        self.qweight = q.to(self.device)
        unexpected.extend(prefix + k for k in sd)


# The bitsandbytes checkpoint format: QuantState.as_dict(packed=True) under "weight.", its non-tensor fields as
# JSON bytes in a uint8 tensor; "weight" itself is a column ((n+1)//2, 1).
def _to_bnb(q: NF4Weight) -> dict:
    state = {
        "weight": q.packed.view(-1, 1),
        "weight.absmax": q.absmax,
        "weight.quant_map": NF4_CODE.to(q.absmax.device, copy=True),  # no storage shared between layers
    }
    dtype = str(q.dtype).removeprefix("torch.")
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": dtype, "shape": list(q.shape)}
    if q.nested:
        state |= {"weight.nested_absmax": q.nested_absmax, "weight.nested_quant_map": q.nested_code}
        meta |= {"nested_blocksize": q.nested_blocksize, "nested_dtype": "float32", "nested_offset": q.offset.item()}
    state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return state


def _from_bnb(sd: dict, shape: tuple, prefix: str) -> NF4Weight:
    key = prefix + "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd.pop("weight.quant_state.bitsandbytes__nf4").tolist()))
    _expect(key + " quant_type", meta.get("quant_type"), "nf4")
    _expect(key + " shape", meta.get("shape"), list(shape))
    dtype, blocksize = getattr(torch, str(meta.get("dtype")), None), meta.get("blocksize")
    if dtype not in DTYPES or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"{key}: checkpoint has dtype {meta.get('dtype')} and blocksize {blocksize}, NF4Linear "
            f"reads float32/bfloat16/float16/float64 and blocksizes {', '.join(map(str, BLOCKSIZES))}"
        )
    n, nested = shape[0] * shape[1], "nested_offset" in meta
    n_blocks, packed, absmax = -(-n // blocksize), sd.pop("weight").reshape(-1), sd.pop("weight.absmax")
    _expect(prefix + "weight", (packed.numel(), packed.dtype), ((n + 1) // 2, torch.uint8))
    _expect(
        prefix + "weight.absmax", (absmax.numel(), absmax.dtype), (n_blocks, torch.uint8 if nested else torch.float32)
    )
    _expect(prefix + "weight.quant_map", sd.pop("weight.quant_map").tolist(), NF4_CODE.tolist())
    q = NF4Weight(packed, absmax, torch.Size(shape), dtype, blocksize)
    if nested:
        q.offset = torch.tensor(meta["nested_offset"], dtype=torch.float32)
        q.nested_absmax, q.nested_code = sd.pop("weight.nested_absmax", None), sd.pop("weight.nested_quant_map", None)
        _expect(key + " nested_blocksize", meta.get("nested_blocksize"), NESTED_BLOCKSIZE)
        n_nested = None if q.nested_absmax is None else q.nested_absmax.numel()
        _expect(prefix + "weight.nested_absmax", n_nested, -(-n_blocks // NESTED_BLOCKSIZE))
        code = None if q.nested_code is None else q.nested_code.tolist()
        _expect(prefix + "weight.nested_quant_map", code, DYNAMIC_MAP.tolist())
    return q


def _expect(key: str, got, want) -> None:
    if got != want:
        raise ValueError(f"{key}: checkpoint has {got}, this NF4Linear needs {want}")


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True, skip_modules=("lm_head",)):
    """Replace, in place, every nn.Linear whose name (full, or last component) is not in skip_modules by an
    NF4Linear and return the model. A bare nn.Linear is returned as a new NF4Linear. A Linear whose weight is
    tied to another module (an embedding) is quantized alone: the tie is broken, so skip it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules):
        raise TypeError(f"skip_modules must be a tuple of module names, e.g. ('lm_head',), got {skip_modules!r}")
    if isinstance(model, nn.Linear):
        return NF4Linear.from_linear(model, blocksize, double_quant)
    skipped = lambda name: name in skip_modules or name.rsplit(".", 1)[-1] in skip_modules  # noqa: E731
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(name)]
    for _, linear in targets:
        if not linear.weight.is_meta:
            _check_weight(linear.weight)  # every weight checked before the first one is replaced
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _quantized(linear, blocksize, double_quant))
    return model


def _quantized(linear, blocksize, double_quant):
    """The NF4Linear of `linear`; of a Linear on the meta device (a structure without values), an empty one there:
    the 4-bit sizes alone, as a loader's placeholder (distributed.py builds the other ranks' models so)."""
    if not linear.weight.is_meta:
        return NF4Linear.from_linear(linear, blocksize, double_quant)
    kw = dict(bias=linear.bias is not None, dtype=linear.weight.dtype, device="meta")
    return NF4Linear(linear.in_features, linear.out_features, blocksize=blocksize, double_quant=double_quant, **kw)


def memory_report(model: nn.Module) -> dict:
    """Bytes held by a (partly) quantized model, by category:
    code_bytes   the packed 4-bit codes of every NF4Linear
    stats_bytes  absmax (float32, or uint8 when double-quantized) plus offset and nested_absmax
    table_bytes  the code tables a checkpoint stores per layer: quant_map 16 x float32, nested 256 x float32
    other_bytes  every parameter and buffer, at its own dtype (biases, norms, embeddings, skipped Linears)
    bits_per_param = 8 * (codes + absmax + nested_absmax) / quantized weights: the per-block cost,
    4 + 8/64 + 32/(64*256) = 4.127 nested, 4 + 32/64 = 4.5 not. Per-layer constants (offset, tables) excluded."""
    report = dict.fromkeys(["quantized_params", "code_bytes", "stats_bytes", "table_bytes", "other_bytes"], 0)
    per_block_bytes = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            q = module.qweight
            stats = [q.absmax, q.nested_absmax] if q.nested else [q.absmax]
            report["quantized_params"] += q.shape.numel()
            report["code_bytes"] += _nbytes(q.packed)
            report["stats_bytes"] += sum(map(_nbytes, stats)) + (_nbytes(q.offset) if q.nested else 0)
            report["table_bytes"] += _nbytes(NF4_CODE) + (_nbytes(q.nested_code) if q.nested else 0)
            per_block_bytes += _nbytes(q.packed) + sum(map(_nbytes, stats))
    report["other_bytes"] = sum(map(_nbytes, chain(model.parameters(), model.buffers())))
    report["total_bytes"] = sum(v for k, v in report.items() if k.endswith("_bytes"))
    report["bits_per_param"] = 8 * per_block_bytes / max(report["quantized_params"], 1)
    return report


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def quantization_error(w: Tensor, blocksizes=BLOCKSIZES) -> dict:
    """Mean squared error of w after a round trip through four 4-bit formats, per blocksize:
    {"nf4" | "fp4" | "int4_symmetric" | "int4_affine": {blocksize: mse}}. nf4 and fp4 scale by the block absmax
    and take the nearest level; int4_symmetric rounds w / (absmax/7) to -7..7; int4_affine rounds
    (w - min) / ((max - min)/15) to 0..15 per block."""
    _check_weight(w)
    for bs in blocksizes:
        _check_blocksize(bs)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    codes = {"nf4": NF4_CODE, "fp4": FP4_CODE.sort().values}
    result = {name: {} for name in ["nf4", "fp4", "int4_symmetric", "int4_affine"]}
    for bs in blocksizes:
        # pad by repeating the last value: each block's min, max and absmax stay those of its real values
        blocks = torch.cat([flat, flat[-1].expand(-n % bs)]).view(-1, bs)  # (n_blocks, bs)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
        estimates = {
            name: code[torch.bucketize(blocks / absmax, _midpoints(code))] * absmax for name, code in codes.items()
        }
        estimates["int4_symmetric"] = (blocks / (absmax / 7)).round().clamp(-7, 7) * (absmax / 7)
        step = ((hi - lo) / 15).clamp(min=1e-30)
        estimates["int4_affine"] = ((blocks - lo) / step).round().clamp(0, 15) * step + lo
        for name, w_hat in estimates.items():
            result[name][bs] = ((w_hat - blocks).reshape(-1)[:n] ** 2).mean().item()
    return result
