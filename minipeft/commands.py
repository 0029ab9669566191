"""`minipeft generate | merge | export | quantize | download`: the commands that read a model (and its adapters)
and print from it or write it out again, in another form.

    generate   text sampled from the model, with one adapter, several, or one per prompt (a mixed batch)
    merge      a LoRA/DoRA adapter merged into its base (or a model alone), written as an HF model folder or
               one GGUF file
    export     a LoRA adapter alone, as a llama.cpp adapter (GGUF)
    quantize   an HF model folder with bitsandbytes-style NF4 weights
    download   a registered model fetched and converted into the cache

cli.py parses and checks the arguments and calls these, as it calls finetune.py and compare.py; the checks the
commands share with finetune (device, dtype, block size, output folder) stay in cli.py. From Python,
`minipeft.cli.main(["merge", ...])` runs one exactly as in a terminal."""

import os
from pathlib import Path

import torch

from .cli import check_blocksize, pick_device, pick_dtype, writable_folder

# ----------------------------------------------------------------------------------------------- finding models


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
    from .files import read_json
    from .registry import REGISTRY

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
    from .registry import REGISTRY, registered_folder

    if Path(name).exists():
        return Path(os.path.realpath(name))
    if name in REGISTRY:
        return Path(os.path.realpath(registered_folder(name)))
    return None


# ----------------------------------------------------------------------------------------------- commands


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
    from .instructions import chat_prompt

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


def cmd_download(args):
    from .registry import download

    print(f"{args.name} is ready at {download(args.name)}")
