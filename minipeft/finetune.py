"""`minipeft finetune`: the command line's method flags -> a PEFT config, one process or N (torchrun), the run
itself (load, apply the method, train, evaluate, save, sample before and after), and what it reports.

cli.py parses and checks the arguments (and owns the flags' defaults); this file does the work. From Python,
`minipeft.cli.main(["finetune", ...])` returns the run's metrics."""

import os
import shlex
import shutil
import time
from pathlib import Path

import torch

from .cli import (
    DEFAULT_BATCH,
    FLAG_DEFAULTS,
    METHOD_DEFAULTS,
    METHOD_FLAGS,
    check_blocksize,
    pick_device,
    pick_dtype,
    writable_folder,
)


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
            result = record(_finetune)(args, device=device)  # (record: torchrun reports a rank's error)
    except BaseException:
        distributed.abort()  # not teardown(): NCCL's would wait for the other ranks, blocked in a collective
        raise
    distributed.teardown()
    return result


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
        # --overwrite starts afresh: the files of the earlier run are replaced (or removed, when not rewritten)
        if args.overwrite and rank == 0:
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
