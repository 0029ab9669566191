"""resume.py on its own: the pieces train() saves and restores come back exactly (train()'s crash-and-resume runs,
bit-identical to uninterrupted ones, are in tests/test_train.py)."""

import json
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minipeft.resume import find_checkpoint, load_optimizer_state, optimizer_state, rng_state, set_rng_state


def test_optimizer_state_split_and_restored_continues_identically(tmp_path):
    """AdamW's state through (safetensors tensors, JSON scalars) and back: the next steps are the same."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4))]
    groups = [
        {"params": [params[0]], "param_names": ["w"], "weight_decay": 0.1},
        {"params": [params[1]], "param_names": ["b"]},
    ]

    def step(opt, ps):
        for p in ps:
            p.grad = torch.ones_like(p) * p.sum().detach()
        opt.step()

    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(2):
        step(opt, params)
    tensors, meta = optimizer_state(opt)
    save_file(tensors, tmp_path / "optimizer.safetensors")  # through the files, as train() does
    tensors, meta = load_file(tmp_path / "optimizer.safetensors"), json.loads(json.dumps(meta))
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"exp_avg", "exp_avg_sq"} and len(meta["scalars"]) == 2
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW(
        [{"params": [copies[0]], "param_names": ["w"]}, {"params": [copies[1]], "param_names": ["b"]}], lr=0.5
    )
    load_optimizer_state(fresh, tensors, meta)
    assert fresh.param_groups[0]["lr"] == 1e-2 and fresh.param_groups[0]["weight_decay"] == 0.1  # from the file
    for _ in range(3):
        step(opt, params)
        step(fresh, copies)
    assert all(torch.equal(p, c) for p, c in zip(params, copies))


def test_rng_states_come_back():
    tensors, state = rng_state()
    state = json.loads(json.dumps(state))
    draws = torch.rand(3), random.random(), np.random.rand(2)
    set_rng_state(tensors, state)
    again = torch.rand(3), random.random(), np.random.rand(2)
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and np.array_equal(draws[2], again[2])


def test_find_checkpoint_prefers_the_new_one_and_falls_back_to_old(tmp_path):
    assert find_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"  # a crash between the two renames
    (tmp_path / "checkpoint").mkdir()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"  # no trainer_state.json: not complete
    (tmp_path / "checkpoint" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
