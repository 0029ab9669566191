"""minipeft.nf4 against independent references: bitsandbytes on CPU (bytes, statistics, dequantized values,
Linear4bit state dicts and outputs), autograd gradcheck, and hand math."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minipeft import nf4
from minipeft.nf4 import (
    BLOCKSIZES,
    DYNAMIC_MAP,
    FP4_CODE,
    NF4_CODE,
    NF4Linear,
    NF4LinearFunction,
    NF4Weight,
    create_dynamic_map,
    create_normal_map,
    dequantize_nf4,
    memory_report,
    quantization_error,
    quantize_model,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The NF4 table as published in bitsandbytes (functional.get_4bit_type) and the QLoRA paper's appendix.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@pytest.fixture(autouse=True, scope="module")
def _no_dynamo():
    # bnb's portable dequantize kernel (used for odd shapes) is wrapped in torch.compile; compiling it for every
    # new shape costs ~1 s each. Eager mode computes the same values.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(w, blocksize, double_quant):
    return BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantize_flat(packed, state):
    # bnb 0.50.2's AVX-512 CPU dequantize kernel indexes absmax per row (row * in/blocksize + col/blocksize), which
    # is wrong when blocks straddle rows (in % blocksize != 0 and in % 16 == 0). Dequantizing the same bytes as one
    # flat row is correct for every shape, so compare against that.
    shape, state.shape = state.shape, torch.Size([state.shape.numel()])
    try:
        return BF.dequantize_4bit(packed, state).reshape(shape)
    finally:
        state.shape = shape


def rounded_away_at_ties(ours, ref, exact):
    """Where bnb's float16 differs from ours by its CUDA library's rounding. On a machine with a GPU bnb loads that
    library, whose CPU functions are built without F16C: its float16 conversion there (csrc/cpu_ops.h float_to_fp16,
    mantissa + 0x1000) rounds a product exactly halfway between two float16 values away from zero, where ours rounds
    to nearest even (as torch, bnb's CPU library and its CUDA kernels do). exact: the float32 products code * absmax
    that ours rounds. True where exact is such a tie, ours the even neighbour and ref the one away from zero."""
    if ours.dtype != torch.float16:
        return torch.zeros_like(ours, dtype=torch.bool)
    midpoint = exact == (ours.float() + ref.float()) / 2  # (of two neighbouring float16 values: exact in float32)
    return midpoint & ((ours.view(torch.int16) & 1) == 0) & (ref.abs() > ours.abs())


def same_up_to_flushed_subnormals(ours, ref, exact):
    """Bit-equal, except that bnb's vectorised CPU kernel (on some paths) flushes subnormal results to zero,
    where we keep the exact float32 product: e.g. bf16 weights of ~1e-39 in a partial block (found by hypothesis).
    Only values below the smallest normal number may differ, and only as ref == 0 (and float16 ties on a machine
    with a GPU: rounded_away_at_ties)."""
    differ = ours != ref
    tiny = torch.finfo(ours.dtype).tiny
    return bool((((ref == 0) & (ours.abs() < tiny)) | rounded_away_at_ties(ours, ref, exact))[differ].all())


def assert_same_as_bnb(w, blocksize, double_quant):
    packed, state = bnb_quantize(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize, double_quant)
    assert packed.shape == ((w.numel() + 1) // 2, 1) and q.packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    assert q.nested == double_quant
    if double_quant:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code) and state.state2.blocksize == q.nested_blocksize
    w_hat = dequantize_nf4(q)
    assert w_hat.dtype == w.dtype and w_hat.shape == w.shape
    exact = nf4._dequantize(q, torch.float32)  # the float32 products that w_hat rounds
    assert same_up_to_flushed_subnormals(w_hat, bnb_dequantize_flat(packed, state), exact)
    if w.dim() == 2 and w.shape[1] % blocksize == 0:  # blocks within rows: bnb's 2-D kernel is right too
        ref = BF.dequantize_4bit(packed, state)
        assert bool(rounded_away_at_ties(w_hat, ref, exact)[w_hat != ref].all())  # (equal on a machine without GPU)
    return q


# ---- the code tables ----------------------------------------------------------------------------------------


def test_nf4_code_equals_bnb_and_published_table():
    assert torch.equal(NF4_CODE, torch.tensor(PUBLISHED_NF4))
    assert torch.equal(create_normal_map(), BF.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[7] == 0 and NF4_CODE[15] == 1 and NF4_CODE[0] == -1
    assert (NF4_CODE[1:] > NF4_CODE[:-1]).all()
    # the offset is the average of 1 - 1/(2k) for k = 15 and 16 levels
    assert abs(((1 - 1 / 30) + (1 - 1 / 32)) / 2 - 0.9677083) < 1e-7


def test_dynamic_and_fp4_maps_equal_bnb():
    assert torch.equal(create_dynamic_map(), BF.create_dynamic_map(signed=True))
    assert torch.equal(DYNAMIC_MAP, BF.create_dynamic_map(signed=True))
    assert DYNAMIC_MAP.unique().numel() == 256 and DYNAMIC_MAP[127] == 0 and DYNAMIC_MAP[255] == 1
    assert torch.equal(FP4_CODE, BF.get_4bit_type("fp4", device="cpu"))


# ---- quantize / dequantize against bitsandbytes ----------------------------------------------------------------


@settings(max_examples=40, deadline=None, database=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    double_quant=st.booleans(),
    kind=st.sampled_from(["normal", "student_t", "zero_blocks", "tiny", "subnormal"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_bnb(rows, cols, blocksize, dtype, double_quant, kind, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if kind == "student_t":
        w = w / torch.rand(rows, cols, generator=g).clamp(min=0.01) ** 0.5
    if kind == "zero_blocks":
        w.view(-1)[: blocksize * 2] = 0
        w.view(-1)[-3:] = 0
    if kind == "tiny":
        w = w * 1e-3
    if kind == "subnormal":  # absmax below the 1e-38 clamp: bnb scales by 1/1e-38, so no value reaches +-1
        w = w * 1e-39
    assert_same_as_bnb(w.to(dtype), blocksize, double_quant)


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 256 * 64 + 1, 300 * 64 - 7])
@pytest.mark.parametrize("double_quant", [False, True])
def test_ragged_sizes_match_bnb(n, double_quant):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert_same_as_bnb(w, 64, double_quant)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_like_heavy_tailed_weights_match_bnb(blocksize, dtype):
    # student-t (3 degrees of freedom) weights: heavy tails like trained LLM weights, outliers in many blocks
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((96, 4096 // 32 * 3)) * 0.02
    for double_quant in (False, True):
        assert_same_as_bnb(w.to(dtype), blocksize, double_quant)


def test_ties_go_to_the_lower_code():
    # absmax 2 (a power of two: 1/absmax and the products are exact), the other values exactly on midpoints
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    for w in (torch.cat([torch.tensor([2.0]), 2 * mid]), torch.cat([torch.tensor([-2.0]), 2 * mid])):
        w = torch.cat([w, w[:1].expand(64 - w.numel()), w])  # one full block, then the same values in a partial one
        q = assert_same_as_bnb(w, 64, False)
        codes = torch.stack([q.packed >> 4, q.packed & 15], -1).reshape(-1)
        assert codes[1:16].tolist() == list(range(15)), "a midpoint must go to the lower of its two codes"
        assert codes[65:80].tolist() == list(range(15))


def test_partial_last_block_divides_where_full_blocks_multiply():
    # a pair found by search: x * (1/a) and x / a differ by one ulp across NF4's midpoint between codes 1 and 2
    a, x = torch.tensor(1.996918797492981), torch.tensor(-1.2193843126296997)
    mid = (NF4_CODE[1] + NF4_CODE[2]) / 2
    assert x * (1.0 / a) > mid >= x / a
    w = torch.zeros(66)
    w[[0, 1, 64, 65]] = torch.stack([a, x, a, x])
    q = assert_same_as_bnb(w, 64, False)
    assert q.packed[0] == 0xF2 and q.packed[32] == 0xF1  # same numbers, code 2 in a full block, 1 in the tail


def test_all_zero_blocks_and_all_zero_tensor():
    w = torch.randn(8, 64)
    w[2] = 0  # an all-zero block in the middle
    for dq in (False, True):
        q = assert_same_as_bnb(w, 64, dq)
        assert (q.packed[64:96] == 0x77).all() and (dequantize_nf4(q)[2] == 0).all()  # code 7 is exactly 0
    q = assert_same_as_bnb(torch.zeros(5, 64), 64, True)  # absmax 0 everywhere: offset 0, nested absmax 0
    assert q.offset == 0 and (q.absmax == 0).all() and (dequantize_nf4(q) == 0).all()


def test_packing_by_hand():
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.5, 0.0, -0.25]), 64, double_quant=False)
    # codes: 1 -> 15, -1 -> 0, 0.5 -> 12 (0.4407 is 0.059 away, 0.5626 0.063), 0 -> 7, -0.25 -> 4 (-0.2844),
    # padding 0.0 -> 7
    assert q.packed.tolist() == [0xF0, 0xC7, 0x47]
    assert q.absmax.tolist() == [1.0]
    assert dequantize_nf4(q).tolist() == [1.0, -1.0, NF4_CODE[12].item(), 0.0, NF4_CODE[4].item()]


def test_dequantize_keeps_shape_and_dtype_float64_too():
    w = torch.randn(3, 4, 40, dtype=torch.float64)
    q = quantize_nf4(w, 32)
    w_hat = dequantize_nf4(q)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float64
    assert torch.equal(w_hat, dequantize_nf4(quantize_nf4(w.float(), 32)).double())  # float64 quantizes as float32


# ---- NF4Linear against bnb.nn.Linear4bit --------------------------------------------------------------------


def bnb_linear(dense, double_quant, dtype):
    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        dense.bias is not None,
        compress_statistics=double_quant,
        quant_type="nf4",
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to(dtype).to("cpu")  # bnb quantizes when its Params4bit first moves to a device (CPU here)


def bnb_linear_from_state_dict(sd, in_features, out_features):
    layer = bnb.nn.Linear4bit(in_features, out_features, "bias" in sd, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"].clone())
    return layer


# bnb layers stay in training mode: in eval mode with a no-grad input, bnb on an AVX512-BF16 CPU repacks the
# weight for a fused bf16 kernel whose results are rounded differently. Training mode runs dequantize + F.linear.
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features,out_features,bias", [(256, 40, True), (128, 24, False), (7, 5, True)])
def test_state_dict_crosses_with_bnb_linear4bit(double_quant, dtype, in_features, out_features, bias):
    torch.manual_seed(in_features)
    dense = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    ours = NF4Linear.from_linear(dense, blocksize=64, double_quant=double_quant)
    theirs = bnb_linear(dense, double_quant, dtype)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)  # same keys, same order
    for key in sd_theirs:
        a, b = sd_ours[key], sd_theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
    x = torch.randn(3, 2, in_features, dtype=dtype)
    y = theirs(x)
    assert torch.equal(ours(x), y)

    loaded = NF4Linear(in_features, out_features, bias=bias, dtype=dtype)  # placeholder, then bnb's state dict
    assert not torch.equal(loaded(x), y)
    loaded.load_state_dict(sd_theirs)
    assert torch.equal(loaded(x), y)
    assert loaded.dtype == dtype and loaded.qweight.nested == double_quant

    back = bnb_linear_from_state_dict(sd_ours, in_features, out_features)
    assert torch.equal(back(x), ours(x))


def test_state_dict_json_is_bnb_as_dict_packed():
    dense = nn.Linear(64, 8)
    sd = NF4Linear.from_linear(dense).state_dict()
    _, state = bnb_quantize(dense.weight.detach(), 64, True)
    expected = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert torch.equal(sd["weight.quant_state.bitsandbytes__nf4"], expected)
    meta = json.loads(bytes(expected.tolist()))
    assert meta["shape"] == [8, 64] and meta["dtype"] == "float32" and meta["nested_blocksize"] == 256


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor that an op (factories included) creates inside the block."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("double_quant", [True, False])
def test_empty_layer_has_only_4bit_sizes_and_from_linear_quantizes_once(double_quant, monkeypatch):
    """The placeholder a checkpoint loads into is W = 0 without a dense (out, in) tensor ever made: no op creates
    more elements than the packed codes hold (quantizing a zero matrix, as before, made out * in). It states its
    dtype and device without dequantizing. from_linear quantizes once."""
    with LargestTensor() as mode:
        layer = NF4Linear(1024, 48, blocksize=64, double_quant=double_quant, dtype=torch.bfloat16)
    assert mode.largest == 1024 * 48 // 2 and layer.qweight.packed.numel() == 1024 * 48 // 2
    assert layer.dtype == torch.bfloat16 and layer.device == torch.device("cpu")
    assert layer.qweight.nested == double_quant
    assert torch.equal(layer.dequantize(), torch.zeros(48, 1024, dtype=torch.bfloat16))  # absmax 0: any codes give 0
    assert NF4Linear(7, 5, device="meta").device == torch.device("meta")
    calls = []
    monkeypatch.setattr(nf4, "quantize_nf4", lambda *args: calls.append(args) or quantize_nf4(*args))
    layer = NF4Linear.from_linear(nn.Linear(64, 8).to(torch.float16), double_quant=double_quant)
    assert len(calls) == 1 and layer.dtype == torch.float16 and layer.qweight.nested == double_quant


def test_load_rejects_wrong_shape_and_fp4():
    sd = NF4Linear.from_linear(nn.Linear(256, 40)).state_dict()
    with pytest.raises(
        ValueError, match=r"bitsandbytes__nf4 shape: checkpoint has \[40, 256\], this NF4Linear needs \[40, 128\]"
    ):
        NF4Linear(128, 40).load_state_dict(sd)
    bad_bias = dict(sd, bias=torch.zeros(41))
    with pytest.raises(ValueError, match=r"bias: checkpoint has \(41,\), this NF4Linear needs \(40,\)"):
        NF4Linear(256, 40).load_state_dict(bad_bias)
    fp4 = bnb.nn.Linear4bit(256, 40, quant_type="fp4").to("cpu").state_dict()
    with pytest.raises(ValueError, match=r"weight.quant_state.bitsandbytes__fp4: quant_type 'fp4'"):
        NF4Linear(256, 40).load_state_dict(fp4)
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist())) | {"quant_type": "fp4"}
    relabelled = dict(
        sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
    )
    with pytest.raises(ValueError, match=r"bitsandbytes__nf4 quant_type: checkpoint has fp4, this NF4Linear needs nf4"):
        NF4Linear(256, 40).load_state_dict(relabelled)
    layer = NF4Linear(256, 40)
    before = layer.dequantize()
    result = layer.load_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"}, strict=False)
    assert result.missing_keys == ["weight.absmax"] and torch.equal(layer.dequantize(), before)  # reported, not loaded


# ---- autograd -------------------------------------------------------------------------------------------------


def test_gradcheck_float64():
    q = quantize_nf4(torch.randn(6, 40), blocksize=32)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: NF4LinearFunction.apply(x, b, q), (x, b))
    assert torch.autograd.gradcheck(lambda x: NF4LinearFunction.apply(x, None, q), (x,))


def test_input_gradient_equals_dense_layer_on_dequantized_weight():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 32))
    assert [p for p in layer.parameters() if p.requires_grad] == []  # frozen: nothing to train
    x = torch.randn(4, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 5, 32)
    (layer(x) * g).sum().backward()
    (nn.functional.linear(x_ref, layer.dequantize(), layer.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def saved_tensors(fn, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x).sum().backward()
    return saved


def test_no_dense_weight_kept_between_forward_and_backward():
    out_f, in_f = 64, 256
    dense = nn.Linear(in_f, out_f)
    layer = NF4Linear.from_linear(dense)
    saved = saved_tensors(layer, torch.randn(8, in_f, requires_grad=True))
    assert any(t.dtype == torch.uint8 and t.numel() == out_f * in_f // 2 for t in saved)  # the packed weight
    assert all(t.numel() < out_f * in_f // 2 or t.dtype == torch.uint8 for t in saved), [
        (t.dtype, t.shape) for t in saved
    ]
    # the check can fail: a frozen dense layer saves its (out, in) weight to compute the input gradient
    dense.requires_grad_(False)
    saved_dense = saved_tensors(dense, torch.randn(8, in_f, requires_grad=True))
    assert any(t.is_floating_point() and t.numel() == out_f * in_f for t in saved_dense)


def test_to_dtype_keeps_float32_statistics():
    layer = NF4Linear.from_linear(nn.Linear(64, 16))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.qweight.absmax.dtype == torch.uint8 and layer.qweight.nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.dequantize(), before)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- quantize_model and memory_report ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=False)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x):
        return x + self.mlp(self.q_proj(x))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 100)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_model_replaces_linears_and_matches_dequantized_dense(double_quant):
    torch.manual_seed(0)
    model = Toy()
    reference = Toy()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 7, 64)
    y_dense = model(x)
    assert quantize_model(model, blocksize=64, double_quant=double_quant) is model
    names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert names == {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "mlp.0", "mlp.2")}
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():  # hand-made reference: every replaced weight set to dequantize(quantize(W))
        for name in names:
            linear = reference.get_submodule(name)
            linear.weight.copy_(dequantize_nf4(quantize_nf4(linear.weight, 64, double_quant)))
    y = model(x)
    assert torch.equal(y, reference(x))
    assert (y - y_dense).norm() / y_dense.norm() < 0.2  # and close to the unquantized model


def test_quantized_model_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(Toy())
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # no shared storage between tensors
    other = quantize_model(Toy())
    x = torch.randn(2, 3, 64)
    assert not torch.equal(other(x), model(x))
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(other(x), model(x))


def test_quantize_model_skips_by_full_name_and_bare_linear():
    model = quantize_model(Toy(), skip_modules=("lm_head", "layers.0.q_proj"))
    assert type(model.layers[0].q_proj) is nn.Linear and isinstance(model.layers[1].q_proj, NF4Linear)
    assert isinstance(quantize_model(nn.Linear(64, 8)), NF4Linear)


def test_memory_report_bits_per_parameter():
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.LayerNorm(256))
    dense_other = 2 * 256 * 4  # LayerNorm weight and bias in float32
    nested = memory_report(quantize_model(model, double_quant=True))
    assert abs(nested["bits_per_param"] - 4.127) < 1e-3
    assert nested["bits_per_param"] == 4 + 8 / 64 + 32 / (64 * 256)
    assert nested["quantized_params"] == 256 * 256 and nested["code_bytes"] == 256 * 256 // 2
    assert nested["stats_bytes"] == 1024 * 1 + 4 * 4 + 4  # uint8 absmax per block, 4 nested absmax, the offset
    assert nested["table_bytes"] == 16 * 4 + 256 * 4 and nested["other_bytes"] == dense_other
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.LayerNorm(256))
    plain = memory_report(quantize_model(model, double_quant=False))
    assert plain["bits_per_param"] == 4.5 and plain["stats_bytes"] == 1024 * 4 and plain["table_bytes"] == 64
    assert plain["total_bytes"] == 256 * 256 // 2 + 1024 * 4 + 64 + dense_other


# ---- quantization_error -------------------------------------------------------------------------------------


def test_quantization_error_against_bnb_and_hand_math():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    err = quantization_error(w)
    assert set(err) == {"nf4", "fp4", "int4_symmetric", "int4_affine"} and list(err["nf4"]) == list(BLOCKSIZES)
    assert err["nf4"][64] < err["int4_symmetric"][64]
    for name in err:
        assert all(a < b for a, b in zip(list(err[name].values()), list(err[name].values())[1:])), name
    for bs in (64, 1024):  # nf4 and fp4 against bitsandbytes' own round trip
        for quant_type in ("nf4", "fp4"):
            packed, state = BF.quantize_4bit(w, blocksize=bs, quant_type=quant_type)
            mse = ((bnb_dequantize_flat(packed, state) - w) ** 2).mean().item()
            assert err[quant_type][bs] == pytest.approx(mse, rel=1e-6)
    blocks = w.reshape(-1, 32)  # int4 by hand, one block at a time
    sym = aff = 0.0
    for block in blocks[:64]:
        scale = block.abs().max().item() / 7
        sym += sum((v - max(-7, min(7, round(v / scale))) * scale) ** 2 for v in block.tolist())
        lo, step = block.min().item(), (block.max() - block.min()).item() / 15
        aff += sum((v - (max(0, min(15, round((v - lo) / step))) * step + lo)) ** 2 for v in block.tolist())
    err_head = quantization_error(w.reshape(-1)[: 64 * 32], blocksizes=(32,))
    assert err_head["int4_symmetric"][32] == pytest.approx(sym / (64 * 32), rel=1e-5)
    assert err_head["int4_affine"][32] == pytest.approx(aff / (64 * 32), rel=1e-5)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"blocksize 100 is not supported; use one of 32, 64, .*4096"):
        quantize_nf4(w, blocksize=100)
    with pytest.raises(ValueError, match=r"blocksize 16 is not supported"):
        quantization_error(w, blocksizes=(64, 16))
    bad = w.clone()
    bad[1, 2], bad[3, 0], bad[3, 1] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"3 non-finite values \(NaN or inf\); the first at index \(1, 2\)"):
        quantize_nf4(bad)
    with pytest.raises(TypeError, match=r"float32, bfloat16, float16 or float64 tensors, got torch.int64"):
        quantize_nf4(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"empty tensor \(shape \(0, 8\)\)"):
        quantize_nf4(torch.empty(0, 8))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match=r"skip_modules must be a tuple of module names"):
        quantize_model(Toy(), skip_modules="lm_head")


def test_quantize_model_validates_everything_before_replacing():
    model = Toy()
    with pytest.raises(ValueError, match="blocksize 48 is not supported"):
        quantize_model(model, blocksize=48)
    with torch.no_grad():
        model.layers[1].mlp[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite values"):
        quantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # nothing was replaced


def test_nf4weight_fields():
    q = quantize_nf4(torch.randn(10, 64 * 300))
    assert isinstance(q, NF4Weight) and q.quant_type == "nf4" and q.blocksize == 64 and q.nested_blocksize == 256
    assert q.absmax.shape == (300 * 10,) and q.nested_absmax.shape == (-(-3000 // 256),)
    assert q.offset.dtype == torch.float32 and q.offset.shape == () and q.shape == (10, 64 * 300)
