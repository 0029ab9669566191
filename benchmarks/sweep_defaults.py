"""Per-method default learning rates, measured (issue 21, "defaults that fit").

    python benchmarks/sweep_defaults.py --model tiny-shakespeare --device cpu --name tiny-cpu     # every method
    python benchmarks/sweep_defaults.py --model smollm2-135m.gguf --device cuda --name smollm2-h200
    python benchmarks/sweep_defaults.py --pick benchmarks/results/sweep-tiny-cpu.json benchmarks/results/sweep-smollm2-h200.json
    python benchmarks/sweep_defaults.py --quick --out /tmp/sweep                                  # smoke run (CPU)

Each run is `minipeft finetune --method M --lr LR` with every other default: its arguments come from the CLI's
own parser, method_args (FLAG_DEFAULTS) and build_peft_config; the model from load_pretrained with the CLI's dtype
rule (float32 on CPU; bf16 weights on CUDA, full fine-tuning float32); the data from load_dataset(sonnets, seq_len
128, chat="auto"); QLoRA quantizes after loading (NF4, blocksize 64, double quant); torch.manual_seed(0) before
loading, as the CLI (the adapter's initial weights come from the global RNG). Two differences, neither changing
a weight: evaluations every 10 steps (the CLI: 20) and the training loss logged every step. Evaluation draws no
random number and runs in eval mode, so the last held-out loss is the one `minipeft finetune` prints.

What the sweep's names run (the CLI has one default lr per --method, so lora, lora_all and dora share one):
    lora      --method lora                        (r 8, alpha 16, q_proj,v_proj)
    lora_all  --method lora --targets all-linear
    qlora     --method qlora --targets all-linear  (as users run QLoRA)
    dora      --method lora --dora
    adapter   --method adapter                     (Houlsby, bottleneck 64)
    prefix    --method prefix / prompt --method prompt   (20 virtual tokens)
    full      --method full

The pick (--pick FILE ...): runs are keyed by (model, method, lr); for each method, among the lrs tried on every
model, those whose last held-out loss is below its step-0 loss on every model; of those, the lowest mean of
last / before over the models. A method with no such lr gets none: widen its grid rather than take the least bad.
"before" is the adapted model at step 0; "base" is the base model alone. They differ for QLoRA (4-bit) and for
prefix/prompt tuning (random virtual tokens raise the loss): there last < before can still be above the base.
"""

import argparse
import datetime
import gc
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from minipeft import cli, finetune  # noqa: E402  (the finetune command's parser, defaults and method configs)
from minipeft.files import read_json, write_json  # noqa: E402

VARIANTS = {  # sweep name -> the `minipeft finetune` flags that make it
    "lora": ["--method", "lora"],
    "lora_all": ["--method", "lora", "--targets", "all-linear"],
    "qlora": ["--method", "qlora", "--targets", "all-linear"],
    "dora": ["--method", "lora", "--dora"],
    "adapter": ["--method", "adapter"],
    "prefix": ["--method", "prefix"],
    "prompt": ["--method", "prompt"],
    "full": ["--method", "full"],
    "ia3": ["--method", "ia3"],
}
ADAPTER_LRS = [1e-4, 3e-4, 1e-3, 3e-3]  # half-decade steps around the old 2e-3
GRIDS = {m: ADAPTER_LRS for m in ("lora", "lora_all", "qlora", "dora", "adapter")}
GRIDS |= {"prefix": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "prompt": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}  # soft tokens: higher
GRIDS["full"] = [1e-5, 3e-5, 1e-4, 3e-4]  # every weight moves: lower
GRIDS["ia3"] = [1e-3, 3e-3, 1e-2, 3e-2]  # scales around 1 with few parameters: higher
QUICK = dict(model="tiny-shakespeare", methods="lora,prompt", lrs="1e-3,3e-3", steps=3, eval_every=1, threads=1)


def finetune_args(method, lr, a):
    """The parsed `minipeft finetune` command for this run, defaults filled in exactly as the CLI does."""
    argv = ["finetune", *VARIANTS[method], "--model", a.model, "--data", a.data, "--device", a.device,
            "--lr", repr(lr), "--eval-every", str(a.eval_every), "--seed", "0"]  # fmt: skip
    argv += ["--steps", str(a.steps)] if a.steps else []  # else the CLI's steps for the method
    args = cli.build_parser().parse_args(argv)
    finetune.method_args(args)
    args.batch_size = args.batch_size or cli.DEFAULT_BATCH  # as finetune without --global-batch
    return args


