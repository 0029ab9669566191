"""Beyond one device: data-parallel (DDP) and sharded (FSDP2) training on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 -m minipeft.cli finetune --method lora          # DDP: adapters, replicated
    torchrun --nproc_per_node 2 -m minipeft.cli finetune --method full --fsdp   # FSDP2: every weight sharded
    minipeft finetune --nproc 2 --method qlora --fsdp                          # FSDP2: the 4-bit base sharded
    minipeft finetune --nproc 2 ...                                            # any of them, through torchrun's API

torchrun starts N processes and tells each its RANK, WORLD_SIZE and LOCAL_RANK; `setup()` joins them into one
process group (gloo on CPU, nccl on CUDA, one GPU per process: cuda:LOCAL_RANK). train() then asks a `Parallel`
(fast.parallel(model, cfg)) for everything that differs from one process; with one process it changes nothing.

Data. A global micro-batch is batch_size x N rows, drawn exactly as one process draws a batch of that size
(data.batch_stream: a pure function of (seed, step)); rank r takes rows r*B .. (r+1)*B - 1. So

    global batch = batch_size (per rank) x N x grad_accum

and N processes train exactly what one process trains with batch_size x N (tests/test_distributed.py: each step's
loss and the final weights, float64). Each rank weights its mean loss by its share n_r / n_total of the step's
target tokens (n_total counted over the whole global step, which every rank knows: it holds all the rows' labels)
and by N, because DDP and FSDP2 average gradients over ranks: the sum is the gradient of the mean over all tokens.

DDP (torch.nn.parallel.DistributedDataParallel) keeps a whole model on every rank and all-reduces gradients in
backward. It reduces only parameters that require grad, so LoRA on a 7B base moves the adapter's few MB per step,
not the base. With grad_accum > 1, micro-batches before the last run under no_sync(): one all-reduce per step.

FSDP2 (torch.distributed.fsdp.fully_shard; TrainConfig.fsdp, --fsdp) shards every parameter across ranks (dim 0):
each Block is one unit (its weights are all-gathered just before its forward and backward, and freed after), the
root holds the embeddings, the final norm and the head (tied or not). Gradients are reduce-scattered, the optimizer
steps only the local shard: weights, gradients and AdamW's two moments all take ~1/N per rank. On CUDA the units
compute in bf16 with float32 reduction (MixedPrecisionPolicy); on CPU in the model's dtype (float64 is exact).
- Full fine-tuning (--method full): every weight trains.
- LoRA (--method lora, DoRA too): the frozen base is sharded as above, and each adapter's A and B are parameters of
  their Block's unit like any other, trainable: sharded, gathered for forward and backward, their gradients
  reduce-scattered. Only the adapter's shards get gradients and AdamW states.
- QLoRA (--method qlora): the idea of Answer.AI's FSDP + QLoRA, a base that does not fit one device in 4 bits fits
  N. The NF4 codes and their quantization state (absmax, double quantization's offset, nested absmax and code)
  are sharded too: FSDP2 shards parameters only, so they become frozen parameters (distributed_nf4.py), each
  byte held as a bf16 number: the 4-bit base takes 2/N of its bytes per rank, not 1/N.
Other adapters (bottleneck, IA3, prefix, prompt) are refused (check_shardable): nothing tests them sharded.

Files (with FSDP: distributed_io.py). Only rank 0 writes (metrics.json, checkpoints, adapters), each atomically
(files.py); with FSDP every rank first takes part in gathering the full tensors (DTensor.full_tensor()), then rank 0
writes them as one process would, from a plain copy of the model (gathered_model: the structure kept from before
sharding, on the meta device, filled with the gathered tensors; for LoRA/QLoRA the frozen base is gathered too, at
each checkpoint: simple, one all-gather of the base; gathering only the adapter is not done). A checkpoint holds the
full trainable tensors and AdamW states; --resume shards them again like their parameters. It records the world
size; --resume with another one stops at once with a clear error (the data each rank reads, and FSDP's shards,
depend on it). Held-out loss: every rank evaluates its rows of each global batch, the sums of losses and token
counts are all-reduced, so the number equals one process's.

Loading with low memory (for a base larger than one device). shard() reads rank 0's weights only: rank 0 builds
the model on its CPU as one process would (load_pretrained, quantize_model, get_peft_model: the same adapter init),
the other ranks build the same structure on the meta device (load_pretrained(device="meta") reads no weight;
quantize_model and get_peft_model work there: no pickle, nothing sent but the weights), and shard() then makes every
rank's tree meta, applies fully_shard, gives each rank its (uninitialised) shards on its device (to_empty) and fills
them from rank 0, one tensor at a time (send/recv of each rank's rows; buffers broadcast). No rank but 0 ever holds
a whole weight; rank 0's CPU copy is dropped as it goes (tests/test_distributed.py records every tensor rank 1
makes). A model that every rank built whole (the tests' in-process runs) is sharded the same way, its values on
ranks > 0 ignored. LoftQ (its start needs every weight) is refused under --fsdp.

Not done: nccl and the bf16 policy have never run in the tests (CPU, gloo only); by hand on two H200s:
`bash benchmarks/run_h200x2.sh fsdpcheck` (4-bit bytes and step-0 loss against one process).

Failures: a rank that raises exits non-zero; torchrun then stops the others and exits non-zero with that rank's
error (`minipeft finetune --nproc` prints it); nothing waits forever.
"""

