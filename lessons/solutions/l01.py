"""Solutions to lesson 01's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import math


def lr_multiplier(step, steps, warmup_steps, min_lr_ratio):
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)  # 1/(W+1), 2/(W+1), ...: never 0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - 1 - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def accumulate_gradients(model, micro_batches):
    count = lambda b: int((b["labels"][:, 1:] != -100).sum())  # noqa: E731  (targets: labels shifted by one)
    total = sum(count(b) for b in micro_batches)
    for b in micro_batches:
        loss = model(b["input_ids"], labels=b["labels"]).loss  # the mean over this micro-batch's targets
        (loss * count(b) / total).backward()  # its share of the whole batch's targets


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = exp_avg / (1 - beta1**step)  # bias corrections: both states start at 0
    v_hat = exp_avg_sq / (1 - beta2**step)
    param.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)


def _lr_multiplier_from_zero(step, steps, warmup_steps, min_lr_ratio):  # warmup from 0: the first step is wasted
    if step < warmup_steps:
        return step / warmup_steps
    return lr_multiplier(step, steps, warmup_steps, min_lr_ratio)


def _accumulate_by_count(model, micro_batches):  # loss / n_micro: right only when every micro-batch has as many targets
    for b in micro_batches:
        (model(b["input_ids"], labels=b["labels"]).loss / len(micro_batches)).backward()


def _adamw_step_no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=0.0):  # fmt: skip
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


MISTAKES = {
    "lr_multiplier": _lr_multiplier_from_zero,
    "accumulate_gradients": _accumulate_by_count,
    "adamw_step": _adamw_step_no_bias_correction,
}
