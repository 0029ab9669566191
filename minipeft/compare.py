"""`minipeft compare`: several methods on one model and one data set, with one budget; one table, one figure.

    minipeft compare                                   # every method on the bundled model and the Sonnets
    minipeft compare --methods lora,prefix --steps 30 --out runs/compare

Each method is exactly `minipeft finetune --method M` with its defaults (its measured learning rate, 60 steps,
the same batches and held-out set), run one after the other in this process. The table: trainable parameters,
memory, time per step, the held-out loss of the base model, at the start (step 0) and at the end, and the best
one. Memory is the peak the allocator measured on a GPU; on a CPU, where nothing measures it per run, it is the
bytes the run's training state takes: weights, plus gradients and AdamW's two moments of the trainable ones.
The figure (matplotlib, an optional extra; without it a hint) plots every method's held-out loss over the steps.
From Python, `minipeft.cli.main(["compare", ...])` returns the table's rows, {method: {trainable, memory_mib,
ms_per_step, base, before, after, best, curve}}; with --out, each run's metrics.json holds its whole history
(lesson 08 reads both).

How long: the default (seven methods x 60 steps on the bundled model) took 6.6 min on a 2-core CPU shared with other
jobs (load average 1.6 at its start, 2.8 at its end; `time minipeft compare --out /tmp/cmp`, 2026-11-30).
"""

import tempfile
from pathlib import Path

import torch

METHODS = {  # compare's names -> finetune's flags
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "dora": ["--method", "lora", "--dora"],
    "adapter": ["--method", "adapter"],
    "prefix": ["--method", "prefix"],
    "prompt": ["--method", "prompt"],
    "qlora": ["--method", "qlora"],
    "ia3": ["--method", "ia3"],
    "pissa": ["--method", "lora", "--init-lora-weights", "pissa"],
    "olora": ["--method", "lora", "--init-lora-weights", "olora"],
    "loftq": ["--method", "qlora", "--init-lora-weights", "loftq", "--no-double-quant"],
}


def compare(args):
    from .cli import build_parser, pick_device
    from .finetune import cmd_finetune

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"error: unknown --methods {unknown}; valid: {', '.join(METHODS)}")
    if args.out is not None and Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"error: --out {args.out} is not empty: choose a new folder")
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        rows = {}
        for m in methods:
            argv = ["finetune", *METHODS[m], "--model", args.model, "--data", args.data, "--device", device,
                    "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--no-samples",
                    "--out", str(root / m), *(["--steps", str(args.steps)] if args.steps else [])]  # fmt: skip
            run = build_parser().parse_args(argv)
            run.argv = argv
            print(f"\n=== {m}: minipeft {' '.join(argv)}")
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            metrics = cmd_finetune(run)
            rows[m] = summarize(metrics, device)
        print("\n" + table(rows, device))
        plot(rows, root / "compare.png" if args.out else None)
    return rows


def summarize(metrics, device):
    evals = metrics["eval"]
    trainable = metrics["trainable_params"]
    if device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:  # the training state: every weight, and the trainable ones' gradient and two AdamW moments
        memory = metrics["state_bytes"] / 2**20
    return dict(
        trainable=trainable,
        memory_mib=memory,
        ms_per_step=1000 * metrics["train_seconds"] / max(1, metrics["steps_run"]),
        base=metrics["base_loss"],
        before=metrics["before"],
        after=evals[-1]["val_loss"],
        best=metrics["best"],
        curve=[(e["step"], e["val_loss"]) for e in evals],
    )


def table(rows, device):
    memory = "peak MiB" if device.startswith("cuda") else "state MiB"
    lines = [f"| method | trainable | {memory} | ms/step | base | start | end | best (step) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m, r in rows.items():
        lines.append(
            f"| {m} | {r['trainable']:,} | {r['memory_mib']:.0f} | {r['ms_per_step']:.0f} | {r['base']:.4f} | "
            f"{r['before']:.4f} | {r['after']:.4f} | {r['best']['val_loss']:.4f} ({r['best']['step']}) |"
        )
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no figure: pip install matplotlib, or minipeft[lessons], to get compare.png)")
        return
    if path is None:
        print("(the figure is written with --out DIR: DIR/compare.png)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, r in rows.items():
        ax.plot(*zip(*r["curve"]), marker="o", label=m)
    ax.set(xlabel="optimizer step", ylabel="held-out loss", title="minipeft compare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
