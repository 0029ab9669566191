"""The `minipeft` command: finetune, generate, merge, export, quantize, compare, download.

    minipeft finetune                                  # LoRA on the bundled tiny-shakespeare: plays -> sonnets
    minipeft finetune --model smollm2-135m-instruct --data my.jsonl --method qlora --steps 500
    minipeft generate --model tiny-shakespeare --prompt "ROMEO:"
    minipeft generate --adapter runs/sonnets --prompt "Shall I"
    minipeft merge --adapter runs/sonnets --out merged/          # a plain HF-format model directory
    minipeft merge --adapter runs/sonnets --gguf merged.gguf     # one GGUF file for llama.cpp / Ollama
    minipeft export --adapter runs/sonnets --gguf lora.gguf      # the LoRA alone, as llama.cpp's adapter
    minipeft download smollm2-135m-instruct

Every argument is checked before the model is loaded, so a typo costs no time.

This file is the parser, the checks the commands share, and main(); the commands' bodies are in finetune.py,
compare.py and commands.py (generate, merge, export, quantize, download), imported when one runs.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from .registry import ASSETS

DEFAULT_DATA = ASSETS / "data" / "sonnets.txt"
METHODS = ("lora", "qlora", "full", "adapter", "prefix", "prompt", "ia3")
DEFAULT_BATCH = 8  # rows per micro-batch (and process); --global-batch sets it from the global batch instead
# The flags each method reads; any other method flag given with it is an error, not silently ignored.
LORA_FLAGS = ("r", "alpha", "dropout", "targets", "rslora", "dora", "lora_plus", "init_lora_weights")
METHOD_FLAGS = {
    "lora": LORA_FLAGS,
    "qlora": (*LORA_FLAGS, "blocksize", "no_double_quant"),
    "full": (),
    "adapter": ("bottleneck", "placement"),
    "prefix": ("virtual_tokens", "prefix_projection"),
    "prompt": ("virtual_tokens", "init_text"),
    "ia3": ("targets",),
}
FLAG_DEFAULTS = dict(r=8, alpha=16.0, dropout=0.0, targets="q_proj,v_proj", rslora=False, dora=False,
                     blocksize=64, no_double_quant=False, bottleneck=64, placement="houlsby", virtual_tokens=20,
                     prefix_projection=False, init_lora_weights="true")  # fmt: skip
# Defaults per method, from a measured sweep of learning rates (benchmarks/sweep_defaults.py; its tables are in
# benchmarks/README.md): 60 steps of each method at each lr, on the bundled model (CPU) and on SmolLM2-135M (H200)
# with the bundled Sonnets; the lr kept is the one whose last held-out loss is lowest relative to its start on both
# models (every default run ends below its start on both). QLoRA adapts every linear layer, as the QLoRA paper does.
METHOD_DEFAULTS = {
    "lora": dict(lr=3e-3, steps=60),  # q_proj, v_proj; also the best joint lr with --targets all-linear and --dora
    "qlora": dict(lr=1e-3, steps=60, targets="all-linear"),
    "full": dict(lr=1e-4, steps=60),
    "adapter": dict(lr=1e-3, steps=60),
    "prefix": dict(lr=1e-1, steps=60),  # a random prefix starts far above the base model (SmolLM2: 10.6 vs 4.6)
    "prompt": dict(lr=3e-1, steps=60),  # the paper's (Lester et al. 2021) learning rate, too
    "ia3": dict(lr=3e-2, steps=60, targets="k_proj,v_proj,down_proj"),  # PEFT's targets; down_proj scales its input
}
MIXED_BATCH_HELP = """\
several adapters on one base:
  minipeft generate --adapter a=runs/sonnets --adapter b=runs/other --use a --prompt "ROMEO:"
a mixed batch, one adapter per prompt ("__base__" = no adapter):
  minipeft generate --adapter a=runs/sonnets --adapter b=runs/other \\
      --prompt "ROMEO:" --prompt "JULIET:" --prompt "HAMLET:" --use a,b,__base__
