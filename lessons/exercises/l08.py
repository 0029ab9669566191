"""Checks for lesson 08's exercises: each calls your function on small model configurations and compares it with
the trainable parameters minipeft actually creates (PeftModel.get_nb_trainable_parameters); it raises
AssertionError saying what differs, never what the answer is."""

import torch

CONFIGS = {  # small shapes: grouped-query attention, multi-head attention, and heads wider than the model
    "GQA (8 heads, 2 kv)": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2
    ),  # fmt: skip
    "MHA (4 heads)": dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4
    ),  # fmt: skip
    "head_dim 32 x 4 heads on width 64": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),  # fmt: skip
}


def _model(shape):
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=32, max_position_embeddings=64, **shape))


def _trainable(shape, config):
    from minipeft.peft import get_peft_model

    return get_peft_model(_model(shape), config).get_nb_trainable_parameters()[0]


def _compare(call, ours, expected):
    assert isinstance(ours, int), f"{call}: return an int, got {type(ours).__name__}"
    assert ours == expected, f"{call}: {'too many' if ours > expected else 'too few'} parameters"


def check_lora_trainable(lora_trainable):
    """Against get_peft_model(model, LoraConfig(...)).get_nb_trainable_parameters()[0], for several target lists,
    ranks and DoRA, on each of CONFIGS."""
    from minipeft.lora import LoraConfig
    from minipeft.model import ModelConfig

    cases = [
        (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
        (4, ["q_proj", "v_proj"], False),
        (2, ["k_proj", "o_proj", "down_proj"], True),
        (3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    ]
    for label, shape in CONFIGS.items():
        config = ModelConfig(vocab_size=32, max_position_embeddings=64, **shape)
        for r, targets, dora in cases:
            expected = _trainable(shape, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora))
            ours = lora_trainable(config, r, list(targets), use_dora=dora)
            _compare(f"{label}: lora_trainable(r={r}, {targets}, use_dora={dora})", ours, expected)


def check_prefix_trainable(prefix_trainable):
    """Against get_peft_model(model, PrefixTuningConfig(...)).get_nb_trainable_parameters()[0], with and without
    the projection MLP, on each of CONFIGS."""
    from minipeft.model import ModelConfig
    from minipeft.prefix import PrefixTuningConfig

    cases = [(20, False, None), (5, True, None), (7, True, 24)]
    for label, shape in CONFIGS.items():
        config = ModelConfig(vocab_size=32, max_position_embeddings=64, **shape)
        for P, projection, hidden in cases:
            kw = dict(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=hidden)
            expected = _trainable(shape, PrefixTuningConfig(**kw))
            _compare(f"{label}: prefix_trainable({P}, prefix_projection={projection}, encoder_hidden_size={hidden})",
                     prefix_trainable(config, P, projection, hidden), expected)  # fmt: skip


CHECKS = {"lora_trainable": check_lora_trainable, "prefix_trainable": check_prefix_trainable}
