"""The measuring half of the fine-tuning benchmark: one row per (shape, method), every contender in it.

A contender (contenders.py) builds a Trainee for a (shape, method): the model and one training step,
    step = forward with labels under bf16 autocast -> loss.backward() -> AdamW.step() -> zero_grad(set_to_none)
measure() runs `warmup` steps, then `steps` timed ones:
    step time    CUDA events around each step on a GPU (no sync inside the loop), perf_counter on a CPU; median
    tokens/s     B * T / step time (prompt tuning's virtual tokens are extra work, not tokens)
    peak GiB     torch.cuda.max_memory_allocated over the steps, the counter reset after the trainee is built:
                 weights + gradients + optimizer states + activations, not the transient of building/quantizing
    MFU          model FLOPs of a step (step_flops) / step time / the bf16 matmul rate measured in the same run
    first step   seconds, synchronized: the compile of the compiled contenders is in it
With --profile, two more steps (JSON only): one under torch.profiler (profile_step: the GPU's busy share, top
kernels), one with the allocator's history on (memory_peak: what that step made that is alive at its peak, by
the frame that made it).
Parity: the contenders of a row must train as many parameters and start from the same loss to 3 decimals
(|a - b| <= LOSS_TOL: rounding both would fail on a boundary), i.e. compute the same function on the same
weights and batch. A row that breaks this, or where a contender raised, is failed: its numbers stay in the JSON,
the markdown prints FAILED where the ratios were, and bench_finetune.py exits 1.
"""

import gc
import json
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHAPES = {  # name -> model config (random weights, seed 0, tied embeddings), batch, sequence length
    "smollm2-135m": dict(  # SmolLM2-135M
        cfg=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
        batch=8, seq=512),
    "llama-1b": dict(  # the Llama-3.2-1B shape
        cfg=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
        batch=4, seq=1024),
    "llama-7b": dict(  # the Llama-2-7B shape (untied embeddings): memory rows (QLoRA against Unsloth)
        cfg=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, tie_word_embeddings=False,
                 max_position_embeddings=4096),
        batch=1, seq=512),
    "tiny": dict(  # --quick
        cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
        batch=2, seq=32),
}  # fmt: skip
SHAPES["llama-7b-4k"] = dict(SHAPES["llama-7b"], seq=4096, weights="llama-7b")  # the same base, longer rows
COMMON = dict(tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)  # a shape's cfg overrides


def model_config(shape):
    """The keyword arguments of a shape's model config (minipeft's ModelConfig and transformers' LlamaConfig)."""
    return {**COMMON, **SHAPES[shape]["cfg"]}


METHODS = ["full", "lora_qv", "lora_all", "qlora", "prefix", "prompt", "adapter", "ia3"]
R, ALPHA, P, BOTTLENECK = 16, 32, 20, 64  # LoRA rank and alpha, virtual tokens, adapter bottleneck
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # but lm_head
LORA_TARGETS = {"lora_qv": ["q_proj", "v_proj"], "lora_all": ALL_LINEAR, "qlora": ALL_LINEAR}  # for named-list APIs
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]  # PEFT's IA3 targets for Llama (down_proj: its input scaled)
DTYPE = torch.bfloat16
LOSS_TOL = 2e-4  # relative: bf16 steps of one model agree to ~1e-4 of the loss (1B prefix: 0.00101 at 12.15)
REFERENCE = ("hf", "hf_bnb")  # the "x HF" ratios divide by the first present: HF as shipped, bitsandbytes for QLoRA


@dataclass
class Trainee:
    """What a builder returns: the model, one training step (it returns the loss), the trained parameters."""

    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    params: list


