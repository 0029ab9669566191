"""Checks for lesson 01's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft/train.py's schedule, one big batch's gradient, torch.optim.AdamW); it raises AssertionError
saying what differs, never what the answer is."""

import math

import torch
from common import check_close


def check_lr_multiplier(lr_multiplier):
    """Against minipeft.train.lr_multiplier (what train()'s LambdaLR uses) on every step of several schedules."""
    from minipeft.train import lr_multiplier as reference

    for steps, warmup, r in [(60, 3, 0.1), (10, 0, 0.1), (20, 5, 0.0), (8, 2, 1.0), (1, 0, 0.1), (100, 10, 0.25)]:
        for step in range(steps):
            ours, expected = lr_multiplier(step, steps, warmup, r), reference(step, steps, warmup, r)
            assert isinstance(ours, (int, float)), f"expected a number, got {type(ours).__name__}"
            where = f"steps={steps}, warmup_steps={warmup}, min_lr_ratio={r}, step {step}"
            if step < warmup:
                assert ours > 0, f"{where}: the multiplier is {ours}; warmup should never give a step lr 0"
            assert math.isclose(ours, expected, rel_tol=1e-9, abs_tol=1e-12), (
                f"{where} ({'warmup' if step < warmup else 'cosine'}): your multiplier is off by {ours - expected:+.3g}"
            )


def _tiny_model():
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Transformer(cfg).double()


def check_accumulate_gradients(accumulate_gradients):
    """Against the gradient of one big batch (the micro-batches stacked), on micro-batches whose numbers of target
    tokens differ (labels -100 where a token is not a target, as in padded instruction data)."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (5, 12), generator=g)
    labels = ids.clone()
    labels[0, :9] = -100  # a row with 2 targets (position t predicts labels[t + 1])
    labels[3, :4] = -100
    labels[4, 6:] = -100
    micro = [(0, 2), (2, 3), (3, 5)]  # three micro-batches: 2, 1 and 2 rows, with different numbers of targets
    micro_batches = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in micro]

    model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()  # the whole batch: the mean over all its target tokens
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, micro_batches)
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} has no gradient after your function: call backward on each micro-batch"
        check_close(f"the gradient of {n}", p.grad, expected[n], rtol=1e-9, atol=1e-12)


def _torch_adamw(start, grads, lr, betas, eps, wd):
    """torch's AdamW on `start` with these gradients: after each step, (weights, exp_avg, exp_avg_sq).
    The functional form of torch.optim.AdamW (its single-tensor code), which does not import torch.compile's
    machinery as the first optimizer.step() does (seconds); the class where that form is missing."""
    p = torch.nn.Parameter(start.clone())
    states = []
    try:
        from torch.optim.adamw import adamw

        m, v, t = torch.zeros_like(start), torch.zeros_like(start), torch.tensor(0.0, dtype=torch.float64)
        for grad in grads:  # (it counts the steps in t itself)
            with torch.no_grad():
                adamw([p], [grad], [m], [v], [], [t], foreach=False, capturable=False, differentiable=False,
                      fused=None, grad_scale=None, found_inf=None, amsgrad=False, beta1=betas[0], beta2=betas[1],
                      lr=lr, weight_decay=wd, eps=eps, maximize=False)  # fmt: skip
            states.append((p.detach().clone(), m.clone(), v.clone()))
    except (ImportError, TypeError):  # another torch version: its optimizer class
        p, states = torch.nn.Parameter(start.clone()), []
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
            s = opt.state[p]
            states.append((p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()))
    return states


def check_adamw_step(adamw_step):
    """Against torch's AdamW: four steps with different gradients, the weights and both states after each."""
    g = torch.Generator().manual_seed(2)
    start = torch.randn(4, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(4, 6, generator=g, dtype=torch.float64) * s for s in (1.0, 0.1, 3.0, 0.5)]
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    reference = _torch_adamw(start, grads, lr, betas, eps, wd)
    param, exp_avg, exp_avg_sq = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for t, (grad, (ref_p, ref_m, ref_v)) in enumerate(zip(grads, reference), start=1):
        out = adamw_step(param, grad.clone(), exp_avg, exp_avg_sq, t, lr, betas, eps, wd)
        assert out is None or out is param, "update param, exp_avg and exp_avg_sq in place (and return nothing)"
        check_close(f"exp_avg after step {t}", exp_avg, ref_m, rtol=1e-12, atol=1e-15)
        check_close(f"exp_avg_sq after step {t}", exp_avg_sq, ref_v, rtol=1e-12, atol=1e-15)
        check_close(f"the weights after step {t}", param, ref_p, rtol=1e-12, atol=1e-15)


CHECKS = {
    "lr_multiplier": check_lr_multiplier,
    "accumulate_gradients": check_accumulate_gradients,
    "adamw_step": check_adamw_step,
}
