"""Checks for lesson 11's exercises: each calls your function on fixed inputs and compares it with an independent
reference (distributed.Parallel.rows, the trainable parameters of a real PeftModel, torch.chunk as FSDP2 shards);
it raises AssertionError saying what differs, never what the answer is."""

import torch


def _parallel(rank, world):  # minipeft's Parallel as rank `rank` of `world` sees it (its rows() needs no group)
    from minipeft.distributed import Parallel

    par = Parallel.__new__(Parallel)
    par.rank, par.world = rank, world
    return par


def check_rank_rows(rank_rows):
    """Against Parallel.rows for full global batches and for the short last batch of a held-out set (fewer rows
    than ranks x per_rank: a rank may get a few rows, or none)."""
    g = torch.Generator().manual_seed(0)
    for n_rows, world, per_rank in [(8, 2, 4), (8, 4, 2), (6, 3, 2), (5, 2, 4), (3, 4, 1), (7, 2, 4)]:
        ids = torch.randint(0, 100, (n_rows, 6), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": None}
        for rank in range(world):
            want = _parallel(rank, world).rows(batch, per_rank)
            got = rank_rows(batch, rank, world, per_rank)
            where = f"rank {rank} of {world}, {per_rank} rows each, a global batch of {n_rows} rows"
            assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: return a dict with the same keys"
            assert got["attention_mask"] is None, f"{where}: attention_mask None stays None"
            for k in ("input_ids", "labels"):
                assert got[k].shape == want[k].shape, (
                    f"{where}: {k} has {got[k].shape[0]} rows, expected {want[k].shape[0]}"
                )
                assert torch.equal(got[k], want[k]), f"{where}: {k} holds other rows than this rank's"


def check_lora_allreduce_bytes(lora_allreduce_bytes):
    """Against the trainable parameters of real PeftModels (what DDP reduces: every trainable gradient, once per
    optimizer step), for grouped-query attention, an explicit head_dim and several target sets and dtypes."""
    from minipeft.lora import LoraConfig
    from minipeft.model import ModelConfig, Transformer
    from minipeft.peft import get_peft_model

    cases = [
        (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2), 8, ["q_proj", "v_proj"], 4),
        (dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16), 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 8),
        (dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=3), 2, ["gate_proj", "up_proj", "down_proj"], 2),
    ]  # fmt: skip
    for sizes, r, targets, nbytes in cases:
        config = ModelConfig(vocab_size=50, max_position_embeddings=32, **sizes)
        torch.manual_seed(0)
        model = get_peft_model(Transformer(config), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        want = sum(p.numel() for p in model.parameters() if p.requires_grad) * nbytes
        got = lora_allreduce_bytes(config, r, targets, nbytes)
        assert isinstance(got, int), f"return an int, got {type(got).__name__}"
        assert got == want, (
            f"r={r}, targets {targets}, {nbytes} bytes a value, {sizes}: {'too many' if got > want else 'too few'} "
            "bytes"
        )


def check_shard_numel(shard_numel):
    """Against torch.chunk along dim 0, which is how FSDP2 (fully_shard) cuts each parameter: the lesson checks
    that on the shards of a real run."""
    shapes = [(4096, 256), (704, 256), (5, 7), (3,), (10,), (9, 2), (1, 4), (256,)]
    for shape in shapes:
        for world in (1, 2, 3, 4):
            chunks = torch.chunk(torch.empty(shape), world, dim=0)
            for rank in range(world):
                want = chunks[rank].numel() if rank < len(chunks) else 0
                got = shard_numel(shape, world, rank)
                assert isinstance(got, int), f"return an int, got {type(got).__name__}"
                assert got == want, (
                    f"shape {shape}, rank {rank} of {world}: {'too many' if got > want else 'too few'} elements"
                )


CHECKS = {
    "rank_rows": check_rank_rows,
    "lora_allreduce_bytes": check_lora_allreduce_bytes,
    "shard_numel": check_shard_numel,
}
