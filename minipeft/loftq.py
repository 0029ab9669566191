"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"): a LoRA start
that cancels part of the 4-bit quantization error.

QLoRA quantizes W to Q and starts B A at zero, so the model starts at dequant(Q), off W by the quantization error.
LoftQ picks Q and the start of B A together, alternating T times (loftq_iter):
    Q     = quantize(W - s B A)                      (first step: B A = 0, so Q = quantize(W), QLoRA's own Q)
    s B A = the best rank-r approximation of W - dequant(Q)   (top-r SVD: U_r S_r V_r^T)
so that dequant(Q) + s B A is closer to W than dequant(Q) alone. Shapes: W (out, in), A (r, in), B (out, r);
A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), split evenly as PiSSA's (lora.py).

The quantizer is nf4.py's (bit-compatible with bitsandbytes), blocks of 64, without double quantization, as
PEFT's loftq_init quantizes (bitsandbytes' Params4bit with compress_statistics=False).

How you get there. PEFT runs LoftQ on the full-precision weight, writes dequant(Q) back as a float weight, and
leaves it to you to save that backbone and load it again in 4 bits. Here one call does both:
    get_peft_model(float_model, LoraConfig(r=8, init_lora_weights="loftq", loftq_config=LoftQConfig()))
quantizes each targeted layer itself: its base becomes an NF4Linear holding the final Q (the untargeted layers
stay as they are; quantize_model() them afterwards for a fully 4-bit model). A base that is already 4-bit is an
error: LoftQ needs the full-precision W to choose Q.

Where we differ from PEFT: PEFT puts the SVD factors into A and B without the 1/s (HF PEFT issue #1982), so its
start only cancels the error when lora_alpha == r (s = 1, PEFT's default r = alpha = 8); ours divides by s, so
s B A is the SVD part for any alpha, and equals PEFT's A and B when s = 1.
"""

import dataclasses
from dataclasses import dataclass

import torch

from .nf4 import dequantize_nf4, quantize_nf4

HALF = (torch.float16, torch.bfloat16)


@dataclass
class LoftQConfig:
    """PEFT's names: loftq_bits (4: NF4, the only quantizer here) and loftq_iter (alternating steps, >= 1)."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self):
        check_loftq_config(dataclasses.asdict(self))


def check_loftq_config(d):
    """A LoraConfig's loftq_config dict (as PEFT stores it): a clear error for a bad value, before any work."""
    if unknown := sorted(set(d) - {"loftq_bits", "loftq_iter"}):
        raise ValueError(f"loftq_config has unknown keys {unknown}; valid: 'loftq_bits', 'loftq_iter'")
    bits, steps = d.get("loftq_bits", 4), d.get("loftq_iter", 1)
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"loftq_bits must be 4 (NF4, the only 4-bit quantizer here; PEFT's 8 is not), got {bits!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"loftq_iter must be an integer >= 1 (alternating steps), got {steps!r}")


@torch.no_grad()
def loftq_init(weight, r, scaling=1.0, num_iter=1, blocksize=64):
    """-> (q, A, B, errors): q the NF4Weight of the final Q (dtype: the weight's), A (r, in) and B (out, r) with
    dequant(q) + scaling * B A the LoftQ approximation of `weight`, and errors[i] = ||W - (dequant(Q_i) + s B_i A_i)||
    (Frobenius) after step i. Computed in float32 (float64 stays float64)."""
    w = weight.detach().to(torch.float32 if weight.dtype in HALF else weight.dtype)
    res, errors = w, []
    for _ in range(num_iter):
        q = quantize_nf4(res, blocksize, double_quant=False)  # Q = quantize(W - s B A): the last residual
        deq = dequantize_nf4(q).to(w.dtype)
        U, S, Vh = torch.linalg.svd(w - deq, full_matrices=False)
        low_rank = U[:, :r] * S[:r] @ Vh[:r]  # the best rank-r approximation of W - dequant(Q)
        errors.append(float(torch.linalg.matrix_norm(w - deq - low_rank)))
        res = w - low_rank
    root = (S[:r] / scaling).sqrt()  # sqrt(S_r / s): s B A = U_r S_r V_r^T
    A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    return dataclasses.replace(q, dtype=weight.dtype), A, B, errors
