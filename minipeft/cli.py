"""The `minipeft` command: finetune, generate, merge, quantize, download.

    minipeft finetune                                  # LoRA on the bundled tiny-shakespeare: plays -> sonnets
    minipeft finetune --model smollm2-135m-instruct --data my.jsonl --method qlora --steps 500
    minipeft generate --model tiny-shakespeare --prompt "ROMEO:"
    minipeft generate --adapter runs/sonnets --prompt "Shall I"
    minipeft merge --adapter runs/sonnets --out merged/          # a plain HF-format model directory
    minipeft download smollm2-135m-instruct

Every argument is checked before the model is loaded, so a typo costs no time.
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
DEFAULT_DATA = ASSETS / "data" / "sonnets.txt"
METHODS = ("lora", "qlora", "full", "adapter", "prefix", "prompt")
MIXED_BATCH_HELP = """\
several adapters on one base:
  minipeft generate --adapter a=runs/sonnets --adapter b=runs/other --use a --prompt "ROMEO:"
a mixed batch, one adapter per prompt ("__base__" = no adapter):
  minipeft generate --adapter a=runs/sonnets --adapter b=runs/other \\
      --prompt "ROMEO:" --prompt "JULIET:" --prompt "HAMLET:" --use a,b,__base__
"""


def positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return v


def build_parser():
    p = argparse.ArgumentParser(prog="minipeft", description="Parameter-efficient fine-tuning from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a model (LoRA on the bundled tiny model by default)")
    f.add_argument("--model", default="tiny-shakespeare", help="registered name, HF directory or .gguf file")
    f.add_argument("--data", default=str(DEFAULT_DATA), help=".txt file/directory (packed) or .jsonl (prompt/response)")
    f.add_argument("--method", default="lora", choices=METHODS)
    g = f.add_argument_group("LoRA / DoRA / QLoRA")
    g.add_argument("--r", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--targets", default="q_proj,v_proj", help="comma-separated names, 'all-linear', or a regex")
    g.add_argument("--rslora", action="store_true")
    g.add_argument("--dora", action="store_true")
    g.add_argument("--lora-plus", type=float, default=None, metavar="RATIO", help="LoRA+: lr of lora_B times RATIO")
    g.add_argument("--blocksize", type=int, default=64, help="QLoRA: NF4 block size")
    g.add_argument("--no-double-quant", action="store_true", help="QLoRA: keep absmax in float32")
    g = f.add_argument_group("adapters, prefix and prompt tuning")
    g.add_argument("--bottleneck", type=int, default=64)
    g.add_argument("--placement", default="houlsby", help="houlsby | pfeiffer")
    g.add_argument("--virtual-tokens", type=int, default=20)
    g.add_argument("--prefix-projection", action="store_true")
    g.add_argument("--init-text", default=None, help="prompt tuning: initialise the soft prompt from this text")
    g = f.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=60)
    g.add_argument("--lr", type=float, default=None, help="default: 2e-3 for adapters, 5e-5 for full")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--seq-len", type=positive_int, default=128)
    g.add_argument("--eval-every", type=int, default=20)
    g.add_argument("--save-every", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward: less memory")
    g.add_argument("--optimizer-in-backward", action="store_true",
                   help="step each parameter inside backward and free its gradient: less memory (full fine-tuning); "
                   "no gradient clipping, needs --grad-accum 1")  # fmt: skip
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile each block for training (faster on a GPU); MODE: a torch.compile mode, "
                   "e.g. reduce-overhead (adds CUDA graphs: fastest when every batch has one shape, as packed text)")  # fmt: skip
    f.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    f.add_argument("--name", default=None, help="run name (default: <model>-<method>)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    f.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bf16 weights on CUDA) | float32 | bf16")
    f.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    f.add_argument("--no-samples", action="store_true", help="skip the before/after samples")

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
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap each prompt as a user message in the model's chat template (auto: if it has one)")  # fmt: skip
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")

    m = sub.add_parser("merge", help="merge a LoRA/DoRA adapter into its base and save a plain HF model")
    m.add_argument("--adapter", required=True)
    m.add_argument("--model", default=None)
    m.add_argument("--out", required=True)

    q = sub.add_parser("quantize", help="write an HF-format model with bitsandbytes-style NF4 weights")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true")

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
    with open(Path(adapter_dir) / "adapter_config.json") as f:
        return json.load(f).get("base_model_name_or_path")


def build_peft_config(args):
    """The method's config from the command line (validated here, before any loading); None for full."""
    from .lora import LoraConfig

    if args.method == "full":
        return None
    if args.method in ("lora", "qlora"):
        targets = args.targets
        targets = (
            targets if targets == "all-linear" or any(c in targets for c in "\\()[]*+?|^$") else targets.split(",")
        )
        return LoraConfig(
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=targets,
            use_rslora=args.rslora,
            use_dora=args.dora,
            base_model_name_or_path=args.model,
        )
    if args.method == "adapter":
        from .adapter import AdapterConfig

        return AdapterConfig(bottleneck_size=args.bottleneck, placement=args.placement)
    if args.method == "prefix":
        from .prefix import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, prefix_projection=args.prefix_projection)
    from .prompt import PromptTuningConfig

    init = "TEXT" if args.init_text else "RANDOM"
    return PromptTuningConfig(
        num_virtual_tokens=args.virtual_tokens, prompt_tuning_init=init, prompt_tuning_init_text=args.init_text
    )


def sample(model, tokenizer, prompt, device, max_new_tokens=60, seed=0):
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        ids, max_new_tokens, temperature=0.8, top_p=0.95, eos_token_id=tokenizer.eos_token_id, generator=g
    )
    return tokenizer.decode(out[0, ids.size(1) :].tolist())