"""


def positive_int(s):
    return checked(int, s, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(s):
    return checked(int, s, lambda v: v >= 0, "an integer >= 0")


def positive_float(s):
    return checked(float, s, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def nonneg_float(s):
    return checked(float, s, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def checked(kind, s, ok, valid):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {valid}, got {s!r}")
    return v


def build_parser():
    p = argparse.ArgumentParser(prog="minipeft", description="Parameter-efficient fine-tuning from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a model (LoRA on the bundled tiny model by default)")
    f.add_argument("--model", default="tiny-shakespeare", help="registered name, HF directory or .gguf file")
    f.add_argument("--data", default=str(DEFAULT_DATA),
                   help=".txt file/directory (packed), or .jsonl/.json (prompt/response, loss on the response)")  # fmt: skip
    f.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="prompt/response data: wrap each prompt in the model's chat template, as generate does "
                   "(auto: if the model has one)")  # fmt: skip
    f.add_argument("--method", default="lora", choices=METHODS)
    # Method flags default to None, so that a flag the chosen method does not use is an error (METHOD_FLAGS).
    g = f.add_argument_group("LoRA / DoRA / QLoRA")
    g.add_argument("--r", type=int, default=None, help="rank (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 16)")
    g.add_argument("--dropout", type=float, default=None, help="lora_dropout (default 0)")
    g.add_argument("--targets", default=None,
                   help="comma-separated names, 'all-linear', or a regex (default q_proj,v_proj; QLoRA all-linear)")  # fmt: skip
    g.add_argument("--rslora", action="store_true", default=None)
    g.add_argument("--dora", action="store_true", default=None)
    g.add_argument("--lora-plus", "--loraplus-ratio", dest="lora_plus", type=positive_float, default=None,
                   metavar="RATIO", help="LoRA+: lr of lora_B (and of 1-D weights) times RATIO, e.g. 16")  # fmt: skip
    g.add_argument("--init-lora-weights", default=None, metavar="INIT",
                   help="LoRA's start: true (B = 0), gaussian, pissa, pissa_niter_K, olora (the weight's principal "
                   "part, the base rewritten); with --method qlora also loftq (the 4-bit error partly cancelled)")  # fmt: skip
    g.add_argument("--blocksize", type=int, default=None, help="QLoRA: NF4 block size (default 64)")
    g.add_argument("--no-double-quant", action="store_true", default=None, help="QLoRA: keep absmax in float32")
    g = f.add_argument_group("adapters, prefix and prompt tuning")
    g.add_argument("--bottleneck", type=int, default=None, help="adapter: bottleneck size (default 64)")
    g.add_argument("--placement", default=None, help="adapter: houlsby | pfeiffer (default houlsby)")
    g.add_argument("--virtual-tokens", type=int, default=None, help="prefix/prompt: virtual tokens (default 20)")
    g.add_argument("--prefix-projection", action="store_true", default=None)
    g.add_argument("--init-text", default=None, help="prompt tuning: initialise the soft prompt from this text")
    g = f.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: per method, below)")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: per method, below)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="rows per micro-batch and process (default 8)")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--seq-len", type=positive_int, default=128)
    g.add_argument("--eval-every", type=nonneg_int, default=20)
    g.add_argument("--early-stop", type=positive_int, default=None, metavar="N",
                   help="stop after N evaluations without a new best held-out loss")  # fmt: skip
    g.add_argument("--save-every", type=nonneg_int, default=0)
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--grad-checkpoint", nargs="?", const="on", default=None, choices=["on", "offload"],
                   help="recompute blocks in backward: less memory; offload: keep each block's input in CPU memory "
                   "until then, as Unsloth's offloaded checkpointing (least GPU memory)")  # fmt: skip
    g.add_argument("--loss-chunk", type=positive_int, default=None, metavar="ROWS",
                   help="rows per chunk of the loss (default: ~256 MB of float32 logits); fewer: less memory")  # fmt: skip
    g.add_argument("--optimizer-in-backward", action="store_true",
                   help="step each parameter inside backward and free its gradient: less memory (full fine-tuning); "
                   "no gradient clipping, needs --grad-accum 1")  # fmt: skip
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile each block for training (faster on a GPU); MODE: a torch.compile mode, "
                   "e.g. reduce-overhead (adds CUDA graphs: fastest when every batch has one shape, as packed text)")  # fmt: skip
    f.add_argument("--out", default=None, help="run directory (default runs/<name>); must be new or empty")
    f.add_argument("--name", default=None, help="run name (default: <model>-<method>)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    f.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bf16 weights on CUDA) | float32 | bf16")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    f.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run (its run files are replaced)")  # fmt: skip
    f.add_argument("--no-samples", action="store_true", help="skip the before/after samples")
    g = f.add_argument_group("several processes (torch.distributed; also: torchrun --nproc_per_node N -m minipeft.cli)")
    g.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="train on N processes (one per GPU; gloo on CPU), launched through torchrun's API: "
                   "DDP for adapters, FSDP2 with --fsdp; --batch-size is per process")  # fmt: skip
    g.add_argument("--fsdp", action="store_true",
                   help="shard the weights (FSDP2; --method full, lora or qlora): every weight, gradient and AdamW "
                   "state; with lora/qlora the frozen base too (qlora: its 4-bit codes and their absmax)")  # fmt: skip
    g.add_argument("--global-batch", type=positive_int, default=None, metavar="G",
                   help="rows per optimizer step over all processes: --batch-size becomes G / (N x --grad-accum)")  # fmt: skip
    f.epilog = "defaults per method (measured: benchmarks/sweep_defaults.py):\n" + "\n".join(
        f"  {m:8s} " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in METHOD_DEFAULTS.items()
    )
    f.formatter_class = argparse.RawDescriptionHelpFormatter

    g = sub.add_parser(
        "generate",
        help="generate text, optionally with adapters",
        epilog=MIXED_BATCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--model", default=None, help="default: the adapter's base model, else tiny-shakespeare")
    g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR")
    g.add_argument("--use", default=None, help="adapter to use, or a comma list with one name per prompt")
    g.add_argument("--prompt", action="append", default=None)
    g.add_argument("--max-new-tokens", type=nonneg_int, default=100)
    g.add_argument("--temperature", type=nonneg_float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=positive_float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap each prompt as a user message in the model's chat template (auto: if it has one)")  # fmt: skip
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")

    m = sub.add_parser("merge", help="merge a LoRA/DoRA adapter into its base; save an HF model or a GGUF file")
    m.add_argument("--adapter", default=None, help="the adapter (without it, --model alone is written)")
    m.add_argument("--model", default=None, help="default: the adapter's base model")
    m.add_argument("--out", default=None, help="an HF model folder to write (new or empty)")
    m.add_argument("--gguf", default=None, help="a .gguf file to write instead, for llama.cpp / Ollama / LM Studio")
    m.add_argument("--outtype", default="f16", help="GGUF weights: f32 | f16 | bf16 | q8_0 (default f16)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing --gguf file, or write into a non-empty --out (only merge's files)")  # fmt: skip

    e = sub.add_parser("export", help="write a LoRA adapter as a llama.cpp adapter (GGUF), applied at run time")
    e.add_argument("--adapter", required=True)
    e.add_argument("--gguf", required=True, help="the adapter .gguf file to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")

    q = sub.add_parser("quantize", help="write an HF-format model with bitsandbytes-style NF4 weights")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True, help="a new or empty folder")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true")

    c = sub.add_parser("compare", help="several methods on one model and data, one budget: a table and a figure")
    c.add_argument("--model", default="tiny-shakespeare")
    c.add_argument("--data", default=str(DEFAULT_DATA))
    c.add_argument("--methods", default="full,lora,dora,adapter,prefix,prompt,qlora",
                   help="comma-separated, of: full, lora, dora, adapter, prefix, prompt, qlora, ia3, pissa, olora, loftq "
                   "(default: the first seven)")  # fmt: skip
    c.add_argument("--steps", type=positive_int, default=None, help="default: each method's finetune default")
    c.add_argument("--batch-size", type=positive_int, default=8)
    c.add_argument("--seq-len", type=positive_int, default=128)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", default=None, help="keep each run in <out>/<method>/ and the figure in <out>/compare.png")

    d = sub.add_parser("download", help="fetch and convert a registered model into the cache")
    d.add_argument("name")
    return p


# ------------------------------------------------------------------------ checks (finetune and commands.py share)


def pick_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but CUDA is not available here (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise SystemExit(f"error: unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def pick_dtype(dtype, device):
    table = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise SystemExit(f"error: unknown --dtype {dtype!r}; valid: auto, float32, bf16")
    return table[dtype]


def check_blocksize(blocksize):
    from .nf4 import BLOCKSIZES

    if blocksize not in BLOCKSIZES:
        raise SystemExit(f"error: --blocksize {blocksize} is not supported; valid: {list(BLOCKSIZES)}")


def writable_folder(out, flag, *, overwrite=False, resume=False, run=False):
    """Check an output folder before any work: not a file, writable, and new or empty unless a flag says
    otherwise. Returns the folder's entries that a run of ours wrote (for --overwrite)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {flag} {out} is a file, not a folder")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {out}: {parent} is not writable")
    entries = sorted(e.name for e in out.iterdir() if e.name != ".lock") if out.is_dir() else []
    if entries and not (overwrite or resume):
        hint = "pass --resume to continue it, or --overwrite to start afresh" if run else "or pass --overwrite"
        raise SystemExit(
            f"error: {flag} {out} is not empty ({', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}): "
            f"choose a new folder, {hint}"
        )


# ------------------------------------------------------- commands (their bodies: finetune, compare, commands.py)


def cmd_compare(args):
    from .compare import compare

    return compare(args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command, written into the run directory
    from .commands import cmd_download, cmd_export, cmd_generate, cmd_merge, cmd_quantize
    from .finetune import cmd_finetune

    command = {
        "finetune": cmd_finetune,
        "generate": cmd_generate,
        "merge": cmd_merge,
        "export": cmd_export,
        "quantize": cmd_quantize,
        "compare": cmd_compare,
        "download": cmd_download,
    }[args.command]
    from .train import NonFiniteLossError

    try:
        return command(args)
    except (ValueError, OSError, KeyError, ImportError, NonFiniteLossError) as e:  # clear errors: no traceback
        # (OSError: a missing file, a full disk, a folder in use; ImportError: an optional extra not installed)
        if os.environ.get("MINIPEFT_DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from None


def console():
    """The `minipeft` command (pyproject's entry point): exit status 0 after a run. main() returns the run's results
    to Python callers; the entry-point wrapper would pass them to sys.exit, which prints them and exits 1."""
    main()


if __name__ == "__main__":
    console()
