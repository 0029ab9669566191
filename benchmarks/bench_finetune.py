"""Fine-tuning speed and memory: minipeft against transformers + peft (+ bitsandbytes), in one process.

    python benchmarks/bench_finetune.py --device cuda --out benchmarks/results          # the full run (GPU)
    python benchmarks/bench_finetune.py --quick --device cpu --out /tmp/bench          # a smoke run (~1 min, CPU)
    python benchmarks/bench_finetune.py --render benchmarks/results/h200-2026-11-29.json   # JSON -> markdown again

For each model shape (random weights, bf16) and each method, one training row per side:
    a step = forward with labels -> loss.backward() -> AdamW.step() (fused on CUDA) -> zero_grad(set_to_none)
timed after warm-up with CUDA events around forward, backward and the optimizer, the median over the timed steps.

What each side does, in dtype terms (the same on both sides unless said):
- base weights bfloat16 (norms and embeddings too), on the device; the SAME weights on both sides (the minipeft
  model's state_dict is loaded into LlamaForCausalLM, whose keys are identical; QLoRA: both quantize the same
  bf16 weights, HF through BitsAndBytesConfig(nf4, double quant, compute dtype bf16) at from_pretrained);
- the step runs under torch.autocast(bfloat16): every matmul in bf16, fp32 accumulate;
- the loss: logits (B, T, V) in bf16 from lm_head, upcast to float32 for the cross-entropy (both libraries do);
- trainable parameters in whatever dtype each library gives them (recorded per row, "trainable_dtypes"):
  LoRA A/B float32 in both (PEFT's autocast_adapter_dtype, minipeft's own rule); full fine-tuning bf16 weights
  with bf16 AdamW states in both; prefix/prompt/adapter: see the row;
- HF "adapter" rows: PEFT has no bottleneck adapters, so the HF side is LlamaForCausalLM with the same Houlsby
  bottleneck (after o_proj and down_proj, before the residual) wrapped around its modules by HoulsbyAdapter
  below, in the dtype minipeft uses for its adapters: it measures the two base models under the same adapter;
- same optimizer: torch.optim.AdamW(trainable, lr=1e-4, fused=True on CUDA); same batch of random tokens;
  use_cache=False in training on both sides; no gradient checkpointing, no dropout.
Tokens/s counts the real tokens B*T of a step (prompt tuning's 20 virtual tokens are extra work, not tokens).
MFU = model FLOPs of a step (step_flops below) / step time / the bf16 matmul rate measured in the same run.
Peak memory = torch.cuda.max_memory_allocated over the timed steps, its counter reset after the model and the
optimizer are built (so it is the training peak: weights + grads + AdamW states + activations, not the
transient of building or quantizing the model); everything is freed between rows.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minipeft.adapter import AdapterConfig  # noqa: E402
from minipeft.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from minipeft.lora import LoraConfig  # noqa: E402
from minipeft.model import ModelConfig, Transformer  # noqa: E402
from minipeft.nf4 import dequantize_nf4, quantize_model, quantize_nf4  # noqa: E402
from minipeft.peft import get_peft_model  # noqa: E402
from minipeft.prefix import PrefixTuningConfig  # noqa: E402
from minipeft.prompt import PromptTuningConfig  # noqa: E402
from minipeft.train import step_in_backward  # noqa: E402

SHAPES = {  # name -> model config, batch, sequence length
    "smollm2-135m": dict(  # SmolLM2-135M
        cfg=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
        batch=8, seq=512),
    "llama-1b": dict(  # the Llama-3.2-1B shape
        cfg=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
        batch=4, seq=1024),
    "tiny": dict(  # --quick
        cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        batch=2, seq=32),
}  # fmt: skip
COMMON = dict(tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)
METHODS = ["full", "lora_qv", "lora_all", "qlora", "prefix", "prompt", "adapter"]
R, ALPHA, P, BOTTLENECK = 16, 32, 20, 64  # LoRA rank and alpha, virtual tokens, adapter bottleneck
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# The timing helper
class Clock:
    """Marks inside a step: CUDA events on a GPU (no sync until the end), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self):  # between consecutive marks
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup, reps):
    """Median milliseconds of fn() (synchronized), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def stream_ms(fn, device, warmup, reps):
    """Milliseconds per fn() run back to back (GPU throughput: CUDA events around `reps` calls, so the host's
    launch and guard time overlaps the kernels, as in a training step); time_fn on a CPU."""
    if device.type != "cuda":
        return time_fn(fn, device, warmup, reps)
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gib(nbytes):
    return None if nbytes is None else nbytes / 2**30


# ---------------------------------------------------------------------------------------------------------------
# Building the models: one function per side per method; each returns the model to train.
class Env:
    """What the row builders share: the shape, the device, the seed, a temporary HF folder with the base."""

    def __init__(self, shape, device, tmp):
        self.shape, self.device, self.tmp = shape, device, tmp
        self.cfg = ModelConfig(**SHAPES[shape]["cfg"], **COMMON)
        self.hf_dir = os.path.join(tmp, f"base-{shape}")

    def mp_base(self):  # the same random weights on every call (seeded), bf16, on the device
        torch.manual_seed(0)
        with torch.device(self.device):
            return Transformer(self.cfg).to(DTYPE)

    def hf_config(self):
        from transformers import LlamaConfig

        c = self.cfg
        return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                           intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                           num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                           rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                           rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, use_cache=False,
                           attn_implementation="sdpa")  # fmt: skip

    def hf_base(self):  # LlamaForCausalLM with minipeft's weights (identical state_dict keys)
        from transformers import LlamaForCausalLM

        with torch.device(self.device):
            hf = LlamaForCausalLM._from_config(self.hf_config(), dtype=DTYPE, attn_implementation="sdpa")
        mp = self.mp_base()
        hf.load_state_dict(mp.state_dict())
        del mp
        return hf

    def save_hf_dir(self):  # the random base as an HF folder (config.json + model.safetensors), once per shape
        if not os.path.isdir(self.hf_dir):
            model = self.mp_base()
            save_pretrained(model, self.hf_dir)
            del model
        return self.hf_dir

    def hf_base_4bit(self):  # from_pretrained with bitsandbytes NF4, double quant, bf16 compute
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=DTYPE)  # fmt: skip
        dev = {"": self.device.index or 0} if self.device.type == "cuda" else {"": "cpu"}
        return LlamaForCausalLM.from_pretrained(self.save_hf_dir(), quantization_config=bnb, dtype=DTYPE,
                                                device_map=dev, attn_implementation="sdpa", use_cache=False)  # fmt: skip


def mp_lora_config(targets):
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)


def mp_full(env):
    return env.mp_base()


def mp_lora_qv(env):
    return get_peft_model(env.mp_base(), mp_lora_config(("q_proj", "v_proj")))


def mp_lora_all(env):
    return get_peft_model(env.mp_base(), mp_lora_config("all-linear"))


def mp_qlora(env):
    return get_peft_model(quantize_model(env.mp_base()), mp_lora_config("all-linear"))


def mp_prefix(env):
    return get_peft_model(env.mp_base(), PrefixTuningConfig(num_virtual_tokens=P))


def mp_prompt(env):
    return get_peft_model(env.mp_base(), PromptTuningConfig(num_virtual_tokens=P))


def mp_adapter(env):
    return get_peft_model(env.mp_base(), AdapterConfig(bottleneck_size=BOTTLENECK, placement="houlsby"))


def hf_lora_config(targets):
    import peft

    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")


def hf_full(env):
    return env.hf_base()


def hf_lora_qv(env):
    import peft

    return peft.get_peft_model(env.hf_base(), hf_lora_config(["q_proj", "v_proj"]))


def hf_lora_all(env):
    import peft

    return peft.get_peft_model(env.hf_base(), hf_lora_config("all-linear"))


def hf_qlora(env):
    import peft

    return peft.get_peft_model(env.hf_base_4bit(), hf_lora_config("all-linear"))


def hf_prefix(env):
    import peft

    return peft.get_peft_model(env.hf_base(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))


def hf_prompt(env):
    import peft

    return peft.get_peft_model(env.hf_base(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))


class HoulsbyAdapter(nn.Module):
    """h + up(relu(down(h))), h = base(x): minipeft.adapter.AdapterLayer's computation, for HF's modules."""

    def __init__(self, base, bottleneck, dtype):
        super().__init__()
        self.base = base
        D = base.out_features
        self.down = nn.Linear(D, bottleneck, device=base.weight.device, dtype=dtype)
        self.up = nn.Linear(bottleneck, D, device=base.weight.device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.base(x)
        return h + self.up(F.relu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def hf_adapter(env):
    hf = env.hf_base()
    dtype = adapter_dtype(env)
    for p in hf.parameters():
        p.requires_grad_(False)
    for layer in hf.model.layers:
        layer.self_attn.o_proj = HoulsbyAdapter(layer.self_attn.o_proj, BOTTLENECK, dtype)
        layer.mlp.down_proj = HoulsbyAdapter(layer.mlp.down_proj, BOTTLENECK, dtype)
    return hf


def adapter_dtype(env):  # the dtype minipeft gives its bottleneck adapters on this base (matched on the HF side)
    tiny = Transformer(ModelConfig(**SHAPES["tiny"]["cfg"], **COMMON)).to(DTYPE)
    m = get_peft_model(tiny, AdapterConfig(bottleneck_size=4))
    return next(p.dtype for p in m.parameters() if p.requires_grad)


BUILDERS = {
    "minipeft": dict(full=mp_full, lora_qv=mp_lora_qv, lora_all=mp_lora_all, qlora=mp_qlora, prefix=mp_prefix,
                     prompt=mp_prompt, adapter=mp_adapter),
    "hf": dict(full=hf_full, lora_qv=hf_lora_qv, lora_all=hf_lora_all, qlora=hf_qlora, prefix=hf_prefix,
               prompt=hf_prompt, adapter=hf_adapter),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Model FLOPs of a training step (matmuls and attention; norms, rotary, softmax and the optimizer not counted)
def step_flops(cfg, B, T, method):
    D, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    Hd, Kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (D, Hd), "k_proj": (D, Kd), "v_proj": (D, Kd), "o_proj": (Hd, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}  # fmt: skip
    n_lin = L * sum(i * o for i, o in shapes.values()) + D * V  # the linears, lm_head included
    tokens = B * (T + (P if method == "prompt" else 0))  # prompt tuning runs P more positions
    past = P if method == "prefix" else 0
    Tq = T + (P if method == "prompt" else 0)
    # causal attention: query t sees past + t + 1 keys; QK^T and PV each 2 * Hd FLOPs per (query, key)
    attn_fwd = L * B * 4 * Hd * (Tq * past + Tq * (Tq + 1) / 2)
    fwd = 2 * tokens * n_lin + attn_fwd
    bwd_input = 2 * tokens * n_lin + 2 * attn_fwd  # dL/dx of every linear, attention backward
    extra = 0.0
    if method == "full":
        extra = 2 * tokens * n_lin  # dL/dW of every linear (lm_head = the tied embedding)
    elif method in ("lora_qv", "lora_all", "qlora"):
        names = ("q_proj", "v_proj") if method == "lora_qv" else tuple(shapes)
        extra = 6 * tokens * L * sum(R * sum(shapes[n]) for n in names)  # A, B: forward, dx, dW
    elif method == "adapter":
        extra = 6 * tokens * L * 2 * 2 * D * BOTTLENECK
    return fwd + bwd_input + extra


# ---------------------------------------------------------------------------------------------------------------
# Switches: the library's optional speed levers, one extra row each (--switches)
def compile_layers(model):
    """torch.compile each decoder layer: minipeft's Transformer.compile_blocks, or the same done by hand to the
    transformers model's `layers` (for a like-for-like HF row with --switches hf_compile)."""
    if hasattr(model, "compile_blocks"):
        return model.compile_blocks()
    layers = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)]
    for layer in layers[0]:
        layer.compile()
    return model


