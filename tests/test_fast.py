"""fast.py against the reference path: every lever trains every method to the same losses, gradients and weights,
and reset() gives the plain model back. In float64: AdamW divides each update by the gradient's own size, so a
rounding difference of float32 (a reordered sum, 1e-7) in a near-zero gradient moves a weight by up to lr; in
float64 what is left is 1e-15, and a real difference (a wrong lever) still shows at once."""

import pytest
import torch
from helpers import tiny_config

import minipeft.fast as fast
import minipeft.fast_mlp as fast_mlp
import minipeft.fast_nf4 as fast_nf4
from minipeft import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from minipeft.model import Transformer
from minipeft.nf4 import quantize_model
from minipeft.train import TrainConfig, train

METHODS = {
    "lora": lambda: LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, use_dora=True, init_lora_weights=False),
    "qlora": lambda: LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "adapter": lambda: AdapterConfig(bottleneck_size=8, init_weights=False),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "full": lambda: None,
}


@pytest.fixture(scope="module")
def data():
    from minipeft.data import Dataset

    g = torch.Generator().manual_seed(0)
    blocks = list(torch.randint(0, 97, (24, 16), generator=g))
    return Dataset(blocks, blocks), Dataset(blocks[:4], blocks[:4])


def build(method):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False)).double()
    if method == "qlora":
        model = quantize_model(model, blocksize=64)
    config = METHODS[method]()
    return model if config is None else get_peft_model(model, config)


def run(method, data, **levers):
    model = build(method)
    if checkpoint := levers.pop("checkpoint", False):
        fast.checkpoint_blocks(model, offload=checkpoint == "offload")
    if backend := levers.pop("backend", None):
        fast.compile_blocks(model, backend=backend)
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=4, log_every=1, progress=False, **levers)
    m = train(model, *data, cfg)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return [e["loss"] for e in m["train"]], [e["grad_norm"] for e in m["train"]], weights, model


@pytest.mark.parametrize("method", list(METHODS))
def test_every_lever_trains_every_method_like_the_reference(data, method):
    """The reference: chunked_loss=False, nothing compiled or checkpointed. Against it, the levers together (the
    chunked loss, checkpointed blocks, compiled blocks with aot_eager: dynamo and AOT autograd without code
    generation, quick on a CPU), and the optimizer stepped in backward (no clipping there, nor in its reference)."""
    torch._dynamo.reset()
    ref = run(method, data, chunked_loss=False)
    losses, norms, weights, model = run(method, data, checkpoint=True, backend="aot_eager")
    base = getattr(model, "base_model", model)
    assert fast.blocks(model)[0]._fast["compiled"] is not None and base.hidden_loss.func is fast._chunked_hidden_loss
    assert losses == pytest.approx(ref[0], rel=1e-12)
    assert norms == pytest.approx(ref[1], rel=1e-10)
    for n, w in ref[2].items():
        assert torch.allclose(weights[n], w, rtol=1e-9, atol=1e-12), (n, (weights[n] - w).abs().max())
    plain = run(method, data, chunked_loss=False, max_grad_norm=None)
    in_backward = run(method, data, optimizer_in_backward=True, max_grad_norm=None)
    assert in_backward[0] == pytest.approx(plain[0], rel=1e-12)
    for n, w in plain[2].items():
        assert torch.allclose(in_backward[2][n], w, rtol=1e-9, atol=1e-12), (n, (in_backward[2][n] - w).abs().max())


def test_offloaded_checkpoint_keeps_each_block_input_on_the_host_and_changes_nothing(data, monkeypatch):
    """checkpoint_blocks(offload=True): the tensor each checkpointed Block saves (its input) goes to the host in
    forward (fast._to_host, once per Block and micro-batch) and comes back for the recompute in backward; the run
    equals the reference exactly (float64: loss, gradient norm and weights)."""
    ref = run("lora", data, chunked_loss=False)
    moved, back = [], []
    to_host, to_device = fast._to_host, fast._to_device
    monkeypatch.setattr(fast, "_to_host", lambda t: moved.append(tuple(t.shape)) or to_host(t))
    monkeypatch.setattr(fast, "_to_device", lambda packed: back.append(packed[1].shape) or to_device(packed))
    losses, norms, weights, model = run("lora", data, checkpoint="offload")
    layers, steps, hidden = len(fast.blocks(model)), 3, (4, 16, model.config.hidden_size)  # 3 steps of 4 rows x 16
    assert moved.count(hidden) == layers * steps and len(back) == len(moved)
    assert model.base_model.gradient_checkpointing
    assert losses == pytest.approx(ref[0], rel=1e-12) and norms == pytest.approx(ref[1], rel=1e-10)
    for n, w in ref[2].items():
        assert torch.allclose(weights[n], w, rtol=1e-9, atol=1e-12), (n, (weights[n] - w).abs().max())


