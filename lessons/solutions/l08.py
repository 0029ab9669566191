"""Solutions to lesson 08's exercises (and, in MISTAKES, a typical wrong answer to each, which its check rejects)."""


def _shapes(config):  # (in, out) of every Linear of one block, by name (model.py's Attention and MLP)
    D, I = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}  # fmt: skip


def lora_trainable(config, r, target_modules, use_dora=False):
    shapes = _shapes(config)
    per_block = sum(r * (i + o) + (o if use_dora else 0) for i, o in (shapes[t] for t in target_modules))
    return config.num_hidden_layers * per_block


def prefix_trainable(config, num_virtual_tokens, prefix_projection=False, encoder_hidden_size=None):
    P, L = num_virtual_tokens, config.num_hidden_layers
    td = config.num_key_value_heads * config.head_dim  # one layer's key (or value) width
    if not prefix_projection:
        return P * L * 2 * td  # the table (P, L * 2 * td)
    E = encoder_hidden_size or td
    return P * td + (td * E + E) + (E * L * 2 * td + L * 2 * td)  # embedding, Linear(td, E), Linear(E, L*2*td)


def _lora_trainable_square_attention(config, r, target_modules, use_dora=False):  # every projection D -> D
    D, I = config.hidden_size, config.intermediate_size
    shapes = {t: (D, D) for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes |= {"gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}
    return config.num_hidden_layers * sum(
        r * (i + o) + (o if use_dora else 0) for i, o in map(shapes.get, target_modules)
    )


def _prefix_trainable_hidden_width(config, num_virtual_tokens, prefix_projection=False, encoder_hidden_size=None):
    P, L, td = num_virtual_tokens, config.num_hidden_layers, config.hidden_size  # keys as wide as the model
    if not prefix_projection:
        return P * L * 2 * td
    E = encoder_hidden_size or td
    return P * td + (td * E + E) + (E * L * 2 * td + L * 2 * td)


MISTAKES = {"lora_trainable": _lora_trainable_square_attention, "prefix_trainable": _prefix_trainable_hidden_width}
