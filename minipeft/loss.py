"""The training loss: mean next-token cross-entropy, as transformers computes it.

    causal_lm_loss(logits, labels)      logits (B, T, V), labels (B, T) -> a scalar

Position t predicts labels[t + 1]; labels == -100 are ignored (the mean is over the rest; NaN if none is left).
Only bf16/fp16 logits are upcast (to float32); a float64 model stays float64, which the gradient checks rely on.
fast.py computes the same value in chunks from the hidden states, never holding the (B, T, V) logits.
"""

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels == -100 are ignored."""
    logits = logits[:, :-1].float() if logits.dtype in HALF else logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
