"""Under FSDP2 on GPUs, does each 4-bit layer read the very bytes it was quantized to? (On CUDA, bytes once held
two to a bf16 came back changed wherever a pair read as a NaN: the one NaN pattern a trip through float32 makes.)

    torchrun --nproc-per-node 2 benchmarks/fsdp_nf4_check.py      # NCCL, one GPU per process

Rank 0 loads the bundled tiny-shakespeare model in bf16 on its CPU and quantizes it, the others build it on the
meta device (as `minipeft finetune --fsdp` does); after distributed.shard, each Block is gathered in turn and every
4-bit tensor of its layers is compared, byte for byte, with rank 0's before sharding. Prints each difference, then
"all equal" or the count of layers that differ; exits 1 if any does.
"""

import os
import sys

import torch
import torch.distributed as dist

from minipeft import load_pretrained
from minipeft.distributed import shard
from minipeft.distributed_nf4 import _gathered_nf4, _nf4_fields
from minipeft.nf4 import NF4Linear, quantize_model


def main():
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    model, _ = load_pretrained("tiny-shakespeare", dtype=torch.bfloat16, device="cpu" if rank == 0 else "meta")
    model = quantize_model(model)
    before = {n: m.qweight for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    shard(model, torch.device("cuda", torch.cuda.current_device()))
    bad = 0
    for i, block in enumerate(model.model.layers):
        block.unshard()
        for n, m in block.named_modules():
            if rank != 0 or not isinstance(m, NF4Linear):
                continue
            got, want = _gathered_nf4(m), before[f"model.layers.{i}.{n}"]
            for f in _nf4_fields(want):
                a, b = (getattr(q, f).reshape(-1).view(torch.uint8).cpu() for q in (want, got))
                if not torch.equal(a, b):
                    bad += 1
                    print(f"layer {i} {n} {f}: {int((a != b).sum())} of {a.numel()} bytes differ")
        block.reshard()
    if rank == 0:
        print("all equal" if not bad else f"{bad} tensors differ")
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
