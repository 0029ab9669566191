"""One plain training loop: AdamW, warmup + cosine schedule, accumulation, clipping, eval, checkpoints.

    for step in 1 .. steps:
        for each of grad_accum micro-batches:
            loss_i = model(input_ids, attention_mask=..., labels=...).loss     # mean over its n_i targets
            (loss_i * n_i / N).backward()                                    # N: targets in the whole step
        clip_grad_norm_(trainable, max_grad_norm); optimizer.step(); scheduler.step(); zero_grad()
        log, evaluate, checkpoint

That is all of it. The model is only called as model(input_ids, attention_mask=, labels=, return_logits=False)
(the loss alone: minipeft's models then skip the (B, T, V) logits), besides
named_parameters() and train()/eval(), so the same loop does full fine-tuning of a Transformer and trains a
PeftModel: whatever requires grad is trained, and nothing else reaches the optimizer.

Accumulation. Each micro-batch's mean loss is weighted by its share n_i / N of the step's target tokens, so
the summed gradient is that of the mean over all N targets: exactly one big batch. With packed text every
micro-batch has the same count and this is loss / grad_accum; with padded instruction data a plain
loss / grad_accum would over-weight the targets of short micro-batches.

Schedule. LambdaLR multiplies lr by m(s) at optimizer step s = 0 .. steps - 1 (W warmup steps, r min_lr_ratio):
    m(s) = (s + 1) / (W + 1)                                                  s < W   linear warmup, never 0
    m(s) = r + (1 - r) * (1 + cos(pi * (s - W) / max(1, steps - 1 - W))) / 2   s >= W  cosine down to r
LoRA+ (Hayou et al. 2024): with lora_plus_ratio = lambda, lora_B and every 1-D parameter (a DoRA magnitude, a
bias) get lr * lambda, the other parameters (lora_A) lr: HF PEFT's create_loraplus_optimizer groups, exactly.
Weight decay, when not 0, applies to matrices (dim >= 2) only, not to norms and biases (as in nanoGPT).
Speed and memory levers (fast.py, behind one seam, each tested equal to this plain loop): chunked_loss (on by
default: the loss from the hidden states in chunks, no (B, T, V) logits), compile=True or a torch.compile mode
("reduce-overhead" adds CUDA graphs), optimizer_in_backward=True (each parameter stepped inside backward and its
gradient freed: lower peak when the optimizer step is the peak, as 7B full fine-tuning at 1 x 512 tokens, 50.5 ->
41.8 GiB; it needs grad_accum=1 and no clipping, both need every gradient at once). The loop asks them through
one object, fast.Engine, at three places: before each forward, whether the step was already taken, at the end.

Checkpoints and resume (out_dir/checkpoint/, atomic, no pickle, bit-identical resume): resume.py.
A non-finite loss, or a non-finite gradient norm, stops training at once with NonFiniteLossError, before the bad
step is applied; the weights are also checked to be finite before every save, so no NaN is ever written and the
last good checkpoint stays. While out_dir is written, out_dir/.lock is held: a second run on it stops at once.

Held-out evaluation (when val_data is given) runs before the first step (step 0, the "before"), every eval_every
steps and at the end, always the same batches under the same autocast, so the numbers compare. The best (lowest)
one is metrics["best"]; on_best(model, step, val_loss) is called when one is reached, so a caller can keep that
model (the CLI keeps its adapter, as HF Trainer's load_best_model_at_end). When the held-out loss has risen for
overfit_patience evaluations in a row while the training loss fell, one line says the run is overfitting;
early_stop=N stops after N evaluations without a new best (HF's EarlyStoppingCallback).

Several processes (torchrun; distributed.py, through fast.parallel): with a process group of N ranks, batch_size
is per rank and each global micro-batch of batch_size x N rows is split among them, so the run equals one
process with batch_size x N; DDP reduces the trainable gradients, fsdp=True shards every weight (FSDP2). Rank 0
logs and writes; the held-out loss is summed over every rank's rows.

Not done: fp16 autocast (it needs a GradScaler; bf16 does not), and gradient checkpointing
(switch that on the model: fast.checkpoint_blocks(model), or model.gradient_checkpointing = True).
"""

import contextlib
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, fast
from .data import IGNORE_INDEX, batch_stream, batches
from .files import read_json, run_lock, write_json
from .resume import find_checkpoint, load_checkpoint, recover_checkpoint, save_checkpoint

COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient or a weight became inf or NaN; training stopped before applying that step or saving
    anything, and the last good checkpoint is kept."""


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):  # a finite int or float
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 2e-4
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0  # linear warmup; when 0, round(warmup_ratio * steps)
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # adapters usually train without
    max_grad_norm: float | None = 1.0  # None: no clipping
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    eval_batches: int | None = 20  # validation batches per evaluation; None: all
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0: only at the end (checkpoints need out_dir)
    seed: int = 0  # seeds torch/python/numpy at the start of a fresh run, and the data order
    device: str | None = None  # where batches go; None: where the trainable parameters are
    autocast: str = "auto"  # "auto": bf16 on CUDA for a float32 model, off on CPU; "bf16"; "off"
    lora_plus_ratio: float | None = None  # LoRA+: lr * ratio for lora_B (and 1-D parameters); None: off
    out_dir: str | None = None  # checkpoint/ and metrics.json; None: nothing is written
    progress: bool | None = None  # the tqdm bar; None: only when stderr is a terminal
    # the speed levers of fast.py (see above)
    chunked_loss: bool = True  # the loss in chunks from the hidden states: the (B, T, V) logits never exist
    loss_chunk: int | None = None  # rows per chunk of that loss; None: ~256 MB of float32 logits (fewer: less memory)
    compile: bool | str = False  # True, or a torch.compile mode: "reduce-overhead" adds CUDA graphs
    optimizer_in_backward: bool = False  # step each parameter in backward and free its gradient
    fsdp: bool = False  # under torchrun: shard every weight with FSDP2 (else DDP); batch_size is per rank
    early_stop: int | None = None  # stop after this many evaluations without a new best held-out loss; None: never
    overfit_patience: int = 3  # evaluations of rising held-out loss (while training loss falls) before the warning

    def __post_init__(self):
        def check(ok, name, valid):
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {valid}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "overfit_patience"):
            check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an integer >= 0")
        check(_is_num(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        check(_is_num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)")
        check(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        check(_is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        mgn, ebs, lpr = self.max_grad_norm, self.eval_batches, self.lora_plus_ratio
        check(mgn is None or (_is_num(mgn) and mgn > 0), "max_grad_norm", "None (no clipping) or a number > 0")
        check(ebs is None or (_is_int(ebs) and ebs >= 1), "eval_batches", "None (all) or an integer >= 1")
        check(lpr is None or (_is_num(lpr) and lpr > 0), "lora_plus_ratio", "None (off) or a number > 0")
        es = self.early_stop
        check(es is None or (_is_int(es) and es >= 1), "early_stop", "None (never) or an integer >= 1")
        check(self.autocast in ("auto", "bf16", "off"), "autocast", "'auto', 'bf16' or 'off'")
        c = self.compile
        check(isinstance(c, bool) or (isinstance(c, str) and c in COMPILE_MODES), "compile", f"one of {COMPILE_MODES}")
        check(isinstance(self.optimizer_in_backward, bool), "optimizer_in_backward", "True or False")
        check(isinstance(self.chunked_loss, bool), "chunked_loss", "True or False")
        lc = self.loss_chunk
        check(lc is None or (_is_int(lc) and lc >= 1), "loss_chunk", "None (the default size) or an integer >= 1")
        check(isinstance(self.fsdp, bool), "fsdp", "True or False")
        if self.optimizer_in_backward and (self.grad_accum != 1 or self.max_grad_norm is not None):
            raise ValueError(
                f"TrainConfig.optimizer_in_backward=True needs grad_accum=1 and max_grad_norm=None (each parameter "
                f"is stepped before the other gradients exist), got grad_accum={self.grad_accum}, "
                f"max_grad_norm={self.max_grad_norm}"
            )


def lr_multiplier(step, steps, warmup_steps, min_lr_ratio):
    """m(s) of the module docstring: the factor on lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_parameters(model):
    """[(name, parameter)] for every parameter that requires grad, in named_parameters() order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(named_params, cfg, device=None):
    """AdamW over exactly these (name, parameter) pairs, grouped by (LoRA+ lora_B?, decayed?)."""
    groups = {}
    for name, p in named_params:
        lora_b = cfg.lora_plus_ratio is not None and ("lora_B" in name or p.dim() == 1)  # PEFT's "group B"
        decay = cfg.weight_decay > 0 and p.dim() >= 2
        group = groups.setdefault(
            (lora_b, decay),
            {"params": [], "param_names": [], "lr": cfg.lr * (cfg.lora_plus_ratio if lora_b else 1.0),
             "weight_decay": cfg.weight_decay if decay else 0.0},
        )  # fmt: skip
        group["params"].append(p)
        group["param_names"].append(name)
    fused = True if device is not None and torch.device(device).type == "cuda" else None  # one kernel per step
    ordered = [g for _, g in sorted(groups.items())]  # plain-lr groups first: group 0's lr is the one logged
    return torch.optim.AdamW(ordered, lr=cfg.lr, fused=fused)


def num_targets(batch, model=None):
    """The tokens the loss is a mean over: labels shifted by one, -100 excluded; a model that predicts more (prompt
    tuning's last virtual token predicts the first real one) says so through its own num_targets(labels)."""
    if model is not None and hasattr(model, "num_targets"):
        return int(model.num_targets(batch["labels"]))
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def batch_loss(model, batch, device):  # the one way the loop calls the model
    mask = batch["attention_mask"] if batch["attention_mask"] is None else batch["attention_mask"].to(device)
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    return model(ids, attention_mask=mask, labels=labels, return_logits=False).loss


@torch.no_grad()
def evaluate(model, dataset, batch_size, max_batches=None, *, device=None, bf16=False, parallel=None):
    """-> (loss, perplexity): the mean loss over every target token of the first max_batches batches, in order.
    parallel (a distributed.Parallel): batches of batch_size x N rows, each rank its rows, the sums all-reduced."""
    device = device or next(p for _, p in model.named_parameters()).device
    n_ranks = parallel.world if parallel is not None else 1
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches(dataset, batch_size * n_ranks, shuffle=False, drop_last=False)):
        if max_batches is not None and i >= max_batches:
            break
        if parallel is not None:
            mine = parallel.rows(batch, batch_size)
            if len(mine["input_ids"]) == 0:  # the held-out set's end: no row here (a sharded model still runs)
                if parallel.sharded:  # (its all-gathers must match the other ranks'): one row, not counted
                    batch_loss(model, {k: None if v is None else v[:1] for k, v in batch.items()}, device)
                continue
            batch = mine
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(model, batch, device)
        n = num_targets(batch, model)
        total, count = total + (loss.item() * n if n else 0.0), count + n
    model.train(was_training)
    if parallel is not None:
        total, count = parallel.all_sum([total, count])
        count = round(count)
    if count == 0:
        raise ValueError("the held-out batches hold no target token (every label is -100): nothing to evaluate")
    loss = total / count
    return loss, math.exp(loss) if loss < 700 else math.inf


