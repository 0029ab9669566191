"""Saving and resuming a sharded (FSDP2) run: every rank's shards gathered into full tensors for rank 0 to write
(gathered_model, _Gathered), and a checkpoint's full tensors sharded again on --resume (_Sharding, _Param). Part of
distributed.py's Parallel (checkpoint, resume, for_saving) and shard() (which keeps the structure: _PLAIN), in a
file of its own for its length; tests/test_distributed.py checks the written files and the resumed runs against
one process."""

import copy
import weakref

import torch
import torch.distributed as dist

from .distributed_nf4 import _nf4_fields, _nf4_whole
from .nf4 import NF4Linear


def _full(t):  # a DTensor's whole value (a collective: every rank calls it, in the same order); others as they are
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


_PLAIN = weakref.WeakKeyDictionary()  # sharded model -> its structure before sharding, on the meta device (rank 0)


def _skeleton(model):
    """A copy of model's modules with every parameter and 4-bit tensor on the meta device (no memory, no data);
    buffers (the rotary frequencies) copied to the CPU."""
    memo = {id(b): b.detach().to("cpu", copy=True) for b in model.buffers()}
    memo |= {id(p): torch.nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, NF4Linear):
            memo |= {id(getattr(m.qweight, f)): getattr(m.qweight, f).to("meta") for f in _nf4_fields(m.qweight)}
    return copy.deepcopy(model, memo)


def gathered_model(model):
    """A plain (unsharded) copy of an FSDP-sharded model (a Transformer or a PeftModel, 4-bit layers included) on
    rank 0's CPU, None on the other ranks; every rank must call it. An unsharded model is returned as it is."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    for m in model.modules():  # (the root stays gathered after a forward with no backward, e.g. evaluation)
        if isinstance(m, FSDPModule):
            m.reshard()
    main = dist.get_rank() == 0
    full = {}
    for name, p in model.named_parameters():  # (tied weights once) the same order on every rank: collectives
        t = _full(p).detach()
        if main:
            full[name] = t.cpu()
    if not main:
        return None
    plain = copy.deepcopy(_PLAIN[model])
    whole = {id(p): torch.nn.Parameter(full[n], p.requires_grad) for n, p in plain.named_parameters()}
    for name, m in plain.named_modules():
        m._parameters.update({k: whole[id(p)] for k, p in m._parameters.items() if p is not None})  # ties kept
        if isinstance(m, NF4Linear):
            m.qweight = _nf4_whole(m, {f: full[f"{name}.qweight_{f}"] for f in _nf4_fields(m.qweight)})
    return plain


class _Gathered:  # an optimizer as save_checkpoint reads it: its state_dict with every DTensor gathered
    def __init__(self, optimizer):  # every rank: gathers each sharded state tensor (a collective)
        sd = optimizer.state_dict()
        self.sd = {**sd, "state": {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}}
        self.param_groups = optimizer.param_groups

    def state_dict(self):
        return self.sd


class _Sharding:  # an optimizer as load_checkpoint fills it: full state tensors become shards like their parameters
    def __init__(self, optimizer):
        self.optimizer, self.param_groups = optimizer, optimizer.param_groups
        self.params = [p for g in optimizer.param_groups for p in g["params"]]  # the state's indices

    def load_state_dict(self, sd):
        from torch.distributed.tensor import DTensor, distribute_tensor

        def shard_like(p, v):
            if not (isinstance(p, DTensor) and v.dim() > 0):
                return v
            return distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)

        state = {i: {k: shard_like(self.params[int(i)], v) for k, v in s.items()} for i, s in sd["state"].items()}
        self.optimizer.load_state_dict({**sd, "state": state})


class _Param:  # a sharded parameter as load_checkpoint sees it: the full shape, copy_ from a full tensor
    def __init__(self, p):
        self.p, self.shape = p, p.shape

    def copy_(self, full):
        from torch.distributed.tensor import distribute_tensor

        self.p.copy_(distribute_tensor(full.to(self.p.dtype), self.p.device_mesh, self.p.placements))
