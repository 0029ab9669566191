"""All-reduce bandwidth between the GPUs of one host, through torch.distributed and NCCL: what data-parallel
training pays per step to reduce its gradients (DDP all-reduces every trainable gradient; FSDP2 all-gathers and
reduce-scatters every weight).

    torchrun --nproc_per_node 2 benchmarks/allreduce.py --out r.jsonl

For each size (MB of bf16 and of float32 numbers): the median time of 20 all-reduces after 5, the algorithm
bandwidth (bytes / time) and the bus bandwidth (x 2(N-1)/N, NCCL's measure: comparable across world sizes).
Rank 0 prints one JSON line per size.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from harness import emit, utc_now


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default="1,16,64,256,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    for mb in (int(x) for x in args.sizes_mb.split(",")):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.ones(mb * 2**20 // dtype.itemsize, dtype=dtype, device="cuda")
            times = []
            for i in range(25):
                torch.cuda.synchronize()
                t = time.perf_counter()
                dist.all_reduce(x)
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(time.perf_counter() - t)
            s = statistics.median(times)
            algbw = mb * 2**20 / s / 1e9
            res = dict(mb=mb, dtype=str(dtype).split(".")[1], world=world, ms=round(s * 1e3, 3),
                       algbw_gb_s=round(algbw, 1), busbw_gb_s=round(algbw * 2 * (world - 1) / world, 1),
                       device=torch.cuda.get_device_name(), date=utc_now())  # fmt: skip
            if rank == 0:
                emit(res, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
