"""What every lesson shares: its settings, the way it compares two results, and the way it runs your exercises.

    from common import DEVICE, FAST, STEPS, cmp, exercise

FAST      the tests set MINIPEFT_FAST=1: fewer training steps, every cell still runs and every assert still holds
DEVICE    "cuda" when there is a GPU, else "cpu"
STEPS, BATCH, SEQ_LEN, VAL_BATCHES, lr(method)
          the one training budget of lessons 02-08, `minipeft finetune`'s, so their held-out losses compare across
          lessons and with benchmarks/README.md's sweep; lr(method) is finetune's default (measured there)
cmp(name, ours, reference)
          Karpathy's check from makemore's "backprop ninja": exact? close? the largest difference? (and the shapes)
finetune_config(method, **changes), train_and_report(label, peft_model, train_data, val_data, config)
          finetune's TrainConfig on that budget; one training run with a one-line report
exercise(name, your_function, check)
          runs a check on your function: "not answered yet" while it raises NotImplementedError, "correct" when
          the check passes; a wrong answer fails with what differs (the check never shows the answer)
"""

import os

import torch

FAST = os.environ.get("MINIPEFT_FAST", "") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

STEPS = 10 if FAST else 60  # optimizer steps of every training run in lessons 02-08, as `minipeft finetune`
BATCH, SEQ_LEN, VAL_BATCHES = 8, 128, 20


def lr(method):
    """`minipeft finetune`'s default learning rate for a method ("lora", "qlora", "adapter", "prefix", ...)."""
    from minipeft.cli import METHOD_DEFAULTS

    return METHOD_DEFAULTS[method]["lr"]


def cmp(name, ours, reference):
    """Print how `ours` compares with `reference` (tensors): exact, close (allclose), max |difference|; -> close."""
    ours, reference = torch.as_tensor(ours), torch.as_tensor(reference)
    if ours.shape != reference.shape:
        print(f"{name:28s} | shape {tuple(ours.shape)} but the reference is {tuple(reference.shape)}")
        return False
    exact = bool(torch.equal(ours, reference))
    close = bool(torch.allclose(ours.to(reference.dtype), reference, rtol=1e-5, atol=1e-8))
    diff = (ours.to(reference.dtype) - reference).abs().max().item() if ours.numel() else 0.0
    print(f"{name:28s} | exact: {exact!s:5} | close: {close!s:5} | max diff: {diff:.2e}")
    return close


def exercise(name, function, check):
    """Run check(function); the check raises AssertionError (what differs) or returns when the answer is right."""
    try:
        check(function)
    except NotImplementedError:
        print(f"{name}: not answered yet (replace `raise NotImplementedError` with your code)")
        return None
    print(f"{name}: correct")
    return True


def check_close(name, ours, reference, rtol=1e-7, atol=1e-10):
    """For the exercise checks: AssertionError saying what differs (type, shape, dtype, non-finite entries, the
    largest difference) between your result and the reference, never the reference's values."""
    assert isinstance(ours, torch.Tensor), f"{name}: expected a tensor, got {type(ours).__name__}"
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(reference.shape)}"
    assert ours.dtype == reference.dtype, f"{name}: dtype {ours.dtype}, expected {reference.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: {int((~torch.isfinite(ours)).sum())} entries are inf or NaN"
    ours, reference = ours.detach().double(), reference.detach().double()
    ok = torch.allclose(ours, reference, rtol=rtol, atol=atol)
    assert ok, f"{name}: differs from the reference by up to {(ours - reference).abs().max().item():.2e}"


def finetune_config(method, **changes):
    """`minipeft finetune --method <method>`'s TrainConfig on this budget (its lr, warmup, evaluation, clipping and
    seed), with `changes` on top. Seed the global RNG (torch.manual_seed(0)) before building the adapter, as the
    command does: the run is then the command's, and benchmarks/README.md's sweep row (see `sweep`)."""
    from minipeft.train import TrainConfig

    settings = dict(steps=STEPS, lr=lr(method), batch_size=BATCH, warmup_ratio=0.05, eval_every=20,
                    eval_batches=VAL_BATCHES, max_grad_norm=1.0, seed=0, progress=False)  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def train_and_report(label, peft_model, train_data, val_data, config):
    """Train with `config`; print the trainable count, the held-out loss at step 0 and at the end, and the seconds
    taken; -> (held-out loss before, train()'s metrics)."""
    import time

    from minipeft.train import evaluate, train

    before = evaluate(peft_model, val_data, config.batch_size, config.eval_batches)[0]
    start = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, config)
    print(f"{label:13s}: {peft_model.num_parameters(trainable_only=True):,} trainable, val loss {before:.3f} -> "
          f"{metrics['val_loss']:.3f} in {config.steps} steps, {time.perf_counter() - start:.0f} s")  # fmt: skip
    return before, metrics


def sweep(variant, learning_rate):
    """The run of benchmarks/README.md's learning-rate sweep on the bundled model (60 steps, this CPU) for a
    variant ("lora", "lora_all", "qlora", "dora", "adapter", "prefix", "prompt", "full") at a learning rate: a dict
    with "before" and "last" (held-out losses at step 0 and 60) and "eval"; None if the sweep has no such run."""
    import json
    from pathlib import Path

    runs = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("sweep-tiny-cpu*.json")):
        runs |= {(r["method"], r["lr"]): r for r in json.loads(path.read_text())["runs"]}
    return runs.get((variant, learning_rate))