def emit(res, out=None):
    """One result: a RESULT line on stdout, and a JSON line appended to `out` (a .jsonl file) when given."""
    print("RESULT " + json.dumps(res), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def now(device):  # a CUDA event recorded on the stream (read after the loop) on a GPU, the host clock on a CPU
    if device.type != "cuda":
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def ms(a, b):
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else 1e3 * (b - a)


def time_fn(fn, device, warmup, reps):
    """Median milliseconds of fn(), synchronized around each call, after warm-up."""
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


def matmul_peak(device, quick):  # MFU's denominator: the bf16 rate of an 8192^3 product on this device
    n = 512 if quick else 8192
    a, b = (torch.randn(n, n, device=device, dtype=DTYPE) for _ in range(2))
    t = time_fn(lambda: a @ b, device, 3, 3 if quick else 20)
    return dict(n=n, ms=t, tflops=2 * n**3 / (t / 1e3) / 1e12)


def step_flops(cfg, B, T, method):
    """Model FLOPs of a step: 2 per weight per token forward, 2 backward for the input gradients, 2 more for
    trained weights (LoRA and adapter matmuls included); causal attention as half the square (prefix: plus P
    keys; prompt: T + P positions). Norms, rotary, softmax and the optimizer are not counted."""
    D, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    Hd, Kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q_proj": (D, Hd), "k_proj": (D, Kd), "v_proj": (D, Kd), "o_proj": (Hd, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}  # fmt: skip
    n_lin = L * sum(i * o for i, o in shapes.values()) + D * V  # the linears, lm_head included
    Tq, past = T + P * (method == "prompt"), P * (method == "prefix")
    attn = L * B * 4 * Hd * (Tq * past + Tq * (Tq + 1) / 2)  # QK^T and PV: 2 * Hd each per (query, key)
    tokens = B * Tq
    weights = {"full": 2 * tokens * n_lin, "adapter": 6 * tokens * L * 2 * 2 * D * BOTTLENECK}.get(method, 0.0)
    if method in ("lora_qv", "lora_all", "qlora"):  # A and B: forward, dx, dW
        names = ("q_proj", "v_proj") if method == "lora_qv" else tuple(shapes)
        weights = 6 * tokens * L * sum(R * sum(shapes[n]) for n in names)
    return (2 * tokens * n_lin + attn) + (2 * tokens * n_lin + 2 * attn) + weights  # forward + dx + dW


def profile_step(step, device):
    """One more step under torch.profiler (host and GPU): the GPU's busy share of the wall time, how many kernels
    it ran, its copies and fills (count, ms), the host's runtime calls (launches, graph launches, copies: count,
    ms), the top 12 kernels and the top 12 host operations by their own time (dynamo's guard checks, graph
    replays, Python around them): where a host-bound step spends its time. [ms, name, count] rows."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
        t = time.perf_counter()
        step()
        sync(device)
        wall = 1e3 * (time.perf_counter() - t)
    out = step_anatomy(prof.key_averages())
    return dict(wall_ms=wall, gpu_busy=out["kernel_ms"] / wall, **out)


def step_anatomy(averages, top=12):
    """profile_step's summary of a profiler's key_averages(): the GPU's rows (kernels, copies, fills: their own
    time) and the host's (operations and runtime calls: their own time), as [ms, name, count] rows, most first."""
    rows = lambda on, attr: sorted(  # noqa: E731  (microseconds -> ms)
        ([getattr(e, attr) / 1e3, e.key[:110], e.count] for e in averages if (e.device_type.name == "CPU") == on
         and getattr(e, attr) > 0), reverse=True)  # fmt: skip
    device, host = rows(False, "self_device_time_total"), rows(True, "self_cpu_time_total")
    copies = [r for r in device if r[1].startswith(("Memcpy", "Memset"))]
    kernels = [r for r in device if r not in copies]
    runtime = [r for r in host if r[1].startswith("cu")]  # cudaLaunchKernel, cudaGraphLaunch, cudaMemcpyAsync, ...
    return dict(
        kernel_ms=sum(r[0] for r in device),
        launches=sum(r[2] for r in kernels),
        copies=copies,
        runtime=runtime[:top],
        top=kernels[:top],
        top_host=[r for r in host if r not in runtime][:top],
    )


