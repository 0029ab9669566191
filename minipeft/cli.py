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
"""

import argparse
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
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


# ----------------------------------------------------------------------------------------------- helpers


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


def resolve_adapter_dir(path):
    """Accept a run directory (runs/x) as well as the adapter directory inside it (runs/x/adapter)."""
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if not (p / "adapter_config.json").is_file():
        raise SystemExit(f"error: {path} holds no adapter_config.json (nor adapter/adapter_config.json)")
    return p


def base_model_of(adapter_dir):
    """The base model an adapter names: a registered name, or a path (a relative one is tried from the current
    folder, then from the adapter's folder); an error (pass --model) if it names none or one not found."""
    from .checkpoint import REGISTRY
    from .files import read_json

    base = read_json(Path(adapter_dir) / "adapter_config.json", expect=dict).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise SystemExit(
            f"error: the adapter in {adapter_dir} names no base model (base_model_name_or_path): pass --model"
        )
    if base in REGISTRY or Path(base).exists():
        return base
    beside = Path(adapter_dir) / base
    if beside.exists():
        return str(beside)
    raise SystemExit(
        f"error: the adapter's base model {base!r} (base_model_name_or_path in {adapter_dir}) is not found from "
        "here: pass --model"
    )


def model_path(name):  # where a model named on the command line lives on disk (None: not a local path)
    from .checkpoint import REGISTRY, minipeft_home

    if Path(name).exists():
        return Path(os.path.realpath(name))
    if name in REGISTRY:
        return Path(os.path.realpath(ASSETS / name if REGISTRY[name] is None else minipeft_home() / "models" / name))
    return None


def method_args(args):
    """Refuse method flags the chosen method does not read (e.g. --dora with prefix), then fill in defaults."""
    used = METHOD_FLAGS[args.method]
    given = [k for ks in METHOD_FLAGS.values() for k in ks if getattr(args, k) is not None]
    wrong = sorted({f"--{k.replace('_', '-')}" for k in given if k not in used})
    if wrong:
        valid = ", ".join(f"--{k.replace('_', '-')}" for k in used) or "none"
        raise SystemExit(f"error: {', '.join(wrong)} do(es) not apply to --method {args.method} (its flags: {valid})")
    if args.init_text is not None and not args.init_text.strip():
        raise SystemExit("error: --init-text is empty; give a text, or leave the flag out for a random init")
    for k, v in {**FLAG_DEFAULTS, **METHOD_DEFAULTS[args.method]}.items():  # the method's own defaults first
        if getattr(args, k) is None:
            setattr(args, k, v)


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


def lora_init(args):
    """--init-lora-weights as LoraConfig's (init_lora_weights, loftq_config). LoftQ quantizes the bases itself (NF4,
    blocks of 64, no double quantization, as PEFT's loftq_init), so it comes with --method qlora only."""
    init = {"true": True, "false": False}.get(str(args.init_lora_weights).lower(), args.init_lora_weights)
    if init != "loftq":
        return init, {}
    if args.method != "qlora" or args.blocksize != 64 or not args.no_double_quant:
        raise SystemExit(
            "error: --init-lora-weights loftq quantizes the base itself: use it with --method qlora, --blocksize 64 "
            f"and --no-double-quant (got --method {args.method}, --blocksize {args.blocksize}, "
            f"--no-double-quant {bool(args.no_double_quant)})"
        )
    from .loftq import LoftQConfig

    return init, LoftQConfig(loftq_bits=4, loftq_iter=1)


def build_peft_config(args):
    """The method's config from the command line (validated here, before any loading); None for full."""
    from .lora import LoraConfig

    base = os.path.realpath(args.model) if Path(args.model).exists() else args.model  # usable from any folder
    if args.method == "full":
        return None
    if args.method in ("lora", "qlora"):
        targets = args.targets
        targets = (
            targets if targets == "all-linear" or any(c in targets for c in "\\()[]*+?|^$") else targets.split(",")
        )
        init, loftq = lora_init(args)
        return LoraConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=targets,
            use_rslora=args.rslora,
            use_dora=args.dora,
            init_lora_weights=init,
            loftq_config=loftq,
            base_model_name_or_path=base,
        )
    if args.method == "adapter":
        from .adapter import AdapterConfig

        return AdapterConfig(bottleneck_size=args.bottleneck, placement=args.placement, base_model_name_or_path=base)
    if args.method == "prefix":
        from .prefix import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, prefix_projection=args.prefix_projection,
                                  base_model_name_or_path=base)  # fmt: skip
    if args.method == "ia3":
        from .ia3 import IA3Config

        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        feedforward = [t for t in targets if t in ("down_proj", "mlp.down_proj")] if isinstance(targets, list) else None
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, base_model_name_or_path=base)
    from .prompt import PromptTuningConfig

    init = "TEXT" if args.init_text else "RANDOM"
    return PromptTuningConfig(num_virtual_tokens=args.virtual_tokens, prompt_tuning_init=init,
                              prompt_tuning_init_text=args.init_text, base_model_name_or_path=base)  # fmt: skip


