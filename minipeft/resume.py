"""Training checkpoints: save a run's whole state atomically, and resume it bit for bit.

Checkpoints, in out_dir/checkpoint/. Never pickle: tensors go to safetensors, everything else to JSON.
    trainable.safetensors  the trainable parameters by name
    optimizer.safetensors  AdamW's state.<i>.exp_avg and state.<i>.exp_avg_sq (i: the parameter's index)
    rng.safetensors        torch_cpu: the CPU generator state (uint8); cuda.<d>: each CUDA device's
    trainer_state.json     step, config, optimizer param_groups (with param_names) and step counts,
                           scheduler state, python and numpy RNG states
    + whatever on_save(model, path) writes there (the CLI adds the PEFT-format adapter)
A save fills a new sibling folder and swaps it in with files.replace_dir: a crash at any moment leaves a complete
checkpoint (checkpoint/, or checkpoint.old/ after a crash between the two renames, which resume also finds).
metrics.json is rewritten atomically.

Resume restores all of it, so N steps interrupted after the save at step k and resumed give weights
bit-identical to one uninterrupted N-step run on CPU, dropout included (the RNG states come back, and the data
order is a pure function of (seed, step), see data.py). One check on an H200 (fused AdamW, bf16 autocast,
dropout) was bit-identical too, though CUDA kernels do not promise it. train.py calls save_checkpoint,
find_checkpoint and load_checkpoint; nothing here knows the loop.
"""

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .files import aside, read_json, replace_dir

CHECKPOINT = "checkpoint"


def rng_state():
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{d}": s for d, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(tensors, state):
    torch.set_rng_state(tensors["torch_cpu"])
    for d in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda.{d}" in tensors:
            torch.cuda.set_rng_state(tensors[f"cuda.{d}"], d)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer):
    """AdamW's state_dict split in two: tensors (dim >= 1) for safetensors, everything else for JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, state in sd["state"].items():
        for key, v in state.items():
            if v.dim() > 0:
                tensors[f"state.{i}.{key}"] = v.detach().cpu().contiguous()
            else:  # AdamW's per-parameter step count, a 0-dim float32 tensor
                scalars[f"{i}.{key}"] = {"value": v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors, meta):
    state = {}
    for key, t in tensors.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = t
    for key, s in meta["scalars"].items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = torch.tensor(s["value"], dtype=getattr(torch, s["dtype"]))
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out_dir, step, model, named_params, optimizer, scheduler, cfg, on_save=None):
    """Write out_dir/checkpoint/ atomically (see the module docstring); returns its path."""
    final = Path(out_dir) / CHECKPOINT
    for stale in Path(out_dir).glob(f".{CHECKPOINT}.tmp-*"):  # left by killed saves of minipeft <= 0.1
        shutil.rmtree(stale, ignore_errors=True)
    with replace_dir(final, keep_others=False) as tmp:  # nothing of an older checkpoint is carried over
        save_file({n: p.detach().cpu().contiguous() for n, p in named_params}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        meta = {"format": "minipeft-checkpoint", "version": 1, "step": step, "config": asdict(cfg),
                "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
        if on_save is not None:
            on_save(model, tmp)
    return final


def recover_checkpoint(out_dir):
    """Before a resumed run writes anything: a checkpoint.old left alone by a crash between the two renames of a
    save becomes checkpoint/ again, and the folders of killed saves are removed. Returns find_checkpoint()."""
    out_dir = Path(out_dir)
    if not (out_dir / CHECKPOINT).exists() and (aside(out_dir / CHECKPOINT) / "trainer_state.json").is_file():
        aside(out_dir / CHECKPOINT).rename(out_dir / CHECKPOINT)
    for stale in [*out_dir.glob(f".{CHECKPOINT}.tmp-*"), *out_dir.glob(f".{CHECKPOINT}.new-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    return find_checkpoint(out_dir)


def find_checkpoint(out_dir):
    for path in (Path(out_dir) / CHECKPOINT, aside(Path(out_dir) / CHECKPOINT)):  # .old: a crash between renames
        if (path / "trainer_state.json").is_file():
            return path
    return None


def load_checkpoint(path, named_params, optimizer, scheduler):
    """Check, then restore parameters, optimizer, scheduler and RNGs from `path`; returns the trainer state.
    A damaged or tampered checkpoint is a ValueError naming the file, raised before anything is changed."""
    try:
        state = read_json(path / "trainer_state.json", expect=dict)
        weights, opt_tensors, rng_tensors = (
            load_file(path / f"{n}.safetensors") for n in ("trainable", "optimizer", "rng")
        )
    except Exception as e:  # missing, truncated or corrupt
        raise ValueError(f"cannot read the checkpoint in {path}: {e}") from e
    fields = {"format": str, "step": int, "config": dict, "optimizer": dict, "scheduler": dict, "rng": dict}
    bad = [k for k, kind in fields.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    if bad or state["format"] != "minipeft-checkpoint" or state["step"] < 0:
        raise ValueError(
            f"cannot resume from {path}: trainer_state.json is damaged (fields {bad or ['format', 'step']})"
        )
    have = {n: tuple(p.shape) for n, p in named_params}
    saved = {n: tuple(t.shape) for n, t in weights.items()}
    for n in sorted(have.keys() | saved.keys()):
        if have.get(n) != saved.get(n):
            raise ValueError(
                f"cannot resume from {path}: trainable parameter {n!r} has shape "
                f"{saved.get(n, 'missing')} in the checkpoint and {have.get(n, 'missing')} in the model"
            )
        if not (weights[n].is_floating_point() and torch.isfinite(weights[n]).all()):
            raise ValueError(f"cannot resume from {path}: {n!r} is not finite floating point in the checkpoint")
    names_now = [g["param_names"] for g in optimizer.param_groups]
    names_saved = [g.get("param_names") for g in state["optimizer"].get("param_groups", [])]
    if names_now != names_saved:
        raise ValueError(
            f"cannot resume from {path}: its optimizer groups {names_saved} differ from this run's {names_now} "
            "(were lora_plus_ratio or weight_decay changed?)"
        )
    try:  # what is left can only fail on a tampered file; the optimizer checks its own state before taking it
        load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(rng_tensors, state["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"cannot resume from {path}: trainer_state.json or its tensors are damaged ({e!r})") from e
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(weights[n])
    return state