def memory_peak(step, device, top=15):
    """One more step with the CUDA allocator's history on: what was allocated during it and still alive at its
    peak, summed by where it was made (peak_breakdown)."""
    sync(device)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    try:
        step()
        sync(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_breakdown(snapshot["device_traces"][device.index or 0], top)


def _maker(frames):  # the innermost frame outside torch's own files: ours, HF's, Unsloth's or compiled code
    for f in frames:
        name = f["filename"]
        if "/torch/" not in name or "torchinductor" in name:
            return f"{'/'.join(name.split('/')[-2:])}:{f['line']} {f['name']}"
    return "torch" if frames else "?"


def peak_breakdown(trace, top=15):
    """The allocator's trace of one step (events alloc / free_requested / free_completed with addr, size, frames)
    -> the bytes alive at the highest point, counted from the step's start (tensors that existed before, like
    the weights, are not in it), and those bytes by _maker: {"peak_mib", "top": [[MiB, count, maker], ...]}."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(trace):  # pass 1: where the peak is
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])
    live = {}
    for e in trace[: peak_at + 1]:  # pass 2: what is alive there
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    by = {}
    for e in live.values():
        maker = _maker(e.get("frames", []))
        size, count = by.get(maker, (0, 0))
        by[maker] = (size + e["size"], count + 1)
    ranked = sorted(((s / 2**20, n, k) for k, (s, n) in by.items()), reverse=True)[:top]
    return dict(peak_mib=peak / 2**20, top=[[round(s, 1), n, k] for s, n, k in ranked])


def measure(trainee, device, warmup, steps, profile=False):
    params = trainee.params
    out = dict(pid=os.getpid(), trainable_params=sum(p.numel() for p in params),
               trainable_dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}))  # fmt: skip
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        out["static_mem_gib"] = torch.cuda.memory_allocated() / 2**30  # the weights, before step 1
    losses, marks = [], []
    for i in range(warmup + steps):
        t0, start = time.perf_counter(), now(device)
        losses.append(trainee.step())
        marks.append((start, now(device)))
        if i == 0:
            sync(device)
            out["first_step_s"] = time.perf_counter() - t0
    sync(device)
    out.update(step_ms=statistics.median(ms(a, b) for a, b in marks[warmup:]), loss_first=float(losses[0]),
               loss_last=float(losses[-1]))  # fmt: skip
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for key, fn in (("memory_peak", memory_peak), ("profile", profile_step)):
            try:  # a profiler problem must not lose the row
                out[key] = fn(trainee.step, device) if profile else None
            except Exception as e:  # noqa: BLE001
                out[key] = f"failed: {type(e).__name__}: {e}"[:300]
    return out


def parity(results):
    """Why the contenders of a row do not compute the same thing ([] when they do)."""
    why = [f"{n}: {r['error'].splitlines()[0][:200]}" for n, r in results.items() if "error" in r]
    ok = {n: r for n, r in results.items() if "error" not in r}
    counts, losses = ({n: r[k] for n, r in ok.items()} for k in ("trainable_params", "loss_first"))
    if len(set(counts.values())) > 1:
        why.append(f"trainable parameters differ: {counts}")
    spread = max(losses.values()) - min(losses.values()) if losses else 0.0
    if spread > LOSS_TOL * max(map(abs, losses.values()), default=0.0) or not all(map(math.isfinite, losses.values())):
        why.append(f"step-1 losses differ by more than {LOSS_TOL:g} of the loss: {losses}")
    return why


def measure_one(env, method, name, build, warmup, steps, profile):
    """One contender built, measured and freed: measure()'s result, {"error": ...}, or None (a method it does
    not cover)."""
    torch.compiler.reset()  # fresh caches: past 8 variants of the one Block.forward dynamo silently runs eager
    free(env.device)
    left = torch.cuda.memory_allocated() / 2**30 if env.device.type == "cuda" else 0.0
    if left > 0.05:  # a contender before this one did not free its model: this one's peak counts it too
        print(f"WARNING {env.shape} {method} {name}: {left:.2f} GiB still allocated before it is built")
    try:
        trainee = build(env, method)  # None: a method this contender does not cover (hf_bnb: QLoRA only)
        if trainee is None:
            return None
        return dict(measure(trainee, env.device, warmup, steps, profile), leftover_gib=left)
    except Exception as e:  # noqa: BLE001  one failing contender must not stop the others
        return dict(error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")


def fastest(runs):
    """A contender's rounds -> one result: the first error if a round failed, else the fastest round, with every
    round's step time (rounds_ms) and the highest peak of them."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    peaks = [r["peak_mem_gib"] for r in runs if r.get("peak_mem_gib") is not None]
    best = min(runs, key=lambda r: r["step_ms"])
    return dict(best, rounds_ms=[r["step_ms"] for r in runs], **({"peak_mem_gib": max(peaks)} if peaks else {}))