def test_a_checkpointed_cpu_block_survives_cuda_starting_inside_it(monkeypatch):
    """On a machine with a GPU, the first compile of a CPU model starts CUDA inside the checkpointed forward, and
    torch.utils.checkpoint raised (it had kept the default device type's random state, "cuda"; tests/test_fast.py
    on an H200 failed so). Started here by hand: the checkpointed Blocks keep the CPU's random state instead, so
    LoRA dropout's masks repeat in the recompute and the gradients equal the plain model's."""
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(vocab_size=97, max_position_embeddings=32)).double()
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False)).train()
        fast.checkpoint_blocks(model, enabled=checkpoint)
        monkeypatch.setattr(torch.cuda, "_initialized", False)
        monkeypatch.setattr(torch.utils.checkpoint.DefaultDeviceType, "_default_device_type", "cuda")  # a GPU's
        start = lambda *_: setattr(torch.cuda, "_initialized", True)  # noqa: E731  (what the compile does)
        fast.blocks(model)[0].self_attn.register_forward_pre_hook(start)
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        monkeypatch.undo()  # CUDA's real state again (seeding a GPU that was only said to be started fails)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-12, atol=1e-14, msg=n)


def test_checkpointed_blocks_keep_no_keys_or_values_while_the_loss_runs():
    """With use_cache=False no layer's keys and values outlive its Block: under checkpointing nothing of a Block
    stays but its input, so when the loss runs (the forward's highest point) no (B, K, T, hd) tensor is alive.
    (The forward kept every layer's k and v in a list it then dropped: 2 GiB of a 7B QLoRA step at 4,096 tokens.)"""
    import gc

    model = build("qlora")
    fast.checkpoint_blocks(fast.chunked_loss(model))
    cfg = model.base_model.config
    kv_shape = (2, cfg.num_key_value_heads, 10, cfg.head_dim)
    alive = []

    def count_then_loss(*args, real=model.base_model.hidden_loss):
        gc.collect()
        alive.append(sum(isinstance(o, torch.Tensor) and tuple(o.shape) == kv_shape for o in gc.get_objects()))
        return real(*args)

    model.base_model.hidden_loss = count_then_loss
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids, return_logits=False).loss.backward()
    assert alive == [0]
    out = model(ids, use_cache=True)  # asked for: every layer's (k, v)
    assert len(out.past_key_values) == cfg.num_hidden_layers and out.past_key_values[0][0].shape == kv_shape