def run_one(method, lr, a):
    from minipeft.checkpoint import load_pretrained
    from minipeft.data import load_dataset
    from minipeft.nf4 import quantize_model
    from minipeft.peft import get_peft_model
    from minipeft.train import NonFiniteLossError, TrainConfig, evaluate, train

    args = finetune_args(method, lr, a)
    config = finetune.build_peft_config(args)
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device) if args.method != "full" else torch.float32  # the CLI's rule
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       warmup_ratio=0.05, eval_every=args.eval_every, eval_batches=20, max_grad_norm=1.0,
                       seed=args.seed, log_every=1, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=device)
    train_data, val_data = load_dataset(args.data, tokenizer, args.seq_len, chat="auto")
    row = dict(method=method, lr=lr, flags=VARIANTS[method], steps=args.steps)
    # The base model's own held-out loss (dense, no adapter; evaluation draws no random number): step 0 equals it
    # for LoRA, DoRA, adapters and full, but not for 4-bit QLoRA, nor prefix/prompt (random virtual tokens).
    row["base"], _ = evaluate(model, val_data, args.batch_size, 20, device=device, bf16=device.startswith("cuda"))
    if args.method == "qlora":
        model = quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if config is not None:
        model = get_peft_model(model, config, tokenizer=tokenizer)
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        metrics = train(model, train_data, val_data, tcfg)
    except NonFiniteLossError as e:  # a too-high lr: recorded, and it cannot be picked
        metrics = {"eval": [], "train": [], "error": str(e)}
    evals = [{"step": e["step"], "val_loss": e["val_loss"]} for e in metrics["eval"]]
    row.update(before=evals[0]["val_loss"] if evals else None, last=evals[-1]["val_loss"] if evals else None,
               best=metrics.get("best"), eval=evals, train=[{"step": e["step"], "loss": e["loss"]} for e in
               metrics["train"]], seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
    if "error" in metrics:
        row["error"] = metrics["error"]
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def machine(device):
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu or platform.processor() or "cpu"
    return dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                device=device, device_name=name, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())  # fmt: skip