def run_row(env, method, contenders, warmup, steps, profile=False, measured_apart=None, rounds=1):
    """One (shape, method): each contender built, measured and freed in turn, then the parity check over them and
    `measured_apart` (contender -> the result measure() gave in another process: see bench_finetune.py --apart).
    rounds > 1: the contenders are measured that many times, the order reversed every other round, and each keeps
    its fastest round (host-bound steps, as at the 135M shape, moved by 30% between processes: the order and
    the host's state, not the library), with every round's step time in `rounds_ms` and the highest peak."""
    B, T = SHAPES[env.shape]["batch"], SHAPES[env.shape]["seq"]
    row = dict(shape=env.shape, method=method, batch=B, seq=T, flops_per_step=step_flops(env.cfg, B, T, method))
    row["results"] = results = dict(measured_apart or {})
    runs, names = {}, list(contenders)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            r = measure_one(env, method, name, contenders[name], warmup, steps, profile)
            if r is not None:
                runs.setdefault(name, []).append(r)
    results.update({name: fastest(rs) for name, rs in runs.items()})
    for r in results.values():
        if "step_ms" in r and "tokens_per_s" not in r:
            r.update(tokens_per_s=B * T / r["step_ms"] * 1e3, tflops=row["flops_per_step"] / r["step_ms"] / 1e9)
    row["failed"] = parity(results)
    return row


def markdown(res):
    """The run's header and a table per shape: one line per (method, contender), ratios against REFERENCE."""
    m, peak = res["meta"], res["peak"]["tflops"]
    rounds = (
        f", each contender's fastest of {m['rounds']} rounds in alternating order" if m.get("rounds", 1) > 1 else ""
    )
    lines = [f"# Fine-tuning benchmark: {m['device_name']}, {m['date']}", "", f"Command: `{m['command']}`  ",
             ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ",
             f"bf16 matmul peak {peak:.0f} TFLOP/s; {m['warmup']} warm-up + {m['steps']} timed steps per contender, "
             f"medians{rounds}; x HF: against `hf` (`hf_bnb` for QLoRA) in this run; x best: against the fastest anchor of "
             "the row (every contender not minipeft's), mem x best: against the anchor with the lowest peak.", ""]  # fmt: skip
    fmt = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731
    for shape in res["shapes"]:
        lines += [f"## {shape} (batch {SHAPES[shape]['batch']} x {SHAPES[shape]['seq']} tokens)", "",
                  "| method | contender | tok/s | x HF | x best | peak GiB | mem x HF | mem x best | MFU | trainable | "
                  "loss step 1 | first step s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in (r for r in res["rows"] if r["shape"] == shape):
            meth, results = row["method"], row["results"]
            ok = {n: r for n, r in results.items() if "step_ms" in r}
            ref = next((ok[n] for n in REFERENCE if n in ok), None)
            anchors = [r for n, r in ok.items() if not n.startswith("minipeft")]
            best = {
                "tokens_per_s": max((a["tokens_per_s"] for a in anchors), default=None),
                "peak_mem_gib": min((a["peak_mem_gib"] for a in anchors if a.get("peak_mem_gib")), default=None),
            }
            for name, r in results.items():
                if "error" in r:
                    lines.append(f"| {meth} | {name} | error: `{r['error'].splitlines()[0][:120]}` |")
                    continue
                x = {k: ["FAILED" if row["failed"] else fmt(by and r.get(k) and r[k] / by) for by in (ref and ref.get(k), best[k])]
                     for k in best}  # fmt: skip
                lines.append(f"| {meth} | {name} | {r['tokens_per_s']:,.0f} | {x['tokens_per_s'][0]} | "
                             f"{x['tokens_per_s'][1]} | {fmt(r.get('peak_mem_gib'))} | {x['peak_mem_gib'][0]} | "
                             f"{x['peak_mem_gib'][1]} | {100 * r['tflops'] / peak:.1f}% | {r['trainable_params']:,d} | "
                             f"{r['loss_first']:.3f} | {r['first_step_s']:.1f} |")  # fmt: skip
            if row["failed"]:
                lines.append(f"| {meth} | **FAILED** | {'; '.join(row['failed'])[:400]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def write(res, stem, markdown=markdown):
    """<stem>.json (everything) and <stem>.md."""
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
