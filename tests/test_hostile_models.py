"""Hostile model folders: a config.json or model.safetensors that is wrong in type, in value, or against the other
file. Each one must fail at once, before a model is built, with one line naming the file, the key or tensor, the
bad value and what is valid; never load a silently wrong model. (GGUF's are in test_checkpoint.py.)"""

import json
import math
import re

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from minipeft import checkpoint
from minipeft.checkpoint import load_pretrained, save_pretrained


@pytest.fixture
def folder(tmp_path):
    """A tiny untied Llama saved by minipeft (no tokenizer.json), to be edited by each test."""
    save_pretrained(tiny_model(torch.float32, tie_word_embeddings=False), tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))  # NaN and Infinity as Python writes them


def edit_weights(folder, fn, name="model.safetensors"):
    tensors = load_file(folder / name)
    fn(tensors)
    save_file(tensors, folder / name)


def load_error(path, match, kind=ValueError, **kwargs):
    """load_pretrained(path) raises `kind` with one line that matches `match`."""
    with pytest.raises(kind) as info:
        load_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def no_model(*args, **kwargs):
    pytest.fail("a model was built before the config was checked against the weights")


# ---- config.json against the weights, before anything is built ------------------------------------------------------
def test_a_million_layers_fail_before_the_model_is_built(folder, monkeypatch):
    edit_config(folder, num_hidden_layers=1_000_000)
    monkeypatch.setattr(checkpoint, "Transformer", no_model)  # the old loader built them all on "meta" first
    load_error(folder, r"m/config.json: num_hidden_layers=1000000, the weights hold 2 layer\(s\)$")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(vocab_size=10**9), r"model.embed_tokens.weight has shape \(97, 64\) in the checkpoint, but \(1000000000"),
        (dict(hidden_size=10**12), r"config.json: ModelConfig.hidden_size must be a positive integer, got 10{12}$"),
        (dict(intermediate_size=2**40), r"ModelConfig.intermediate_size must be a positive integer, got 1099511627776"),
        (dict(num_hidden_layers=1), r"missing \[\], unexpected \['model.layers.1.input_layernorm.weight'"),
    ],
    ids=["vocab", "hidden", "intermediate", "fewer-layers"],
)
def test_sizes_against_the_weights(folder, changes, match):
    edit_config(folder, **changes)
    load_error(folder, match)


# ---- config.json: JSON types ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, match",
    [
        ("hidden_size", "256", r'hidden_size must be integer, got "256" \(string\)'),
        ("num_hidden_layers", 2.5, r"num_hidden_layers must be integer, got 2.5 \(number\)"),
        ("vocab_size", True, r"vocab_size must be integer, got true \(boolean\)"),
        ("num_key_value_heads", [2], r"num_key_value_heads must be integer or null, got \[2\] \(array\)"),
        ("rms_norm_eps", "1e-5", r'rms_norm_eps must be number, got "1e-5" \(string\)'),
        ("rope_theta", None, r"rope_theta must be number, got null \(null\)"),
        ("rope_scaling", [1, 2], r"rope_scaling must be object or null, got \[1, 2\] \(array\)"),
        ("tie_word_embeddings", "false", r'tie_word_embeddings must be boolean, got "false" \(string\)'),
        ("eos_token_id", [2, "</s>"], r"eos_token_id must be integer or array of integer or null"),
        ("model_type", ["llama"], r'model_type must be string, got \["llama"\] \(array\)'),
        ("dtype", 32, r"dtype must be string or null, got 32 \(integer\)"),
    ],
)
def test_config_json_types(folder, key, value, match):
    edit_config(folder, **{key: value})
    load_error(folder, r"m/config.json: " + match)


@pytest.mark.parametrize("text", ["[]", "5", '"llama"', "null"])
def test_config_json_that_is_not_an_object(folder, text):
    (folder / "config.json").write_text(text)
    load_error(folder, r"config.json: expected a JSON object \{...\}, got " + re.escape(text))


def test_config_json_not_utf8_or_not_json(folder):
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    load_error(folder, r"config.json is not valid JSON")
    (folder / "config.json").write_text('{"model_type": "llama",')
    load_error(folder, r"config.json is not valid JSON")