def sample(model, tokenizer, ids, device, max_new_tokens=60, seed=0):
    """Continue the token ids `ids` (a held-out text's start, or a held-out example's prompt) from a fixed seed."""
    ids = torch.as_tensor(ids, device=device)[None]
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        ids, max_new_tokens, temperature=0.8, top_p=0.95, eos_token_id=tokenizer.eos_token_id, generator=g
    )
    return tokenizer.decode(out[0, ids.size(1) :].tolist())


def held_out_prompt(val_data):
    """The ids to sample from: a prompt/response example's prompt, or the first 12 tokens of a held-out text."""
    ids, labels = val_data.input_ids[0], val_data.labels[0]
    targets = (labels != -100).nonzero()
    cut = int(targets[0]) if len(targets) and int(targets[0]) > 0 else 12
    return ids[:cut].tolist()


# ----------------------------------------------------------------------------------------------- commands


def cmd_finetune(args):
    """One process, or N (--nproc N launches them through torchrun's API; under torchrun each one runs this)."""
    import contextlib
    import io

    from . import distributed

    n = finetune_processes(args)
    if n > 1 and not distributed.launched():  # check everything here first, then start the N processes
        out = _finetune(args, check_only=True)
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        launch = parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "minipeft.cli"])
        launch.training_script_args = list(map(str, args.argv))  # (not parsed by torchrun: --r would be ambiguous)
        try:
            run(launch)
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
            raise SystemExit(
                f"error: finetune failed on rank {rank} (exit code {failure.exitcode}), see above"
            ) from None
        from .files import read_json

        return read_json(out / "metrics.json", expect=dict)
    if not distributed.launched():
        return _finetune(args)
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        device = distributed.setup(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    quiet = contextlib.redirect_stdout(io.StringIO()) if distributed.world()[0] else contextlib.nullcontext()
    try:
        with quiet:  # rank 0 prints; errors (stderr) come from every rank
            return record(_finetune)(args, device=device)  # (record: torchrun reports a rank's error)
    finally:
        distributed.teardown()


def finetune_processes(args):
    """The number of processes, after checking --nproc, --fsdp and --global-batch (sets the per-process
    --batch-size). Under torchrun it is its WORLD_SIZE."""
    from . import distributed

    nproc, fsdp, global_batch = (getattr(args, k, None) for k in ("nproc", "fsdp", "global_batch"))
    launched_n = distributed.env()[1] if distributed.launched() else None
    if launched_n is not None and nproc is not None and nproc != launched_n:
        raise SystemExit(f"error: --nproc {nproc} but torchrun started {launched_n} processes: give one of them")
    n = launched_n or nproc or 1
    if fsdp and args.method not in distributed.FSDP_METHODS:
        *most, last = distributed.FSDP_METHODS
        raise SystemExit(
            f"error: --fsdp shards --method {', '.join(most)} or {last}, not --method {args.method}: "
            f"train {args.method} data-parallel (--nproc N without --fsdp)"
        )
    if fsdp and launched_n is None and n == 1:
        raise SystemExit("error: --fsdp shards over several processes: add --nproc N (or launch with torchrun)")
    if fsdp and getattr(args, "init_lora_weights", None) == "loftq":  # (LoftQ's start needs the values on every rank)
        raise SystemExit("error: --fsdp loads the other ranks without weights, which LoftQ's start needs: start with "
                         "--init-lora-weights true, pissa or olora, or train LoftQ on one process")  # fmt: skip
    if n > 1:
        try:
            distributed.check_devices(n, args.device)
        except ValueError as e:
            raise SystemExit(f"error: --nproc {n}: {e}") from None
    if global_batch is not None:
        if args.batch_size is not None:
            raise SystemExit("error: give --global-batch or --batch-size, not both")
        if global_batch % (n * args.grad_accum):
            raise SystemExit(
                f"error: --global-batch {global_batch} is not divisible by {n} processes x --grad-accum "
                f"{args.grad_accum} = {n * args.grad_accum}: choose a multiple of {n * args.grad_accum}"
            )
        args.batch_size = global_batch // (n * args.grad_accum)
    elif args.batch_size is None:
        args.batch_size = DEFAULT_BATCH
    return n


def _finetune(args, device=None, check_only=False):
    import contextlib

    from . import distributed
    from .checkpoint import load_pretrained, save_pretrained
    from .data import load_dataset
    from .files import run_lock
    from .peft import get_peft_model, unmatched_targets
    from .resume import find_checkpoint
    from .train import TrainConfig, evaluate, train

    # 1. Check everything that can be checked before loading anything.
    method_args(args)
    config = build_peft_config(args)
    device = device or pick_device(args.device)
    rank = distributed.world()[0]  # (0 in one process) rank 0 writes the run's files
    dtype = pick_dtype(args.dtype, device) if args.method != "full" else torch.float32
    if not Path(args.data).exists():
        raise SystemExit(f"error: --data {args.data} does not exist")
    name = args.name or f"{Path(args.model).name}-{args.method}"
    out = Path(args.out or Path("runs") / name)
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume continues the run in --out, --overwrite replaces it: pass one of them")
    writable_folder(out, "--out", overwrite=args.overwrite, resume=args.resume, run=True)
    if args.resume and find_checkpoint(out) is None:
        raise SystemExit(f"error: --resume but {out} holds no checkpoint (checkpoint/ or checkpoint.old/)")
    tcfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=0.05,
        eval_every=args.eval_every,
        eval_batches=20,
        save_every=args.save_every,
        seed=args.seed,
        lora_plus_ratio=args.lora_plus,
        out_dir=str(out),
        compile=args.compile,
        fsdp=bool(getattr(args, "fsdp", False)),
        device=device if getattr(args, "fsdp", False) else None,  # (--fsdp: the model is on rank 0's CPU, or meta)
        max_grad_norm=None if args.optimizer_in_backward else 1.0,
        optimizer_in_backward=args.optimizer_in_backward,
        loss_chunk=args.loss_chunk,
        early_stop=args.early_stop,
    )
    if args.method == "qlora":
        check_blocksize(args.blocksize)
    if check_only:
        return out
    distributed.barrier()  # every rank checked the folder before rank 0 writes into it

    # 2. Load the model and the data. Seeded first: the adapter's initial weights come from the global RNG.
    # --fsdp loads with low memory: rank 0 builds the model on its CPU as one process would (so the same adapter
    # init); the other ranks build its structure on the meta device (no weight read; quantize_model and
    # get_peft_model work there too); train() then gives each rank its shards of rank 0's weights (distributed.shard).
    torch.manual_seed(args.seed)
    t0 = time.time()
    where = ("meta" if rank else "cpu") if tcfg.fsdp else device
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=where)
    if tokenizer is None:
        raise SystemExit(f"error: {args.model} has no tokenizer (tokenizer.json); finetune needs one")
    if args.seq_len > model.config.max_position_embeddings:
        raise SystemExit(
            f"error: --seq-len {args.seq_len} exceeds the model's context {model.config.max_position_embeddings}"
        )
    if (
        config is not None
        and args.method in ("lora", "qlora", "ia3")
        and (missing := unmatched_targets(model, config.target_modules))
    ):
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SystemExit(f"error: --targets {', '.join(missing)} matched no Linear layer; candidates: {names}")
    chat = {"auto": "auto", "on": True, "off": False}[args.chat]  # as generate --chat: the same prompt format
    train_data, val_data = load_dataset(args.data, tokenizer, args.seq_len, chat=chat)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,d} params, {dtype}, {where} "
          f"({time.time() - t0:.1f}s); data {args.data}: {len(train_data)} train / {len(val_data)} held-out sequences")  # fmt: skip
    bf16 = device.startswith("cuda")  # train() autocasts to bf16 on CUDA (float32 trainable weights): so do we
    base = None
    if config is not None and tcfg.fsdp:  # (on rank 0's CPU it would take long for a model that needs --fsdp)
        print("held-out loss of the base model: not evaluated with --fsdp (the model is on rank 0's CPU)")
    elif config is not None:  # the base model alone, evaluated as train() evaluates (QLoRA: before quantizing)
        rows = args.batch_size * distributed.world()[1]  # the global batch's rows, as train() evaluates
        base, _ = evaluate(model, val_data, rows, 20, device=device, bf16=bf16)
        print(f"held-out loss of the base model{' (full precision)' if args.method == 'qlora' else ''}: {base:.4f}")
    if args.method == "qlora" and config.init_lora_weights != "loftq":  # LoftQ quantizes the targets itself
        from .nf4 import quantize_model

        model = quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    if config is not None:
        model = get_peft_model(model, config, tokenizer=tokenizer)
        model.print_trainable_parameters()
    if args.grad_checkpoint:
        from . import fast

        fast.checkpoint_blocks(model, offload=args.grad_checkpoint == "offload")
    prompt = held_out_prompt(val_data)
    before_text = None if args.no_samples or rank else sample(model, tokenizer, prompt, where)

    # 3. Train, keeping the model of the lowest held-out loss as the run's result (adapter/ or model/), and the
    # last one beside it (adapter-last/ or model-last/). Each checkpoint also holds the adapter, in PEFT's format.
    kind = "adapter" if config is not None else "model"

    def save(m, path):
        m.save_pretrained(path) if config is not None else save_pretrained(m, path, tokenizer)

    with run_lock(out) if rank == 0 else contextlib.nullcontext():
        if (
            args.overwrite and rank == 0
        ):  # start afresh: the files of the earlier run are replaced (or removed, when not rewritten)
            for stale in (out / n for n in ("checkpoint", "checkpoint.old", f"{kind}-last", "metrics.json")):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        if rank == 0:
            (out / "command.txt").write_text(shlex.join(["minipeft", *map(str, args.argv)]) + "\n")
        if args.compile:
            print("compiling the blocks (torch.compile): the first step takes longer")
        metrics = train(model, train_data, val_data, tcfg, resume=args.resume,
                        on_save=lambda m, p: save(m, Path(p) / "adapter") if config is not None else None,
                        on_best=lambda m, step, loss: save(m, out / kind))  # fmt: skip
        final = distributed.gathered_model(model)  # FSDP: the full weights, on rank 0 (every rank gathers)
        if rank == 0:
            save(final, out / f"{kind}-last")
    evals, best = metrics["eval"], metrics.get("best")
    before = next(e["val_loss"] for e in evals if e["step"] == 0) if evals and evals[0]["step"] == 0 else None
    last = evals[-1]
    print(f"held-out loss: before {'?' if before is None else f'{before:.4f}'} -> after {last['val_loss']:.4f} "
          f"(step {last['step']}); best {best['val_loss']:.4f} at step {best['step']}, kept as {out / kind}/")  # fmt: skip
    if before_text is not None and final is not None:
        print(
            f"\n--- prompt (held-out): {tokenizer.decode(prompt)!r}\n--- before:\n{before_text}\n--- after:\n"
            f"{sample(final, tokenizer, prompt, 'cpu' if getattr(args, 'fsdp', False) else device)}\n"
        )  # fmt: skip (the last step's model)
    print(f"wrote {out}/ ({kind}/ the best, {kind}-last/, metrics.json, checkpoint/, command.txt)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = weight_bytes(model) + 3 * sum(p.numel() * p.element_size() for p in trainable)  # + grads, 2 moments
    return {**metrics, "trainable_params": sum(p.numel() for p in trainable), "state_bytes": state,
            "before": before, "base_loss": base if config else before}  # fmt: skip


def weight_bytes(model):
    """Bytes of every weight, shared ones once, a 4-bit layer's packed codes and statistics included."""
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    # (under --fsdp a 4-bit layer holds its tensors as parameters, qweight_<field>: counted above, not again)
    quantized = [m.qweight for m in model.modules() if hasattr(m, "qweight") and "qweight_packed" not in m._parameters]
    fields = ("packed", "absmax", "offset", "nested_absmax", "nested_code")
    return sum(sizes.values()) + sum(
        t.numel() * t.element_size() for q in quantized for t in (getattr(q, f) for f in fields) if t is not None
    )


def load_with_adapters(args):
    from .checkpoint import load_pretrained
    from .peft import PeftModel

    device = pick_device(args.device)
    adapters = []
    for spec in args.adapter:
        name, _, path = spec.rpartition("=") if "=" in spec else ("default", "", spec)
        adapters.append((name or "default", resolve_adapter_dir(path)))
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: duplicate adapter names {names}")
    model_name = args.model or (base_model_of(adapters[0][1]) if adapters else "tiny-shakespeare")
    model, tokenizer = load_pretrained(model_name, dtype=pick_dtype(args.dtype, device), device=device)
    if adapters:
        (first, path), rest = adapters[0], adapters[1:]
        model = PeftModel.from_pretrained(model, path, adapter_name=first, tokenizer=tokenizer)
        for name, path in rest:
            model.load_adapter(path, name, tokenizer=tokenizer)
    return model, tokenizer, device


def cmd_generate(args):
    from .data import chat_prompt

    prompts = args.prompt or ["ROMEO:"]
    if args.use and not args.adapter:
        raise SystemExit("error: --use needs at least one --adapter")
    if args.top_p > 1:
        raise SystemExit(f"error: --top-p must be in (0, 1], got {args.top_p}")
    model, tokenizer, device = load_with_adapters(args)
    if tokenizer is None:
        raise SystemExit("error: the model has no tokenizer (tokenizer.json): generate needs one")
    kw = {}
    if args.use:
        uses = args.use.split(",")
        if len(uses) == 1:
            model.set_adapter(uses[0])
        elif len(uses) != len(prompts):
            raise SystemExit(f"error: --use names {len(uses)} adapters for {len(prompts)} prompts")
        else:
            kw["adapter_names"] = uses
    chat = args.chat == "on" or (args.chat == "auto" and getattr(tokenizer, "chat_template", None))
    texts = [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts  # as finetune trains on them
    encoded = [tokenizer.encode(t) for t in texts]
    if empty := [repr(p) for p, e in zip(prompts, encoded) if not e]:
        raise SystemExit(f"error: --prompt {', '.join(empty)} encodes to no tokens: give some text to continue")
    T = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (T - len(e)) + e for e in encoded], device=device)  # left padding
    mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in encoded], device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        attention_mask=mask,
        generator=g,
        **kw,
    )
    for p, row in zip(prompts, out):
        print(p + ("\n" if chat else "") + tokenizer.decode(row[T:].tolist()))
        print()


