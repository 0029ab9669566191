"""The chunked cross-entropy, eager chunks vs fused (torch.compile'd) chunks: ms per loss + backward, the peak
memory above the inputs, and the loss and gradient they give. At the 1B shape: 4 x 1024 tokens, hidden 2048,
vocabulary 128,256, bf16.

    python benchmarks/loss_chunks.py                          # on a GPU: the 1B shape
    python benchmarks/loss_chunks.py --device cpu --quick     # smoke run: a small shape
"""

import argparse
import time

import torch

from minipeft.fast import chunked_causal_lm_loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 x 64 tokens, hidden 32, vocabulary 1000, 2 timed calls")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    (B, T, D, V), reps = ((2, 64, 32, 1000), 2) if args.quick else ((4, 1024, 2048, 128256), 10)
    torch.manual_seed(0)
    h = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=dev)
    cuda = dev.type == "cuda"
    rows = []
    for fused in (False, True, False, True):  # twice each, interleaved: the second pair is warm
        for need_w in (False, True):  # False: a frozen lm_head (LoRA); True: full fine-tuning
            w.requires_grad_(need_w)
            for _ in range(3):
                h.grad = w.grad = None
                chunked_causal_lm_loss(h, w, labels, fused=fused).backward()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            t = time.perf_counter()
            for _ in range(reps):
                h.grad = w.grad = None
                loss = chunked_causal_lm_loss(h, w, labels, fused=fused)
                loss.backward()
            if cuda:
                torch.cuda.synchronize()
            row = dict(fused=fused, lm_head_grad=need_w, ms=1e3 * (time.perf_counter() - t) / reps, loss=loss.item(),
                       peak_over_inputs_mib=(torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
                       grad_h_norm=h.grad.float().norm().item())  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