def checkpointed(model):  # --grad-checkpoint: each block recomputed in backward (less memory, more time)
    (model.base_model if hasattr(model, "base_model") else model).gradient_checkpointing = True
    return model


SWITCHES = {  # name -> (side, fn)
    "compile": ("minipeft", compile_layers),
    "compile_cg": ("minipeft", lambda model: model.compile_blocks(mode="reduce-overhead")),  # + CUDA graphs
    "compile_oib": ("minipeft", lambda model: model.compile_blocks()),  # + the optimizer stepped in backward
    "compile_gc": ("minipeft", lambda model: checkpointed(model).compile_blocks()),  # + activation checkpointing
    "hf_compile": ("hf", compile_layers),
}


# ---------------------------------------------------------------------------------------------------------------
# One training row
def trainable_parameters(model):
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def top_kernels(prof, n=12):
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if t > 0:
            rows.append((t, e.key, e.count))
    rows.sort(reverse=True)
    total = sum(t for t, _, _ in rows)
    return total / 1e3, [dict(name=k[:110], ms=t / 1e3, calls=c, share=t / total) for t, k, c in rows[:n]]


def profile_step(step, device):
    """One more step under torch.profiler: GPU busy share of the wall time and the top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(Clock(device))
        sync(device)
        wall = 1e3 * (time.perf_counter() - t)
    busy, kernels = top_kernels(prof)
    return dict(wall_ms=wall, kernel_ms=busy, gpu_busy=busy / wall, top=kernels)


def train_row(env, side, method, args, lever=None):
    device, spec = env.device, SHAPES[env.shape]
    B, T = spec["batch"], spec["seq"]
    row = dict(shape=env.shape, method=method, side=side, batch=B, seq=T, lever=lever)
    free(device)
    model = BUILDERS[side][method](env)
    if lever:  # a switch: applied to the built model (compiled blocks) before the optimizer sees it
        # A fresh dynamo cache per row: all rows share Block.forward's code object, and past its recompile limit
        # (8 entries) dynamo silently runs it eagerly (what the first run of this script did to the later rows).
        torch._dynamo.reset()
        model = SWITCHES[lever][1](model)
    model.train()
    params = trainable_parameters(model)
    row["trainable_params"] = sum(p.numel() for p in params)
    row["trainable_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    # compile_oib: each parameter stepped inside backward and its gradient freed (TrainConfig.optimizer_in_backward);
    # opt.step() below then finds no gradient and does nothing, so the step's time is in the backward column.
    hooks = step_in_backward(opt) if lever == "compile_oib" else []
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, env.cfg.vocab_size, (B, T), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPE)
    losses = []

    def step(clock):
        if lever == "compile_cg":  # CUDA graphs: tell the graph trees a new step starts (outputs may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            # minipeft's training path asks for the loss alone (chunked cross-entropy, no (B, T, V) logits),
            # as minipeft.train does; HF's models compute full logits and upcast them to float32 for the loss.
            kw = {"return_logits": False} if side == "minipeft" else {}
            loss = model(input_ids=ids, labels=ids, use_cache=False, **kw).loss
        clock.mark()
        if device.type == "cuda" and "mem_after_fwd_gib" not in row:  # weights + activations kept for backward
            row["mem_after_fwd_gib"] = gib(torch.cuda.memory_allocated())
        loss.backward()
        clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        losses.append(loss.detach())

    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        row["static_mem_gib"] = gib(torch.cuda.memory_allocated())  # weights (+ quantized) before the first step
    phases = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # a second clock: host wall time over all timed steps, synchronized at both ends
            sync(device)
            wall0 = time.perf_counter()
        clock = Clock(device)
        clock.mark()
        t_first = time.perf_counter()
        step(clock)
        if i >= args.warmup:
            phases.append(clock.intervals_ms())
        elif i == 0:
            sync(device)
            row["first_step_s"] = time.perf_counter() - t_first  # includes the compile with a compile switch
    sync(device)
    row["wall_step_ms"] = 1e3 * (time.perf_counter() - wall0) / args.steps  # includes reading the events
    for h in hooks:
        h.remove()
    row["loss_first"] = float(losses[0])
    row["loss_last"] = float(losses[-1])
    fwd, bwd, optim = (statistics.median(p[k] for p in phases) for k in range(3))
    total = statistics.median(sum(p) for p in phases)
    row.update(step_ms=total, fwd_ms=fwd, bwd_ms=bwd, opt_ms=optim, tokens_per_s=B * T / (total / 1e3))
    row["flops_per_step"] = step_flops(env.cfg, B, T, method)
    row["tflops"] = row["flops_per_step"] / (total / 1e3) / 1e12
    if device.type == "cuda":
        row["peak_mem_gib"] = gib(torch.cuda.max_memory_allocated())
        if args.profile:
            try:
                row["profile"] = profile_step(step, device)
            except Exception as e:  # noqa: BLE001  a profiler problem must not lose the row
                row["profile"] = f"failed: {type(e).__name__}: {e}"[:300]
    return row  # the model, its gradients and the optimizer go with this frame; the next row frees them


# ---------------------------------------------------------------------------------------------------------------
# Side measurements: the matmul peak, dequantize_nf4 bandwidth, generation latency, adapter swapping
def matmul_peak(device, quick):
    n = 512 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=DTYPE) for _ in range(2))
    ms = time_fn(lambda: a @ b, device, 3, 3 if quick else 20)
    return dict(n=n, ms=ms, tflops=2 * n**3 / (ms / 1e3) / 1e12)


def bench_dequant(device, quick):
    out, in_ = (256, 256) if quick else (16384, 8192)
    w = torch.randn(out, in_, device=device, dtype=DTYPE) * 0.02
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    n = w.numel()
    read = sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.nested_absmax, q.nested_code))
    written = n * 2  # bf16 output
    reps = 3 if quick else 50
    res = dict(shape=[out, in_], bytes_read=read, bytes_written=written, timing="back-to-back calls, CUDA events")
    rate = lambda ms, nbytes=read + written: dict(ms=ms, gbps=nbytes / (ms / 1e3) / 1e9)  # noqa: E731
    res["minipeft"] = rate(stream_ms(lambda: dequantize_nf4(q), device, 2, reps))
    ref = dequantize_nf4(q)
    try:  # the library function through torch.compile (what compile_blocks does to it inside a QLoRA block)
        fn = torch.compile(dequantize_nf4)
        res["lever_compiled"] = rate(stream_ms(lambda: fn(q), device, 3, reps))
        res["lever_compiled"]["bit_identical"] = bool(torch.equal(fn(q), ref))
        res["lever_compiled"]["max_abs_diff"] = float((fn(q).float() - ref.float()).abs().max())
    except Exception as e:  # noqa: BLE001
        res["lever_compiled"] = f"failed: {type(e).__name__}: {e}"[:300]
    err = (dequantize_nf4(q).float() - w.float()).norm() / w.float().norm()
    res["rel_error_vs_w"] = float(err)
    dst = torch.empty_like(w)
    res["copy"] = rate(stream_ms(lambda: dst.copy_(w), device, 2, reps), 2 * written)
    res["write_only"] = rate(stream_ms(lambda: dst.fill_(1.0), device, 2, reps), written)  # the output alone
    res["ratio_to_copy"] = res["minipeft"]["gbps"] / res["copy"]["gbps"]
    try:  # bitsandbytes' CUDA kernel on the same weight, for reference
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        res["bitsandbytes"] = rate(stream_ms(lambda: bnbf.dequantize_4bit(packed, state), device, 2, reps))
        res["bitsandbytes_equal"] = bool(torch.equal(bnbf.dequantize_4bit(packed, state), dequantize_nf4(q)))
    except Exception as e:  # noqa: BLE001
        res["bitsandbytes"] = f"not run: {type(e).__name__}: {e}"[:300]
    return res


def bench_generation(env, args):
    """ms per new token, batch 1, greedy, KV cache: base, LoRA all-linear r=16 unmerged, the same merged."""
    device = env.device
    new = 8 if args.quick else 128
    ids = torch.randint(0, env.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2)).to(device)
    reps = 2 if args.quick else 7
    res = dict(shape=env.shape, prompt_tokens=32, new_tokens=new, dtype="bf16 weights, no autocast (inference)")

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)  # B != 0
    models = {  # three copies of the same base; the two LoRA ones get the same adapter (the seed is reset)
        "minipeft_base": env.mp_base().eval(),
        "minipeft_lora_unmerged": get_peft_model(env.mp_base(), cfg).eval(),
        "minipeft_lora_merged": get_peft_model(env.mp_base(), cfg).merge_and_unload().eval(),
    }
    outs = {k: m.generate(ids, max_new_tokens=min(new, 32)) for k, m in models.items()}  # warm-up
    times = {k: [] for k in models}
    order = list(models)
    for r in range(reps):  # interleaved rounds, so that drifts of the (host-bound) speed hit all three alike;
        for k in order[r % 3 :] + order[: r % 3]:  # the order rotates: none always runs right after another
            m = models[k]
            sync(device)
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=new)
            sync(device)
            times[k].append(1e3 * (time.perf_counter() - t) / new)
    # The fastest round of each: the three decode the same number of tokens, and on a host-bound loop the
    # slower rounds measure the host's other work (timeit's advice); the medians are kept beside them.
    res.update({k: min(v) for k, v in times.items()})
    res.update({k + "_median": statistics.median(v) for k, v in times.items()})
    res["rounds_ms_per_token"] = times
    same = outs["minipeft_lora_merged"] == outs["minipeft_lora_unmerged"]
    res["merged_equals_unmerged_tokens"] = float(same.float().mean())
    del models
    free(device)

    def ms_per_token(gen):
        return time_fn(gen, device, 1, 3) / new

    try:  # the same three through transformers + peft, for reference
        if "hf" not in args.extras_sides.split(","):
            raise RuntimeError("--extras-sides has no hf")
        import peft

        hf = env.hf_base().eval()
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        res["hf_base"] = ms_per_token(lambda: hf.generate(ids, **kw))
        hp = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                     init_lora_weights=False)).eval()  # fmt: skip
        res["hf_lora_unmerged"] = ms_per_token(lambda: hp.generate(input_ids=ids, **kw))
        hm = hp.merge_and_unload().eval()
        res["hf_lora_merged"] = ms_per_token(lambda: hm.generate(ids, **kw))
    except Exception as e:  # noqa: BLE001
        res["hf"] = f"not run: {type(e).__name__}: {e}"[:300]
    free(device)
    b = res["minipeft_base"]
    res["merged_over_base"] = res["minipeft_lora_merged"] / b
    res["unmerged_over_base"] = res["minipeft_lora_unmerged"] / b
    return res


def bench_swap(env, args):
    """Seconds to load the base model from an HF folder vs to load / switch LoRA adapters (all-linear, r=16)."""
    device, reps = env.device, 3
    base_dir = env.save_hf_dir()
    res = dict(shape=env.shape, base_dir_bytes=sum(os.path.getsize(os.path.join(base_dir, f))
                                                   for f in os.listdir(base_dir)))  # fmt: skip

    def ms(fn, n=reps):
        return time_fn(fn, device, 1, n)

    res["minipeft_load_base_ms"] = ms(lambda: load_pretrained(base_dir, dtype=DTYPE, device=device))
    model, _ = load_pretrained(base_dir, dtype=DTYPE, device=device)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    dirs = {}
    for name in ("a", "b"):
        dirs[name] = os.path.join(env.tmp, f"mp-adapter-{env.shape}-{name}")
        pm.save_pretrained(dirs[name])
    res["adapter_dir_bytes"] = os.path.getsize(os.path.join(dirs["a"], "adapter_model.safetensors"))
    counter = iter(range(10**6))

    def load_one():
        pm.load_adapter(dirs["b"], f"x{next(counter)}")

    res["minipeft_load_adapter_ms"] = ms(load_one)
    pm.load_adapter(dirs["b"], "b")
    state = {"cur": "b"}

    def switch():
        state["cur"] = "default" if state["cur"] == "b" else "b"
        pm.set_adapter(state["cur"])

    res["minipeft_set_adapter_ms"] = ms(switch, 20)
    try:
        import peft
        from transformers import LlamaForCausalLM

        dev = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}

        def hf_load():
            return LlamaForCausalLM.from_pretrained(base_dir, dtype=DTYPE, device_map=dev)

        res["hf_load_base_ms"] = ms(hf_load)
        hp = peft.get_peft_model(hf_load(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                            init_lora_weights=False))  # fmt: skip
        hdir = os.path.join(env.tmp, f"hf-adapter-{env.shape}")
        hp.save_pretrained(hdir)

        def hf_load_one():
            hp.load_adapter(hdir, adapter_name=f"x{next(counter)}")

        res["hf_load_adapter_ms"] = ms(hf_load_one)
        hp.load_adapter(hdir, adapter_name="b")
        state["cur"] = "b"

        def hf_switch():
            state["cur"] = "default" if state["cur"] == "b" else "b"
            hp.set_adapter(state["cur"])

        res["hf_set_adapter_ms"] = ms(hf_switch, 20)
    except Exception as e:  # noqa: BLE001
        res["hf"] = f"not run: {type(e).__name__}: {e}"[:300]
    free(device)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Reporting
def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"not importable ({type(e).__name__})"
    return out


def find(rows, shape, method, side, lever=None):
    for r in rows:
        if (r["shape"], r["method"], r["side"], r.get("lever")) == (shape, method, side, lever) and "error" not in r:
            return r
    return None


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def targets(res):
    """[(target, {variant: measured text}, met)] for the issue's targets, from the rows of one run.

    Each minipeft figure is given for the plain (eager) rows and, where the run has them, the rows with the
    compile switch; the HF side is always transformers + peft as shipped (eager). `met`: by either variant."""
    out, rows, peak = [], res["rows"], res["peak"]["tflops"]
    variants = [None] + [
        v for v in ("compile", "compile_cg", "compile_oib", "compile_gc") if any(r.get("lever") == v for r in rows)
    ]

    def ratio(x, y, key):
        return x and y and x.get(key) and y.get(key) and x[key] / y[key]

    def add(name, vals, ok, text):  # vals: {variant: a number or None}
        words = name.replace(":", "").split()
        if any(m in words for m in METHODS if m not in res["methods"]) or (
            words[0] in SHAPES and words[0] not in res["shapes"]
        ):  # a target of a method or shape this run did not include
            return
        texts = {v or "eager": "not measured" if x is None else text(x) for v, x in vals.items()}
        got = [x for x in vals.values() if x is not None]
        out.append((name, texts, None if not got else any(ok(x) for x in got)))

    def mp_vs(shape, m, other, key):  # {variant: minipeft row / other row}; other(v) -> the row to divide by
        return {v: ratio(find(rows, shape, m, "minipeft", v), other(v), key) for v in variants}

    times = lambda x: f"{x:.2f}x"  # noqa: E731
    for shape in res["shapes"]:
        for m in ("full", "lora_qv", "lora_all", "qlora", "prefix", "prompt", "adapter"):
            hf = find(rows, shape, m, "hf")
            goal = {"qlora": 2.0, "prefix": 1.3, "prompt": 1.3, "adapter": 1.3}.get(m, 1.5)
            add(
                f"{shape} {m}: tokens/s >= {goal:g}x HF" + ("+bnb" if m == "qlora" else ""),
                mp_vs(shape, m, lambda v, hf=hf: hf, "tokens_per_s"),
                lambda x, goal=goal: x >= goal,
                times,
            )
            if m in ("full", "lora_qv", "lora_all"):
                add(f"{shape} {m}: peak memory <= 0.6x HF", mp_vs(shape, m, lambda v, hf=hf: hf, "peak_mem_gib"),
                    lambda x: x <= 0.6, times)  # fmt: skip
        ours = lambda v, shape=shape: find(rows, shape, "lora_all", "minipeft", v)  # noqa: E731
        add(f"{shape} qlora: tokens/s >= 0.85x our lora_all", mp_vs(shape, "qlora", ours, "tokens_per_s"),
            lambda x: x >= 0.85, times)  # fmt: skip
        add(f"{shape} qlora: peak memory < our lora_all", mp_vs(shape, "qlora", ours, "peak_mem_gib"),
            lambda x: x < 1, times)  # fmt: skip
    for m in ("lora_qv", "lora_all"):
        mfu = {v: (r := find(rows, "llama-1b", m, "minipeft", v)) and r["tflops"] / peak for v in variants}
        add(f"llama-1b {m}: MFU >= 50% of the measured bf16 peak", mfu, lambda x: x >= 0.5, lambda x: f"{100 * x:.1f}%")
    d, g = res.get("dequant") or {}, res.get("generation") or {}
    compiled = d.get("lever_compiled") if isinstance(d.get("lever_compiled"), dict) else None
    add("dequantize_nf4 >= 70% of copy bandwidth",
        {v: d.get("ratio_to_copy") if v is None else compiled and compiled["gbps"] / d["copy"]["gbps"]
         for v in variants}, lambda x: x >= 0.7, lambda x: f"{100 * x:.0f}%")  # fmt: skip
    add("merged LoRA generation within 3% of base (either way)",  # the same modules: faster is noise too
        {v: g.get("merged_over_base") if v is None else None for v in variants}, lambda x: abs(x - 1) <= 0.03,
        lambda x: f"{100 * (x - 1):+.1f}%")  # fmt: skip
    add("unmerged LoRA generation within 10% of base",
        {v: g.get("unmerged_over_base") if v is None else None for v in variants}, lambda x: x <= 1.10,
        lambda x: f"{100 * (x - 1):+.1f}%")  # fmt: skip
    return out


def to_markdown(res):
    m = res["meta"]
    v = m["versions"]
    lines = [f"# Fine-tuning benchmark: {m['device_name']}, {m['date']}", "",
             f"Command: `{m['command']}`  ",
             f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, bitsandbytes "
             f"{v['bitsandbytes']}, python {v['python']}  ",
             f"Measured bf16 matmul peak ({res['peak']['n']}^3): **{res['peak']['tflops']:.0f} TFLOP/s**; "
             f"{m['warmup']} warm-up + {m['steps']} timed steps per row, medians.", "",
             "Dtypes, both sides: bf16 base weights, bf16 autocast, fp32 loss over the logits, AdamW "
             "(fused on CUDA); trainable dtypes per row below. HF adapter rows: LlamaForCausalLM + the same "
             "Houlsby bottleneck written in the script (PEFT has none).", ""]  # fmt: skip
    for shape in res["shapes"]:
        spec = SHAPES[shape]
        lines += [f"## {shape} (batch {spec['batch']} x {spec['seq']} tokens)", "",
                  "| method | minipeft tok/s | HF tok/s | ratio | minipeft peak GiB | HF peak GiB | mem ratio "
                  "| trainable (mp / HF) | trainable dtype (mp / HF) | MFU mp / HF | fwd+bwd+opt ms mp | fwd+bwd+opt ms HF "
                  "| loss step 1 mp / HF |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for meth in res["methods"]:
            a, b = find(res["rows"], shape, meth, "minipeft"), find(res["rows"], shape, meth, "hf")
            if a is None and b is None:
                continue
            g = lambda r, k: r.get(k) if r else None  # noqa: E731
            ratio = a and b and a["tokens_per_s"] / b["tokens_per_s"]
            mr = g(a, "peak_mem_gib") and g(b, "peak_mem_gib") and a["peak_mem_gib"] / b["peak_mem_gib"]
            mfu = lambda r: fmt(r and 100 * r["tflops"] / res["peak"]["tflops"], ".1f") + ("%" if r else "")  # noqa: E731
            split = lambda r: f"{r['fwd_ms']:.1f}+{r['bwd_ms']:.1f}+{r['opt_ms']:.1f}" if r else "-"  # noqa: E731
            dt = lambda r: ",".join(r["trainable_dtypes"]) if r else "-"  # noqa: E731
            lines.append(
                f"| {meth} | {fmt(g(a, 'tokens_per_s'), ',.0f')} | {fmt(g(b, 'tokens_per_s'), ',.0f')} | "
                f"{fmt(ratio)} | {fmt(g(a, 'peak_mem_gib'))} | {fmt(g(b, 'peak_mem_gib'))} | {fmt(mr)} | "
                f"{fmt(g(a, 'trainable_params'), ',d')} / {fmt(g(b, 'trainable_params'), ',d')} | {dt(a)} / {dt(b)} | "
                f"{mfu(a)} / {mfu(b)} | {split(a)} | {split(b)} | "
                f"{fmt(g(a, 'loss_first'), '.3f')} / {fmt(g(b, 'loss_first'), '.3f')} |"
            )
        levers = [r for r in res["rows"] if r["shape"] == shape and r.get("lever") and "error" not in r]
        if levers:
            lines += ["", "With a switch (`compile`: minipeft's `compile_blocks()`; `hf_compile`: the same torch.compile "
                      "of each decoder layer done to the HF model); ratios against the same method's eager rows:", "",
                      "| side + switch | method | tok/s | vs eager same side | vs HF eager | peak GiB | mem vs HF eager "
                      "| MFU | fwd+bwd+opt ms | first step s (compile) | loss step 1 (eager) |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in levers:
                a = find(res["rows"], shape, r["method"], r["side"])
                b = find(res["rows"], shape, r["method"], "hf")
                rat = lambda x, y, k: fmt(x and y and x.get(k) and y.get(k) and x[k] / y[k])  # noqa: E731
                lines.append(
                    f"| {r['side']} + {r['lever']} | {r['method']} | {r['tokens_per_s']:,.0f} | "
                    f"{rat(r, a, 'tokens_per_s')} | {rat(r, b, 'tokens_per_s')} | {fmt(r.get('peak_mem_gib'))} | "
                    f"{rat(r, b, 'peak_mem_gib')} | {100 * r['tflops'] / res['peak']['tflops']:.1f}% | "
                    f"{r['fwd_ms']:.1f}+{r['bwd_ms']:.1f}+{r['opt_ms']:.1f} | {fmt(r.get('first_step_s'), '.1f')} | "
                    f"{r['loss_first']:.3f} ({fmt(a and a['loss_first'], '.3f')}) |"
                )
        errs = [r for r in res["rows"] if r["shape"] == shape and "error" in r]
        for r in errs:
            lines.append(
                f"\n- {r['side']} {r['method']} {r.get('lever') or ''} failed: `{r['error'].splitlines()[-1][:200]}`"
            )
        lines.append("")
    d = res.get("dequant")
    if d:
        bnb = d.get("bitsandbytes")
        bnb_txt = f"{bnb['gbps']:.0f} GB/s ({bnb['ms']:.3f} ms)" if isinstance(bnb, dict) else str(bnb)
        lines += ["## dequantize_nf4 (bytes read + bf16 bytes written, per second)", "",
                  f"Weight {d['shape'][0]} x {d['shape'][1]}, blocksize 64, double quant: "
                  f"minipeft **{d['minipeft']['gbps']:.0f} GB/s** ({d['minipeft']['ms']:.3f} ms); "
                  f"device-to-device copy of the bf16 output {d['copy']['gbps']:.0f} GB/s "
                  f"({d['copy']['ms']:.3f} ms): **{100 * d['ratio_to_copy']:.0f}%** of copy; "
                  f"bitsandbytes dequantize_4bit {bnb_txt}"
                  + (f" (bnb quantize_4bit -> dequantize_4bit gives minipeft's dequantize_nf4(quantize_nf4(w)) exactly: "
                     f"{d['bitsandbytes_equal']}; two quantizers, see the README)" if "bitsandbytes_equal" in d else "")
                  + "."]  # fmt: skip
        if isinstance(d.get("write_only"), dict):  # the ceiling: writing the bf16 output, nothing read
            wo = d["write_only"]
            lines.append(f"Writing the bf16 output alone (`fill_`): {wo['gbps']:.0f} GB/s ({wo['ms']:.3f} ms); a "
                         f"dequantization that only wrote would reach {100 * d['copy']['ms'] / wo['ms'] * (d['bytes_read'] + d['bytes_written']) / (2 * d['bytes_written']):.0f}% of copy.")  # fmt: skip
        for k, v in d.items():  # the LEVERS on nf4._dequantize
            if k.startswith("lever_") and isinstance(v, dict):
                lines.append(f"Lever {k[6:]}: {v['gbps']:.0f} GB/s ({v['ms']:.3f} ms, "
                             f"{100 * v['gbps'] / d['copy']['gbps']:.0f}% of copy), bit-identical to "
                             f"dequantize_nf4: {v['bit_identical']}.")  # fmt: skip
        lines.append("")
    g = res.get("generation")
    if g:
        lines += [f"## Generation ({g['shape']}, batch 1, {g['prompt_tokens']}-token prompt, {g['new_tokens']} new "
                  "tokens, greedy, KV cache, bf16; ms per new token)", "",
                  "| | base | LoRA all-linear r=16 unmerged | merged |", "|---|---:|---:|---:|",
                  f"| minipeft | {g['minipeft_base']:.2f} | {g['minipeft_lora_unmerged']:.2f} "
                  f"({100 * (g['unmerged_over_base'] - 1):+.1f}%) | {g['minipeft_lora_merged']:.2f} "
                  f"({100 * (g['merged_over_base'] - 1):+.1f}%) |"]  # fmt: skip
        if "hf_base" in g:
            lines.append(f"| transformers + peft | {g['hf_base']:.2f} | {g['hf_lora_unmerged']:.2f} | "
                         f"{g['hf_lora_merged']:.2f} |")  # fmt: skip
        lines.append("")
    s = res.get("swap")
    if s:
        lines += [f"## Adapter swap vs base load ({s['shape']}, LoRA all-linear r=16, files in the page cache; ms)",
                  "", "| | load base (HF folder) | load_adapter | set_adapter |", "|---|---:|---:|---:|",
                  f"| minipeft | {s['minipeft_load_base_ms']:.1f} | {s['minipeft_load_adapter_ms']:.1f} | "
                  f"{s['minipeft_set_adapter_ms']:.3f} |"]  # fmt: skip
        if "hf_load_base_ms" in s:
            lines.append(f"| transformers + peft | {s['hf_load_base_ms']:.1f} | {s['hf_load_adapter_ms']:.1f} | "
                         f"{s['hf_set_adapter_ms']:.3f} |")  # fmt: skip
        lines.append("")
    found = targets(res)
    variants = list(found[0][1]) if found else ["eager"]
    lines += ["## Targets", "", "minipeft measured plain (eager) and with the compile switch (`compile_blocks`, "
              "`--compile`) where the run has those rows; HF as shipped (eager).", "",
              "| target | " + " | ".join(f"minipeft {v}" for v in variants) + " | met |",
              "|---|" + "---:|" * len(variants) + "---|"]  # fmt: skip
    for name, texts, ok in found:
        lines.append(f"| {name} | " + " | ".join(texts[v] for v in variants)
                     + f" | {'-' if ok is None else 'yes' if ok else '**no**'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 timed steps: a smoke test on a CPU")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    ap.add_argument("--sides", default="minipeft,hf", help="minipeft,hf")
    ap.add_argument("--extras", default="dequant,generation,swap", help="side measurements to run (or 'none')")
    ap.add_argument("--extras-sides", default="minipeft,hf", help="sides measured in the side measurements")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 3, --quick 1)")
    ap.add_argument(
        "--switches",
        default=None,
        help=f"extra rows with a speed switch on, from {list(SWITCHES)}, "
        "or 'none' (default: compile,compile_cg; none with --quick)",
    )
    ap.add_argument("--profile", action="store_true", help="profile one extra step per row: top CUDA kernels")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default=None, help="file stem in --out (default <gpu>-<date>)")
    ap.add_argument("--render", default=None, help="only re-render the markdown of an existing JSON")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        md = args.render.removesuffix(".json") + ".md"
        with open(md, "w") as f:
            f.write(to_markdown(res))
        print(f"wrote {md}")
        return 0
    device = torch.device(args.device)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run on a small, often busy CPU: threads only fight each other there
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    shapes = (args.shapes or ("tiny" if args.quick else "smollm2-135m,llama-1b")).split(",")
    methods, sides = args.methods.split(","), args.sides.split(",")
    extras = [] if args.extras == "none" else args.extras.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; valid: {list(SHAPES)}")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {METHODS}")
    args.switches = args.switches or ("none" if args.quick else "compile,compile_cg")
    switches = [] if args.switches == "none" else args.switches.split(",")
    for sw in switches:
        if sw not in SWITCHES:
            ap.error(f"unknown switch {sw!r}; valid: {list(SWITCHES)} or 'none'")
    vers = versions()
    if "hf" in sides and not all(vers[k][0].isdigit() for k in ("transformers", "peft")):
        print("transformers/peft not importable: minipeft rows only", flush=True)
        sides = [s for s in sides if s != "hf"]
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    date = subprocess.run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"], capture_output=True, text=True).stdout.strip()
    res = dict(meta=dict(command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:] if argv is None
                                                      else [os.path.relpath(__file__)] + argv),
                         date=date, device_name=name, versions=vers, warmup=args.warmup, steps=args.steps,
                         quick=args.quick, cpu_threads=torch.get_num_threads()),
               shapes=shapes, methods=methods, rows=[])  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or ("cpu-quick" if args.quick else name.split()[-1].lower()) + "-" + date[:10]
    json_path, md_path = os.path.join(args.out, stem + ".json"), os.path.join(args.out, stem + ".md")

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
        with open(md_path, "w") as f:
            f.write(to_markdown(res))

    t0 = time.perf_counter()
    res["peak"] = matmul_peak(device, args.quick)
    print(f"bf16 matmul peak: {res['peak']['tflops']:.1f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        small = Env("tiny" if args.quick else "smollm2-135m", device, tmp)  # generation and swapping

        def run_extra(extra, fn):
            if extra not in extras:
                return
            try:
                res[extra] = fn()
            except Exception:  # noqa: BLE001
                res[extra + "_error"] = traceback.format_exc()[-2000:]
                print(res[extra + "_error"], flush=True)
            print(f"[{time.perf_counter() - t0:6.1f}s] {extra}: {res.get(extra)}", flush=True)
            free(device)
            save()

        run_extra("dequant", lambda: bench_dequant(device, args.quick))
        for shape in shapes:
            env = Env(shape, device, tmp)
            jobs = [(m, side, None) for m in methods for side in sides]
            jobs += [(m, SWITCHES[sw][0], sw) for m in methods for sw in switches if SWITCHES[sw][0] in sides]
            for method, side, lever in jobs:
                try:
                    row = train_row(env, side, method, args, lever)
                except Exception as e:  # noqa: BLE001  one failing row must not stop the others
                    row = dict(shape=shape, method=method, side=side, lever=lever,
                               error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")  # fmt: skip
                    free(device)
                res["rows"].append(row)
                brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                         if k not in ("profile", "error")}  # fmt: skip
                print(
                    f"[{time.perf_counter() - t0:6.1f}s] {brief}"
                    + (f" ERROR {row['error'].splitlines()[0][:300]}" if "error" in row else ""),
                    flush=True,
                )
                save()
            if os.path.isdir(env.hf_dir):  # 2.5 GB for the 1B shape: gone before the next shape
                import shutil

                shutil.rmtree(env.hf_dir)
        run_extra("generation", lambda: bench_generation(small, args))
        run_extra("swap", lambda: bench_swap(small, args))
    res["meta"]["wall_s"] = time.perf_counter() - t0
    save()
    print(to_markdown(res))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