def test_a_smaller_loss_chunk_gives_the_same_loss_and_gradients():
    model = build("full")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for chunk in (None, 3):
        fast.chunked_loss(model, chunk=chunk)
        model.zero_grad()
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        grads.append(
            (loss.detach(), model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_optimizer_in_backward_leaks_nothing_when_its_hooks_are_never_removed():
    """step_in_backward's hooks live on the parameters (in C++, out of sight of Python's collector): the model
    and the optimizer must still be freed once the caller drops them (a strong reference in the hook kept 7 GB of
    a 1B model's weights and state alive in a benchmark process)."""
    import gc
    import weakref

    model = build("full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fast.step_in_backward(optimizer)  # the handles dropped, never removed
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    before = model.lm_head.weight.detach().clone()
    model(ids, labels=ids).loss.backward()
    assert not torch.equal(model.lm_head.weight, before) and model.lm_head.weight.grad is None  # stepped in backward
    refs = weakref.ref(model.lm_head.weight), weakref.ref(optimizer)
    del model, optimizer
    gc.collect()
    assert all(r() is None for r in refs)


def test_reset_takes_every_lever_off(data):
    model = build("lora")
    fast.checkpoint_blocks(fast.compile_blocks(fast.chunked_loss(model), backend="eager"))
    assert model.base_model.gradient_checkpointing
    fast.reset(model)
    assert not model.base_model.gradient_checkpointing
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "_fast", "hidden_loss"))
    keys = set(build("lora").state_dict())
    assert set(model.state_dict()) == keys  # the levers never touched the state_dict's keys


def test_the_reference_loss_with_no_logits_asked_equals_the_logits_path():
    model = build("full")
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = model(ids, labels=ids).loss
    assert model(ids, labels=ids, return_logits=False).logits is None
    torch.testing.assert_close(model(ids, labels=ids, return_logits=False).loss, plain, rtol=0, atol=0)
    torch.testing.assert_close(fast.chunked_loss(model)(ids, labels=ids, return_logits=False).loss, plain)


def test_compiled_4bit_blocks_compile_once_for_every_layer():
    """compile_blocks on a QLoRA model deeper than dynamo's recompile limit (8): the 4-bit layers' forward is one
    function for every layer, so no Block recompiles (a per-layer callable made each one recompile, and past 8
    layers the rest silently ran eager: 135M QLoRA with CUDA graphs fell from 132k to 18k tokens/s on an H200)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=3))
    model = get_peft_model(quantize_model(model, blocksize=64), LoraConfig(r=4, target_modules="all-linear"))
    fast.compile_blocks(model).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    # 3 layers: a variant per layer would be 3; past the limit dynamo raises instead of falling back to eager
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        model(input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()


def test_checkpointed_compiled_4bit_layers_run_as_one_opaque_op():
    """In a checkpointed Block, compile sees each 4-bit layer as one op (fast.nf4_matmul: W dequantized inside,
    one dense W alive at a time); the op equals x W^T with W = dequantize_nf4 and its gradient x's, and its
    registration passes torch.library.opcheck (fake shapes, schema; its gradient comes from an autograd.Function
    around it, checked here against g W)."""
    from minipeft.nf4 import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(24, 128, dtype=torch.float64), blocksize=64)
    x = torch.randn(2, 3, 128, dtype=torch.float64, requires_grad=True)
    args = (q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code, 24, 128, 64, q.nested_blocksize)
    y = fast.nf4_matmul(x, *args, False)
    w = dequantize_nf4(q).to(torch.float64)
    torch.testing.assert_close(y, x @ w.T, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, g @ w, rtol=0, atol=1e-12)
    torch.library.opcheck(torch.ops.minipeft.nf4_matmul.default, (x.detach(), *args, False))

    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):  # what dynamo hands the compiler, per compiled Block
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    for checkpoint in (False, True):
        model = build("qlora")
        fast.checkpoint_blocks(model, enabled=checkpoint)
        fast.compile_blocks(model, backend=backend).train()
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert any("minipeft.nf4_matmul" in t for t in set().union(*graphs)) == checkpoint, checkpoint
        graphs.clear()
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA kernel: its GPU run is in benchmarks/results")
def test_the_triton_dequantization_equals_the_library_bit_for_bit():
    """fast_nf4._triton_dequantize (the 4-bit layers' kernel inside nf4_matmul on a GPU) against dequantize_nf4 (equal to
    bitsandbytes'): every bit, with and without double quantization, a partial last block, an odd size."""
    from minipeft.nf4 import dequantize_nf4, quantize_nf4

    assert fast_nf4._dequantizer(torch.device("cuda")) is fast_nf4._triton_dequantize
    torch.manual_seed(0)
    cases = [((4096, 4096), 64, True, torch.bfloat16), ((11008, 4096), 64, True, torch.bfloat16),
             ((999, 33), 64, True, torch.float16), ((512, 2048), 128, False, torch.bfloat16),
             ((300, 7), 256, False, torch.float32)]  # fmt: skip
    for shape, blocksize, double, dtype in cases:
        q = quantize_nf4(torch.randn(shape, device="cuda", dtype=dtype), blocksize, double)
        fields = (q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code)
        got = fast_nf4._triton_dequantize(*fields, shape, blocksize, q.nested_blocksize, dtype)
        assert torch.equal(got, dequantize_nf4(q)), (shape, blocksize, double, dtype)
        x = torch.randn(3, shape[1], device="cuda", dtype=dtype)
        torch.testing.assert_close(fast.nf4_matmul(x, *fields, *shape, blocksize, q.nested_blocksize, False),
                                   x @ dequantize_nf4(q).T)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA kernel: its GPU run is in benchmarks/results")
def test_the_triton_swiglu_kernels_equal_torch():
    """fast_mlp's two SwiGLU kernels (lora_mlp's backward on a GPU) against torch's ops and autograd in float32 from the same
    16-bit inputs: h = silu(e) * g within two units in the last place (the kernel's exp is not torch's, and silu is
    rounded to the 16-bit type before the product, as F.silu does), de and dg within assert_close's defaults; a size
    that is no multiple of the kernels' block. Then lora_mlp in bf16 against the reference MLP's bf16 autograd."""
    assert fast_mlp._triton_kernels() is not None
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        e, g, dh = (torch.randn(3001, 37, device="cuda", dtype=dtype) * 3 for _ in range(3))
        h = fast_mlp._swiglu(e, g)
        torch.testing.assert_close(h, torch.nn.functional.silu(e) * g, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
        e32, g32 = e.float().requires_grad_(), g.float().requires_grad_()
        de_want, dg_want = torch.autograd.grad(torch.nn.functional.silu(e32) * g32, [e32, g32], dh.float())
        de, dg = fast_mlp._swiglu_backward(dh.clone(), e, g)
        torch.testing.assert_close(de, de_want.to(dtype)), torch.testing.assert_close(dg, dg_want.to(dtype))

    model = get_peft_model(Transformer(tiny_config()).cuda().bfloat16(),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    mlp = fast.blocks(model)[0].mlp  # float32 adapters on a bf16 base, under autocast as in training
    x = torch.randn(4, 33, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fast_mlp.lora_mlp(x, *fast_mlp.mlp_operands(mlp, torch.bfloat16, True))
    with torch.autocast("cuda", torch.bfloat16):
        ref = mlp(x)
    torch.testing.assert_close(y, ref)
    adapters = [p for p in mlp.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(out, [x, *adapters], torch.ones_like(out)) for out in (y, ref)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_a_compiled_block_outputs_only_its_hidden_states_when_training():
    """Without use_cache a Block returns no keys and values: as outputs of each compiled graph their (zero)
    gradients were made and copied into every backward graph each step (135M LoRA q,v with CUDA graphs: 0.88 ->
    1.21x HF's graphs once they were gone). With use_cache they come back, for generation."""
    torch._dynamo.reset()
    outputs = []

    def backend(gm, inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        outputs.append(len(torch.utils._pytree.tree_leaves(out.args[0])))
        return gm.forward

    model = fast.compile_blocks(build("lora"), backend=backend).train()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert outputs and set(outputs) == {1}
    x = torch.randn(2, 8, model.config.hidden_size, dtype=torch.float64)
    cos, sin = model.base_model.rotary(torch.arange(8).expand(2, 8), x.dtype)
    block = fast.blocks(model)[0]
    assert block(x, cos, sin, None)[1] is None and len(block(x, cos, sin, None, None, True)[1]) == 2
    torch._dynamo.reset()


def test_checkpointed_compiled_mlps_run_as_one_op_with_a_handwritten_backward():
    """fast_mlp.lora_mlp (the MLP of a checkpointed compiled Block: SwiGLU and its adapters in one function whose
    backward is one hand-written op, Unsloth's approach) against the reference MLP in float64, with non-zero adapters on some projections and
    none on another: output and gradients for x, A and B; opcheck on the backward's op. Then which Blocks use it:
    a checkpointed LoRA model's with an adapter in the MLP; not without one, with dropout, DoRA on the MLP, full
    fine-tuning or without checkpointing."""
    torch.manual_seed(0)
    model = get_peft_model(build("full"), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"],
                                                     init_lora_weights=False, lora_alpha=3))  # fmt: skip
    mlp = fast.blocks(model)[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    scaling, weights = fast_mlp.mlp_operands(mlp, torch.float64, False)
    assert [w.size(0) for w in weights[1::3]] == [4, 0, 4] and scaling == [3 / 4, 0.0, 3 / 4]
    y = fast_mlp.lora_mlp(x, scaling, weights)
    ref = mlp(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    adapters = [p for n, p in mlp.named_parameters() if p.requires_grad]
    assert len(adapters) == 4
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *adapters], g)
    want = torch.autograd.grad(ref, [x, *adapters], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    weights = [w.detach() for w in weights]
    args = (g, x.detach(), *fast_mlp._lora_mlp_forward(x.detach(), weights, scaling)[1:], weights, scaling)
    torch.library.opcheck(torch.ops.minipeft.lora_mlp_backward.default, args)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def ops(method, checkpoint=True, **config):  # is the op in a compiled backward graph, with no graph break?
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        graphs = []
        keep = lambda gm, _: graphs.append(gm) or make_boxed_func(gm.forward)  # noqa: E731
        model = build("full")
        if config:
            model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, **config))
        fast.checkpoint_blocks(model, enabled=checkpoint)
        fast.compile_blocks(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep)).train()
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        torch._dynamo.reset()
        return any("minipeft.lora_mlp_backward" in str(n.target) for gm in graphs for n in gm.graph.nodes)

    assert ops("lora", target_modules="all-linear") and ops("lora on down", target_modules=["down_proj"])
    assert not ops("lora q,v", target_modules=["q_proj", "v_proj"])  # no adapter in the MLP: the compiler's
    assert not ops("lora", checkpoint=False, target_modules="all-linear")
    assert not ops("dropout", target_modules="all-linear", lora_dropout=0.1)
    assert not ops("dora", target_modules="all-linear", use_dora=True)
    assert not ops("full")
