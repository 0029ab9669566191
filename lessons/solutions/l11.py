"""Solutions to lesson 11's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""

import math


def rank_rows(batch, rank, world, per_rank):
    part = slice(rank * per_rank, (rank + 1) * per_rank)  # a contiguous block; past the end: fewer rows, or none
    return {k: None if v is None else v[part] for k, v in batch.items()}


def lora_allreduce_bytes(config, r, target_modules, bytes_per_value):
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    h, m = config.hidden_size, config.intermediate_size
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, m),
        "up_proj": (h, m),
        "down_proj": (m, h),
    }  # fmt: skip  (in, out)
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules)  # A (r, in) and B (out, r)
    return config.num_hidden_layers * per_layer * bytes_per_value  # every trainable gradient, once per step


def shard_numel(shape, world, rank):
    rows = math.ceil(shape[0] / world)  # torch.chunk: equal chunks of ceil(d0 / N) rows, the last ones shorter
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * math.prod(shape[1:])


def _rank_rows_interleaved(batch, rank, world, per_rank):  # rows rank, rank + N, ...: not the rows train() gives
    return {k: None if v is None else v[rank::world][:per_rank] for k, v in batch.items()}


def _lora_allreduce_bytes_no_gqa(config, r, target_modules, bytes_per_value):  # k and v as wide as q
    h, m = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}  # fmt: skip
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules) * bytes_per_value


def _shard_numel_even(shape, world, rank):  # d0 // N rows each, the remainder on the last rank
    rows = shape[0] // world + (shape[0] % world if rank == world - 1 else 0)
    return rows * math.prod(shape[1:])


MISTAKES = {
    "rank_rows": _rank_rows_interleaved,
    "lora_allreduce_bytes": _lora_allreduce_bytes_no_gqa,
    "shard_numel": _shard_numel_even,
}