def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def table(runs):
    lines = [
        "| method | lr | base | before | best (step) | last | last - before | trainable | s |",
        "|---|---:|" + "---:|" * 7,
    ]
    for r in runs:
        best = r["best"] and f"{r['best']['val_loss']:.4f} ({r['best']['step']})"
        diff = None if r["last"] is None else r["last"] - r["before"]
        lines.append(f"| {r['method']} | {r['lr']:g} | {fmt(r.get('base'))} | {fmt(r['before'])} | {best or '-'} | "
                     f"{fmt(r['last'])} | {fmt(diff, '+.4f')} | {r['trainable_params']:,d} | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def sweep(a, argv):
    methods = a.methods.split(",")
    if unknown := [m for m in methods if m not in VARIANTS]:
        raise SystemExit(f"error: unknown --methods {unknown}; valid: {', '.join(VARIANTS)}")
    device = cli.pick_device(a.device)
    res = dict(command=shlex.join(["python", "benchmarks/sweep_defaults.py", *argv]), machine=machine(device),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=a.model,
               data=a.data, steps=a.steps, eval_every=a.eval_every, runs=[])  # fmt: skip
    out = Path(a.out) / f"sweep-{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for m in methods:
        for lr in [float(x) for x in a.lrs.split(",")] if a.lrs else GRIDS[m]:
            row = run_one(m, lr, a)
            res["runs"].append(row)
            write_json(out, res, indent=1)  # after every run: a stopped sweep keeps what it measured
            print(f"{m} lr {lr:g}: before {fmt(row['before'])} -> last {fmt(row['last'])} ({row['seconds']:.1f}s)",
                  flush=True)  # fmt: skip
    md = f"# Learning-rate sweep: {a.model}, {a.steps or 'default'} steps\n\n`{res['command']}`\n\n{table(res['runs'])}\n"
    out.with_suffix(".md").write_text(md)
    print(f"\n{table(res['runs'])}\n\nwrote {out}")
    return res


def choose(runs, models, variants):
    """-> (lr, score) for these variants together (see the module docstring), or (None, None)."""
    tried = [{lr for (mo, me, lr) in runs if mo == m and me == v} for m in models for v in variants]
    ok = [lr for lr in sorted(set.intersection(*tried)) if all(
          runs[m, v, lr]["last"] is not None and runs[m, v, lr]["last"] < runs[m, v, lr]["before"]
          for m in models for v in variants)]  # fmt: skip
    scores = {lr: sum(runs[m, v, lr]["last"] / runs[m, v, lr]["before"] for m in models for v in variants)
              / (len(models) * len(variants)) for lr in ok}  # fmt: skip
    return min(scores.items(), key=lambda kv: kv[1]) if scores else (None, None)


def cell(r):  # "before -> last", and the base model's loss where step 0 is not the base (QLoRA, prefix, prompt)
    base = r.get("base")
    far = base is not None and abs(base - r["before"]) > 5e-4
    return f"{r['before']:.4f} -> {r['last']:.4f}" + (f" (base {base:.4f})" if far else "")


def pick(paths):
    """Read the sweeps (one or more per model), print and return {method: recommended lr or None}."""
    runs = {}  # (model, method, lr) -> run; a later file's run replaces an earlier one's
    for p in paths:
        res = read_json(p, expect=dict)
        runs |= {(res["model"], r["method"], r["lr"]): r for r in res["runs"]}
    models = sorted({m for m, _, _ in runs})
    methods = [m for m in VARIANTS if any(me == m for _, me, _ in runs)]
    head = " | ".join(f"{Path(m).name}: before -> last" for m in models)
    lines = [
        f"| method | picked lr | {head} | mean last/before | CLI default now |",
        "|---|---:|" + "---|" * len(models) + "---:|---:|",
    ]
    picks = {}
    for me in methods:
        if not all(any(mo == m and v == me for mo, v, _ in runs) for m in models):
            print(f"{me}: not run on every model, skipped")
            continue
        lr, score = choose(runs, models, [me])
        picks[me] = lr
        cells = " | ".join("-" if lr is None else cell(runs[m, me, lr]) for m in models)
        now = cli.METHOD_DEFAULTS[VARIANTS[me][1]]["lr"]
        lines.append(f"| {me} | {'none' if lr is None else f'{lr:g}'} | {cells} | {fmt(score)} | {now:g} |")
    print("\n".join(lines))
    by_cli = {}  # one default per `minipeft finetune --method`: lora stands for lora, lora_all and dora
    for me in picks:
        by_cli.setdefault(VARIANTS[me][1], []).append(me)
    for flag, variants in by_cli.items():
        if len(variants) > 1:
            lr, score = choose(runs, models, variants)
            print(f"--method {flag} ({', '.join(variants)} together): {'none' if lr is None else f'lr {lr:g}'}"
                  f"{'' if score is None else f', mean last/before {score:.4f}'}")  # fmt: skip
    return picks


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="registered name, HF directory or .gguf file (tiny-shakespeare)")
    ap.add_argument("--data", default=str(cli.DEFAULT_DATA))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--steps", type=int, default=None, help="default: the CLI's for the method")
    ap.add_argument("--eval-every", type=int, default=None, help="default 10")
    ap.add_argument("--methods", default=None, help=f"default: all, {','.join(VARIANTS)}")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs for every method (default: a grid per method)")
    ap.add_argument("--name", default=None, help="writes <out>/sweep-<name>.json and .md")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's); 1 on a CPU shared with other work is faster")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 2 lrs, 3 steps, the tiny model")
    ap.add_argument("--pick", nargs="+", metavar="JSON", help="recommend an lr per method from these sweeps")
    a = ap.parse_args(argv)
    if a.pick:
        return pick(a.pick)
    defaults = dict(model="tiny-shakespeare", methods=",".join(VARIANTS), eval_every=10, name=None)
    defaults |= dict(QUICK, name="quick") if a.quick else {}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.name is None:
        raise SystemExit("error: --name is needed (the result is written to <out>/sweep-<name>.json)")
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads or threads)
    try:
        return sweep(a, argv)
    finally:
        torch.set_num_threads(threads)  # as it was: main() may run inside another program (the tests)


if __name__ == "__main__":
    main()