def check_not_a_source(out, sources):
    """merge/quantize never write into the folder of the model or adapter they read (even with --overwrite)."""
    real = Path(os.path.realpath(out))
    for what, path in sources:
        if path is not None and real == Path(os.path.realpath(path)):
            raise SystemExit(f"error: --out {out} is the {what}'s own folder ({path}): choose another folder")


def gguf_target(path, overwrite):
    """Check a .gguf output path before any work: a .gguf name, its folder writable, not there unless overwrite."""
    p = Path(path)
    if p.suffix != ".gguf":
        raise SystemExit(f"error: --gguf {path}: the file name must end in .gguf")
    if p.exists() and (p.is_dir() or not overwrite):
        raise SystemExit(f"error: --gguf {path} exists: choose a new name, or pass --overwrite")
    writable_folder(p.parent if str(p.parent) else Path("."), "--gguf", overwrite=True)
    return p


def cmd_merge(args):
    from .checkpoint import save_pretrained
    from .files import write_file
    from .gguf import OUTTYPES, write_model

    if (args.out is None) == (args.gguf is None):
        raise SystemExit("error: give one of --out (an HF model folder) or --gguf (a .gguf file)")
    if args.gguf and args.outtype not in OUTTYPES:
        raise SystemExit(f"error: unknown --outtype {args.outtype!r}; valid: {', '.join(OUTTYPES)}")
    if args.adapter is None and args.model is None:
        raise SystemExit("error: give --adapter (merged into its base) or --model (written as it is)")
    adapter_dir = resolve_adapter_dir(args.adapter) if args.adapter else None
    base = args.model or base_model_of(adapter_dir)
    if args.out:
        check_not_a_source(args.out, [("base model", model_path(base)), ("adapter", adapter_dir)])
        writable_folder(args.out, "--out", overwrite=args.overwrite)
    target = gguf_target(args.gguf, args.overwrite) if args.gguf else None
    args.adapter, args.model, args.device, args.dtype = (
        [str(adapter_dir)] if adapter_dir else [],
        base,
        "cpu",
        "float32",
    )
    model, tokenizer, _ = load_with_adapters(args)
    merged = model.merge_and_unload() if adapter_dir else model
    if target is None:
        save_pretrained(merged, args.out, tokenizer)
        print(f"wrote the merged model to {args.out}")
        return
    name = Path(str(adapter_dir or base)).name
    write_file(target, lambda tmp: write_model(merged, tokenizer, tmp, args.outtype, name=name))
    print(f"wrote {target} ({args.outtype}, {target.stat().st_size / 2**20:.1f} MiB): llama-cli -m {target}")