# ---- config.json: values (ModelConfig checks them, so the Python API gets the same errors) ---------------------------
@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(rms_norm_eps=-1e-5), r"rms_norm_eps must be a finite number >= 0, got -1e-05"),
        (dict(rms_norm_eps=math.nan), r"rms_norm_eps must be a finite number >= 0, got nan"),
        (dict(rope_theta=0), r"rope_theta must be a finite number > 0, got 0"),
        (dict(rope_theta=math.inf), r"rope_theta must be a finite number > 0, got inf"),
        (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
        (dict(num_attention_heads=-4), r"num_attention_heads must be a positive integer, got -4"),
        (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        (
            dict(hidden_size=66, head_dim=None),
            r"hidden_size \(66\) is not a multiple of num_attention_heads \(4\): set head_dim",
        ),
        (dict(head_dim=15), r"head_dim must be even .*, got 15"),
        (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer, got 0"),
        (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling\['factor'\] must be a positive number, got None"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), r"rope_scaling\['factor'\] .* got -2.0"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"unsupported rope_scaling type 'yarn'"),
        (dict(model_type="mistral", sliding_window=0), r"sliding_window must be a positive integer, got 0"),
    ],
)
def test_config_values(folder, changes, match):
    edit_config(folder, **changes)
    load_error(folder, r"m/config.json: (ModelConfig\.)?" + match)


# ---- the weights ------------------------------------------------------------------------------------------------
def test_nan_and_inf_weights_are_refused_by_name(folder):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][0, :3] = torch.tensor([math.nan, math.inf, -math.inf])

    edit_weights(folder, poison)
    load_error(folder, r"m: model.layers.1.mlp.up_proj.weight holds 3 NaN/inf value\(s\) \(as torch.float32\)")


def test_weights_that_overflow_the_requested_dtype_are_refused(folder):
    edit_weights(folder, lambda t: t["model.norm.weight"].fill_(1e6))  # fine in float32, inf in float16
    assert load_pretrained(folder)[0].model.norm.weight.max() == 1e6
    load_error(folder, r"model.norm.weight holds 64 NaN/inf value\(s\) \(as torch.float16\)", dtype="float16")


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_integer_or_bool_weights_are_refused(folder, dtype, name):
    edit_weights(folder, lambda t: t.update({"model.layers.0.input_layernorm.weight": torch.ones(64, dtype=dtype)}))
    load_error(folder, rf"m: model.layers.0.input_layernorm.weight is {name}; weights are F32/F16/BF16/F64$")


def test_4bit_folders_load_and_hostile_ones_fail_before_allocating(tmp_path):
    from minipeft.nf4 import NF4Linear, quantize_model

    model = quantize_model(tiny_model(torch.float32, tie_word_embeddings=False, intermediate_size=128))
    save_pretrained(model, tmp_path)
    loaded, _ = load_pretrained(tmp_path)  # uint8 codes and absmax: legitimate
    assert sum(isinstance(m, NF4Linear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)

    edit_config(tmp_path, intermediate_size=2**30)  # the placeholder NF4Linear would allocate (2**30, 64) floats
    key = "model.layers.0.mlp.gate_proj.weight.quant_state.bitsandbytes__nf4"
    load_error(tmp_path, r"mlp\.\w+_proj\.weight\.quant_state\.bitsandbytes__nf4 says shape \[\d+, \d+\] \(codes "
               r"\(4096, 1\)\), the config \(\d+, \d+\)$")  # fmt: skip
    edit_config(tmp_path, intermediate_size=128)
    edit_weights(tmp_path, lambda t: t.update({key: torch.tensor(list(b"not json"), dtype=torch.uint8)}))
    load_error(tmp_path, rf"{key} is no 4-bit metadata of a Linear \(JSONDecodeError")


# ---- files ------------------------------------------------------------------------------------------------------
def test_folder_without_tokenizer_loads_and_generates(folder):
    assert not (folder / "tokenizer.json").exists()
    model, tok = load_pretrained(folder)
    assert tok is None
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7)


def test_corrupt_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])  # a header length of 2**64 - 1
    load_error(folder, r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)")
    (folder / "model.safetensors").write_bytes(data[:8] + b"[" + data[9:])  # the header is no JSON object
    load_error(folder, r"model.safetensors is not a readable safetensors file")


def test_bad_shard_index(tmp_path):
    model = tiny_model(torch.float32, tie_word_embeddings=False)
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors)
    (tmp_path / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in names[:10]}, tmp_path / "a.safetensors")
    save_file({k: tensors[k] for k in names[9:]}, tmp_path / "b.safetensors")  # names[9] in both
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {k: "a.safetensors" if i < 10 else "b.safetensors" for i, k in enumerate(names)}
    index.write_text(json.dumps({"weight_map": weight_map}))
    load_error(tmp_path, rf"b.safetensors: {re.escape(names[9])} is also in another shard")
    index.write_text("[]")
    load_error(tmp_path, r"index.json has no weight_map of tensor names to shard file names")
    index.write_text(json.dumps({"weight_map": {names[0]: "../elsewhere/a.safetensors"}}))
    load_error(tmp_path, r"index.json has no weight_map of tensor names to shard file names in this folder")