# ----------------------------------------------------------------------------------------------- commands


def cmd_finetune(args):
    from .checkpoint import load_pretrained, save_pretrained
    from .data import load_dataset
    from .peft import get_peft_model
    from .train import TrainConfig, evaluate, train

    # 1. Check everything that can be checked before loading anything.
    config = build_peft_config(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device) if args.method != "full" else torch.float32
    if not Path(args.data).exists():
        raise SystemExit(f"error: --data {args.data} does not exist")
    lr = args.lr if args.lr is not None else (5e-5 if args.method == "full" else 2e-3)
    name = args.name or f"{Path(args.model).name}-{args.method}"
    out = Path(args.out or Path("runs") / name)
    if args.resume and not (out / "checkpoint").is_dir():
        raise SystemExit(f"error: --resume but {out / 'checkpoint'} does not exist")
    tcfg = TrainConfig(
        steps=args.steps,
        lr=lr,
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
        max_grad_norm=None if args.optimizer_in_backward else 1.0,
        optimizer_in_backward=args.optimizer_in_backward,
    )
    if args.method == "qlora":
        check_blocksize(args.blocksize)

    # 2. Load the model and the data. Seeded first: the adapter's initial weights come from the global RNG.
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=device)
    if tokenizer is None:
        raise SystemExit(f"error: {args.model} has no tokenizer (tokenizer.json); finetune needs one")
    if args.seq_len > model.config.max_position_embeddings:
        raise SystemExit(
            f"error: --seq-len {args.seq_len} exceeds the model's context {model.config.max_position_embeddings}"
        )
    train_data, val_data = load_dataset(args.data, tokenizer, args.seq_len)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,d} params, {dtype}, {device} "
          f"({time.time() - t0:.1f}s); data {args.data}: {len(train_data)} train / {len(val_data)} held-out sequences")  # fmt: skip
    if args.method == "qlora":
        from .nf4 import quantize_model

        model = quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    model.gradient_checkpointing = args.grad_checkpoint
    if config is not None:
        model = get_peft_model(model, config, tokenizer=tokenizer)
        model.print_trainable_parameters()

    prompt = tokenizer.decode(val_data.input_ids[0][:12].tolist())  # the start of a held-out text
    before, _ = evaluate(model, val_data, args.batch_size, 20, device=device)
    before_text = None if args.no_samples else sample(model, tokenizer, prompt, device)

    # 3. Train. Each checkpoint also holds the adapter in PEFT's format.
    def on_save(m, path):
        m.save_pretrained(os.path.join(path, "adapter")) if config is not None else None

    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(shlex.join(["minipeft", *map(str, args.argv)]) + "\n")
    if args.compile:
        print("compiling the blocks (torch.compile): the first step takes longer")
    metrics = train(model, train_data, val_data, tcfg, resume=args.resume, on_save=on_save)
    after = metrics["val_loss"]  # train() ends with an evaluation over the same 20 held-out batches

    # 4. Save: the adapter (PEFT format) or, for full fine-tuning, the whole model (HF format).
    if config is not None:
        model.save_pretrained(out / "adapter")
    else:
        save_pretrained(model, out / "model", tokenizer)
    print(f"held-out loss: before {before:.4f} (ppl {torch.tensor(before).exp():.1f}) -> "
          f"after {after:.4f} (ppl {torch.tensor(after).exp():.1f})")  # fmt: skip
    if before_text is not None:
        print(f"\n--- prompt (held-out): {prompt!r}\n--- before:\n{before_text}\n--- after:\n"
              f"{sample(model, tokenizer, prompt, device)}\n")  # fmt: skip
    print(f"wrote {out}/ ({'adapter' if config is not None else 'model'}/, metrics.json, command.txt)")
    return metrics


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
    model_name = args.model or (adapters and base_model_of(adapters[0][1])) or "tiny-shakespeare"
    model, tokenizer = load_pretrained(model_name, dtype=pick_dtype(args.dtype, device), device=device)
    if adapters:
        (first, path), rest = adapters[0], adapters[1:]
        model = PeftModel.from_pretrained(model, path, adapter_name=first, tokenizer=tokenizer)
        for name, path in rest:
            model.load_adapter(path, name, tokenizer=tokenizer)
    return model, tokenizer, device


def cmd_generate(args):
    prompts = args.prompt or ["ROMEO:"]
    if args.use and not args.adapter:
        raise SystemExit("error: --use needs at least one --adapter")
    model, tokenizer, device = load_with_adapters(args)
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
    if chat:  # an instruct model answers a user message, not a bare continuation
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts
        ]
    else:
        texts = prompts
    encoded = [tokenizer.encode(t) for t in texts]
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


def cmd_merge(args):
    from .checkpoint import save_pretrained

    args.adapter, args.device, args.dtype = [args.adapter], "cpu", "float32"
    model, tokenizer, _ = load_with_adapters(args)
    merged = model.merge_and_unload()
    save_pretrained(merged, args.out, tokenizer)
    print(f"wrote the merged model to {args.out}")


def cmd_quantize(args):
    from .checkpoint import load_pretrained, save_pretrained
    from .nf4 import quantize_model

    check_blocksize(args.blocksize)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32)
    quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant)
    save_pretrained(model, args.out, tokenizer)
    print(f"wrote the NF4 model to {args.out}")


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
        "quantize": cmd_quantize,
        "download": cmd_download,
    }[args.command]
    from .train import NonFiniteLossError

    try:
        command(args)
    except (ValueError, FileNotFoundError, KeyError, NonFiniteLossError) as e:  # our own clear errors: no traceback
        if os.environ.get("MINIPEFT_DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