import contextlib
import datetime
import os
import warnings

import torch
import torch.distributed as dist

from .distributed_io import _PLAIN, _full, _Gathered, _Param, _Sharding, _skeleton, gathered_model
from .distributed_nf4 import _shard_nf4
from .nf4 import NF4Linear

FSDP_METHODS = ("full", "lora", "qlora")  # what --fsdp can shard (see the module docstring)
FSDP_PEFT_TYPES = ("LORA",)  # the adapters it trains inside the shards (their configs' peft_type)
WORLD_FILE = "distributed.json"  # in each checkpoint: the world size (and --fsdp) that wrote it


def launched():
    """True in a process that torchrun started (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0)


def check_devices(nproc, device):
    """Raise ValueError for a launch that cannot work: CUDA asked for with no GPU, or more processes than GPUs."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} (backend nccl) needs a CUDA GPU and none is available: use --device cpu")
    if cuda and nproc > torch.cuda.device_count():
        raise ValueError(
            f"{nproc} processes but {torch.cuda.device_count()} CUDA device(s): one GPU per process, so at most "
            f"{torch.cuda.device_count()} (or --device cpu)"
        )
    return "cuda" if cuda else "cpu"


def setup(device="auto", timeout_s=600):
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank's device."""
    rank, world, local = env()
    kind = check_devices(world, device)
    if kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return f"cuda:{local}" if kind == "cuda" else "cpu"


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def abort():
    """Leave the process group at once, after an error on this rank. NCCL's destroy_process_group waits for the
    other ranks, which wait in a collective for this one: the job hung (till the group's timeout) before the error
    was even printed. Aborting frees this rank to exit, and torchrun then stops the others."""
    if dist.is_initialized():
        abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)  # (private API: may be absent)
        if dist.get_backend() == "nccl" and abort_group is not None:
            abort_group()
        else:
            dist.destroy_process_group()


def world():
    """(rank, world_size) of the process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def check_shardable(model):
    """Raise ValueError for a model FSDP2 is not tested to train: a PeftModel with adapters other than LoRA's
    (LoRA, rsLoRA and DoRA, on a dense or a 4-bit base, are tested against one process)."""
    kinds = sorted({c.peft_type for c in getattr(model, "peft_config", {}).values()} - set(FSDP_PEFT_TYPES))
    if kinds:
        raise ValueError(
            f"fsdp=True shards full fine-tuning and LoRA/QLoRA models, not {', '.join(kinds)} adapters: train them "
            "data-parallel (fsdp=False)"
        )


def shard(model, device, bf16=None):
    """FSDP2 in place: each Block one unit, the root the rest; 4-bit layers' tensors sharded too (_shard_nf4).
    Every rank passes the same module tree, but only rank 0's weights are read: the others' may be on the meta
    device (load_pretrained(device="meta"), then quantize_model / get_peft_model there). Each rank ends with its shards of rank 0's weights on `device`, received one tensor
    at a time, so no rank but 0 ever holds a whole weight, and rank 0's whole copy (on its CPU, say) is freed as
    it goes. bf16 (default: on CUDA) computes in bf16 and reduces in float32. Returns model (its class becomes
    FSDP<class>: still a Transformer or PeftModel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kind = torch.device(device).type
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    bf16 = kind == "cuda" if bf16 is None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    # FSDP2 warns that a Block's output is a view (an in-place op on it would skip the all-gather): no code here
    # writes into a Block's output in place, and the tests check every gradient against one process.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    main = dist.get_rank() == 0
    if main:
        _PLAIN[model] = _skeleton(model)  # what gathered_model fills: the structure before sharding
    for m in model.modules():
        if isinstance(m, NF4Linear):
            _shard_nf4(m)
    whole = {n: p.detach() for n, p in model.named_parameters()} if main else {}  # rank 0's weights, to send
    buffers = {n: b.detach() for n, b in model.named_buffers()} if main else {}
    _to_meta(model)  # every rank alike from here: the structure only
    base = getattr(model, "base_model", model)
    for layer in base.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=device)  # each rank's shards, uninitialised; filled from rank 0's weights:
    with torch.no_grad():
        for name, p in model.named_parameters():  # (the same order on every rank; tied weights once)
            _scatter_rows(whole.pop(name, None), p.to_local())
        for name, b in model.named_buffers():  # (the rotary frequencies: not sharded, the same on every rank)
            if main:
                b.copy_(buffers[name])
            dist.broadcast(b, 0)
    return model


def _to_meta(model):  # every parameter replaced by one on the meta device (tied ones stay tied)
    metas = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                metas.setdefault(id(p), torch.nn.Parameter(p.detach().to("meta"), p.requires_grad))
                m._parameters[k] = metas[id(p)]