def cmd_export(args):
    from .files import write_file
    from .gguf import check_writable, write_lora

    adapter_dir = resolve_adapter_dir(args.adapter)
    target = gguf_target(args.gguf, args.overwrite)
    args.adapter, args.model, args.device, args.dtype = [str(adapter_dir)], None, "cpu", "float32"
    model, _, _ = load_with_adapters(args)
    config = model.active_peft_config
    if config.peft_type != "LORA" or config.use_dora:
        kind = "DoRA" if config.peft_type == "LORA" else config.peft_type
        raise SystemExit(
            f"error: llama.cpp's adapters are plain LoRA, and {adapter_dir} is a {kind} adapter: merge it into its "
            f"base instead: minipeft merge --adapter {adapter_dir} --gguf merged.gguf"
        )
    check_writable(model.config)
    name = model.active_adapter
    layers = {n: (m.lora_A[name].weight, m.lora_B[name].weight) for n, m in model.tuner_layers() if name in m.lora_A}
    write_file(target, lambda tmp: write_lora(layers, config, model.config, tmp))
    print(f"wrote {target}: llama-cli -m base.gguf --lora {target}")


def cmd_quantize(args):
    from .checkpoint import load_pretrained, save_pretrained
    from .nf4 import quantize_model

    check_blocksize(args.blocksize)
    check_not_a_source(args.out, [("model", model_path(args.model))])
    writable_folder(args.out, "--out", overwrite=args.overwrite)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32)
    quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    save_pretrained(model, args.out, tokenizer)
    print(f"wrote the NF4 model to {args.out}")


def cmd_compare(args):
    from .compare import compare

    return compare(args)


def cmd_download(args):
    from .checkpoint import download

    print(f"{args.name} is ready at {download(args.name)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command, written into the run directory
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