# ----------------------------------------------------------------------------------- checkpoint files


# ----------------------------------------------------------------------------------------- the loop


def all_finite(tensors):  # one reduction for all of them: a single host sync
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def train(model, train_data, val_data, cfg, *, resume=False, on_save=None, on_best=None):
    """Train whatever in `model` requires grad; returns the metrics (also written to out_dir/metrics.json).

    val_data may be None (no evaluation). resume=True continues from out_dir/checkpoint/. on_save(model, path)
    is called inside each checkpoint before it is committed, so what it writes is part of the atomic save.
    on_best(model, step, val_loss) is called at each new lowest held-out loss (step 0 included).
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True): nothing to train")
    device = torch.device(cfg.device) if cfg.device else named[0][1].device
    off = [f"{n} ({p.device})" for n, p in named if p.device.type != device.type]
    off = off if not cfg.fsdp else []  # (FSDP2: shard() puts each rank's shards on the device; rank 0 may load on
    # its CPU and the other ranks hold only the structure, on the meta device: distributed.shard)
    if off:
        raise ValueError(f"TrainConfig.device is {device} but {off[0]} is not: move the model first, model.to()")
    n_ranks = distributed.world()[1]
    if len(train_data) < cfg.batch_size * n_ranks:
        each = f" x {n_ranks} processes" if n_ranks > 1 else ""
        raise ValueError(
            f"batch_size={cfg.batch_size}{each} is larger than the training set ({len(train_data)} examples)"
        )
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if resume and out_dir is None:
        raise ValueError("resume=True needs TrainConfig.out_dir, the directory holding checkpoint/")
    if cfg.compile and not hasattr(model, "compile_blocks"):
        raise ValueError(
            f"TrainConfig.compile=True needs a minipeft Transformer or PeftModel, got {type(model).__name__}"
        )
    par = fast.parallel(model, cfg, device)  # several processes (torchrun), or one: the identity
    named = trainable_parameters(model) if par.sharded else named  # (sharded: the parameters are now DTensors)
    with run_lock(out_dir) if out_dir is not None and par.is_main else contextlib.nullcontext():
        return _train(model, par, named, device, out_dir, train_data, val_data, cfg, resume, on_save, on_best)


def _train(model, par, named, device, out_dir, train_data, val_data, cfg, resume, on_save, on_best):
    ckpt = recover_checkpoint(out_dir) if resume and par.is_main else None  # the last good checkpoint, all along
    if resume and par.world > 1:
        distributed.barrier()  # (rank 0 may have just put checkpoint.old back)
        ckpt = find_checkpoint(out_dir)
    if resume and ckpt is None:
        raise FileNotFoundError(f"resume=True but there is no checkpoint in {out_dir}")
    auto_bf16 = device.type == "cuda" and named[0][1].dtype == torch.float32
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and auto_bf16)

    optimizer = build_optimizer(named, cfg, device)
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * cfg.steps)
    schedule = lambda s: lr_multiplier(s, cfg.steps, warmup, cfg.min_lr_ratio)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    metrics, start = {"train": [], "eval": []}, 0
    if ckpt is not None:
        state = par.resume(load_checkpoint, ckpt, named, optimizer, scheduler)
        start = state["step"]
        changed = [k for k in ("steps", "lr", "batch_size", "grad_accum", "seed", "warmup_steps")
                   if state["config"].get(k) != getattr(cfg, k)]  # fmt: skip
        if changed:
            warnings.warn(
                f"resuming with changed {changed}: the run will differ from an uninterrupted one", stacklevel=3
            )
        if (out_dir / "metrics.json").is_file():  # keep what was logged up to the checkpoint
            logged = read_json(out_dir / "metrics.json", expect=dict)
            metrics = {k: [e for e in logged.get(k, []) if e["step"] <= start] for k in metrics}
            if metrics["eval"]:
                best = min(metrics["eval"], key=lambda e: e["val_loss"])
                metrics["best"] = {"step": best["step"], "val_loss": best["val_loss"]}
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # CPU and every CUDA device

    def finite_or_stop(what, step, finite):
        if not finite:
            kept = f"the last good checkpoint at {ckpt} was kept" if ckpt else "no checkpoint was saved yet"
            raise NonFiniteLossError(f"non-finite {what} at step {step}; stopped, {kept}")

    say = tqdm.write if par.is_main else (lambda text: None)  # logs on rank 0 only

    def held_out(step):  # evaluate, log, and tell on_best about a new lowest loss
        val_loss, val_ppl = evaluate(
            model, val_data, cfg.batch_size, cfg.eval_batches, device=device, bf16=bf16, parallel=par
        )
        metrics["eval"].append({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
        if cfg.progress is not False:
            say(f"step {step}: held-out loss {val_loss:.4f} (ppl {val_ppl:.1f})")
        best = min(metrics["eval"], key=lambda e: e["val_loss"])  # the first of equals: the earliest
        metrics["best"] = {"step": best["step"], "val_loss": best["val_loss"]}
        if best["step"] == step and on_best is not None:
            saved = par.for_saving()  # (sharded: gathered by every rank, for rank 0)
            if par.is_main:
                on_best(saved, step, val_loss)

    if val_data is not None and start == 0:
        held_out(0)  # "before": the same batches and autocast as every later evaluation
    stream = batch_stream(train_data, cfg.batch_size * par.world, cfg.seed, start=start * cfg.grad_accum)
    params = [p for _, p in named]
    show = (cfg.progress if cfg.progress is not None else sys.stderr.isatty()) and par.is_main
    bar = tqdm(total=cfg.steps, initial=start, disable=not show, dynamic_ncols=True, desc="train")
    was_training, loss, tokens, seconds, warned, stopped = model.training, None, 0, 0.0, False, None
    total_seconds, steps_run = 0.0, 0  # the time of the optimizer steps alone (no evaluation, no save)
    engine = fast.Engine(model, optimizer, cfg)  # the levers cfg asks for (none of them changes the math)
    model.train()
    optimizer.zero_grad(set_to_none=True)  # a gradient left from before train() must not enter the first step
    try:
        for step in range(start + 1, cfg.steps + 1):  # `step` optimizer steps are done once this one is
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]  # global micro-batches (batch_size x N rows)
            counts = [num_targets(b, model) for b in micro]
            n_total = sum(counts)
            loss_t = torch.zeros((), dtype=torch.float64, device=device)  # the step's loss, summed on the device
            last = max((i for i, n in enumerate(counts) if n), default=-1)  # gradients are reduced there
            for i, (b, n) in enumerate(zip(micro, counts)):
                if n == 0:
                    continue
                mask = b["attention_mask"]  # (the global micro-batch's tokens: every rank's rows)
                tokens += b["input_ids"].numel() if mask is None else int(mask.sum())
                b = par.rows(b, cfg.batch_size)  # this rank's rows (all of them with one process)
                n = num_targets(b, model) if par.world > 1 else n
                engine.before_forward()
                with par.sync(i == last):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss_i = batch_loss(par.module, b, device)
                    if n == 0:  # no target in this rank's rows: it still joins the gradients' reduction, with 0
                        loss_i = torch.nan_to_num(loss_i) * 0.0
                    if engine.steps_in_backward:  # backward steps the optimizer: a non-finite loss stops before it
                        finite_or_stop(f"loss {loss_i.item()}", step, math.isfinite(loss_i.item()))
                    (loss_i * (n / n_total * par.scale)).backward()  # (scale: DDP and FSDP average over ranks)
                loss_t += loss_i.detach().double() * (n / n_total)
            par.sum_(loss_t)  # the step's loss over every rank's rows (queued on the device)
            # The step's numbers are read on the host once, here: a read waits for the device to finish its queue,
            # and one inside the step (the loss before backward) would leave the device idle while the host then
            # queues backward. A non-finite loss is still caught before the step: its gradients are not finite.
            if engine.steps_in_backward:  # (the step was taken inside backward: check what it wrote)
                grad_norm, loss = None, loss_t.item()
                finite_or_stop("weights after the step", step, all_finite(par.local(params)))
            else:
                norm_t = par.clip(params, cfg.max_grad_norm or math.inf)
                loss, grad_norm = torch.stack([loss_t, norm_t.to(loss_t)]).tolist()
                finite_or_stop(f"loss {loss}", step, math.isfinite(loss))  # before the step: no weight changed yet
                finite_or_stop(f"gradient norm {grad_norm}", step, math.isfinite(grad_norm))
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            if not engine.steps_in_backward:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
            total_seconds, steps_run = total_seconds + time.perf_counter() - t0, steps_run + 1
            bar.update(1)
            write = False
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / seconds)
                metrics["train"].append(entry)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / seconds:.0f}")
                if not show and cfg.progress is None and par.is_main:  # no terminal for a bar (a log file, CI): lines
                    print(f"step {step}/{cfg.steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens / seconds:.0f} tok/s")
                tokens, seconds, write = 0, 0.0, True
            if val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                held_out(step)
                write = True
                if not warned and overfitting(metrics, cfg.overfit_patience):
                    warned = True
                    say(
                        f"step {step}: the held-out loss has risen for {cfg.overfit_patience} evaluations while the "
                        f"training loss fell: overfitting (the best, {metrics['best']['val_loss']:.4f} at step "
                        f"{metrics['best']['step']}, is kept; try a lower --lr, fewer --steps or --early-stop N)"
                    )
                worse = sum(e["step"] > metrics["best"]["step"] for e in metrics["eval"])  # evaluations since the best
                if cfg.early_stop and worse >= cfg.early_stop:
                    stopped = step
                    say(f"step {step}: early stop after {worse} evaluations without a new best held-out loss")
            if out_dir is not None and write and par.is_main:  # before the checkpoint: resume drops later entries
                write_json(out_dir / "metrics.json", metrics, indent=1)
            save = (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopped
            if out_dir is not None and save:
                finite_or_stop("weights", step, all_finite(par.local(params)))  # never a NaN checkpoint
                ckpt = par.checkpoint(save_checkpoint, out_dir, step, named, optimizer, scheduler, cfg, on_save)
            if stopped:
                break
    finally:
        engine.close()
        bar.close()
        model.train(was_training)
    last = metrics["eval"][-1] if metrics["eval"] else {}
    return {**metrics, "loss": loss, "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
            "checkpoint": str(ckpt) if ckpt else None, "stopped_early_at": stopped,
            "train_seconds": total_seconds, "steps_run": steps_run}  # fmt: skip


def overfitting(metrics, patience):
    """The last `patience` held-out losses each rose, while the training loss fell since the best evaluation
    (the first training loss logged at or after the best step, against the latest one)."""
    evals = metrics["eval"][-(patience + 1) :]
    if len(evals) <= patience or not all(a["val_loss"] < b["val_loss"] for a, b in zip(evals, evals[1:])):
        return False
    since_best = [e["loss"] for e in metrics["train"] if e["step"] >= metrics["best"]["step"]]
    return len(since_best) >= 2 and since_best[-1] < since_best[0]