def _scatter_rows(full, local):
    """Rank 0 sends rank r its rows of `full` (torch.chunk along dim 0, as FSDP2 shards; rank 0 keeps the first,
    a short tensor leaves the last ranks none); every other rank receives into `local`, its shard."""
    rank, n = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        if local.numel():
            dist.recv(local, 0)
        return
    rows = list(full.chunk(n)) + [full[:0]] * (n - len(full.chunk(n)))
    for r in range(1, n):
        if rows[r].numel():
            dist.send(rows[r].to(local.device, local.dtype).contiguous(), r)
    local.copy_(rows[0])


class Parallel:
    """What train() asks of the processes it runs on. With one process every method is the identity (module is
    the model, rows() the whole batch, scale 1, all_sum() the values), so the loop has one path.

    model: what is trained and saved; module: what the loop calls (the DDP wrapper, or the sharded model)."""

    def __init__(self, model, cfg, device):
        self.rank, self.world = world()
        self.model = self.module = model
        self.sharded = bool(getattr(cfg, "fsdp", False))
        if self.sharded:
            check_shardable(model)
        if self.sharded and not dist.is_initialized():
            raise ValueError("TrainConfig.fsdp=True needs a process group: launch with torchrun (or --nproc N)")
        if self.sharded and device.type == "meta":
            raise ValueError("the model is on the meta device (a structure without weights): set TrainConfig.device")
        if self.sharded:
            shard(model, device)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            # reduces exactly the parameters that require grad; gradient_as_bucket_view: each gradient is a view
            # into DDP's all-reduce buckets (no second copy of the gradients, none copied in and out per step)
            self.module = DDP(model, device_ids=ids, gradient_as_bucket_view=True)

    @property
    def is_main(self):  # rank 0: the one that logs and writes
        return self.rank == 0

    @property
    def scale(self):  # DDP and FSDP2 average gradients over ranks; the loop wants their sum
        return self.world

    def rows(self, batch, per_rank):
        """This rank's rows of a global batch (rows r*per_rank .. (r+1)*per_rank - 1; fewer, or none, at the end
        of a held-out set)."""
        if self.world == 1:
            return batch
        part = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return {k: None if v is None else v[part] for k, v in batch.items()}

    def sync(self, last):
        """Around one micro-batch's forward and backward: gradients are reduced only on the step's last one."""
        if last or self.world == 1:
            if self.sharded:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.sharded:
            self.model.set_requires_gradient_sync(False)  # FSDP2 keeps unsharded gradients to accumulate into
            return contextlib.nullcontext()
        return self.module.no_sync()

    def all_sum(self, values):
        """[float] summed over ranks (one all-reduce, float64); the values themselves with one process."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def sum_(self, t):
        """A tensor summed over ranks in place, on its device (queued: nothing waits for it here); t itself with one
        process."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def local(self, tensors):  # each rank's own part (for checks that need no communication)
        return [_local(t) for t in tensors]

    def clip(self, params, max_norm):
        """clip_grad_norm_ over the whole model (a sharded one too); returns the norm as a 0-dim tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return _full(norm)

    def for_saving(self):
        """The model for a save callback, on rank 0 (None elsewhere); every rank must call it (FSDP gathers)."""
        model = gathered_model(self.model) if self.sharded else self.model
        return model if self.is_main else None

    def checkpoint(self, save, out_dir, step, named, optimizer, scheduler, cfg, on_save):
        """save_checkpoint(...) written once, by rank 0, with full tensors; returns its path on every rank."""
        if self.world == 1:
            return save(out_dir, step, self.model, named, optimizer, scheduler, cfg, on_save)
        if self.sharded:  # every rank takes part in gathering, in the same order; rank 0 writes
            named = [(n, _full(p)) for n, p in named]
            optimizer = _Gathered(optimizer)
        model = self.for_saving()
        path = None
        if self.is_main:

            def with_world(m, tmp):
                from .files import write_json

                write_json(tmp / WORLD_FILE, {"world_size": self.world, "fsdp": self.sharded})
                if on_save is not None:
                    on_save(m, tmp)

            path = save(out_dir, step, model, named, optimizer, scheduler, cfg, with_world)
        barrier()  # nobody runs ahead of a checkpoint that is not on disk yet
        from .resume import CHECKPOINT

        return path or out_dir / CHECKPOINT

    def resume(self, load, path, named, optimizer, scheduler):
        """load_checkpoint(...) on every rank, after checking the world size it was written with."""
        from .files import read_json

        saved = read_json(path / WORLD_FILE, expect=dict) if (path / WORLD_FILE).is_file() else {"world_size": 1}
        if saved.get("world_size") != self.world or bool(saved.get("fsdp")) != self.sharded:
            was = f"{saved.get('world_size')} process(es){' with --fsdp' if saved.get('fsdp') else ''}"
            now = f"{self.world}{' with --fsdp' if self.sharded else ''}"
            raise ValueError(
                f"the checkpoint in {path} was written by {was}, this run has {now}: resume with the same "
                "--nproc and --fsdp (the rows each rank reads, and the shards, depend on them)"
            )
        if self.sharded:
            named = [(n, _Param(p)) for n, p in named]
            optimizer = _Sharding(optimizer)
        return load(path, named, optimizer, scheduler)
