"""Operations per decoding step: base model vs unmerged LoRA vs merged LoRA (what a host-bound GPU pays for).

    python benchmarks/decode_ops.py          # SmolLM2-135M's shape, random bf16 weights, on this CPU (a few seconds)

On a GPU, decoding one token at a time is host-bound (benchmarks/README.md: ~25 ms per token for 30 layers on an
H200, far above the kernels' time), so its cost follows the number of operations launched, not their size. This
counts the operations that reach the backend (views excluded) in one step with a KV cache, by a
TorchDispatchMode, for the three models of bench_finetune's generation measurement.
"""

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minipeft import LoraConfig, ModelConfig, Transformer, get_peft_model  # noqa: E402

VIEWS = {"view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze", "alias",
         "permute", "detach", "as_strided", "split", "unbind", "_reshape_alias", "lift_fresh"}  # fmt: skip


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in VIEWS
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def ops_per_step(model, prompt_len=8):
    ids = torch.zeros(1, prompt_len + 1, dtype=torch.long)
    cache = model(ids[:, :-1], use_cache=True).past_key_values
    with CountOps() as c:
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    return c.n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args(argv)
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64)  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    models = {"base": lambda: Transformer(cfg).to(torch.bfloat16).eval(),
              "LoRA all-linear unmerged": lambda: get_peft_model(Transformer(cfg).to(torch.bfloat16), lora).eval(),
              "LoRA all-linear merged": lambda: get_peft_model(Transformer(cfg).to(torch.bfloat16), lora)
              .merge_and_unload().eval()}  # fmt: skip
    counts = {name: ops_per_step(build()) for name, build in models.items()}
    adapted = 7 * args.layers
    for name, n in counts.items():
        print(f"{name:26s} {n:5d} operations per decoding step")
    extra = (counts["LoRA all-linear unmerged"] - counts["base"]) / adapted
    print(f"unmerged LoRA: {extra:.1f} more operations per adapted linear layer ({adapted} of them)")
    return counts


if __name__ == "__main__":
    main()
