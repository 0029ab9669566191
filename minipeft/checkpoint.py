"""Checkpoints in and out: Hugging Face model folders and GGUF files, by path or by a registered name (registry.py).

    model, tok = load_pretrained("tiny-shakespeare")        # bundled in minipeft/assets/
    model, tok = load_pretrained("smollm2-135m-instruct")   # after `minipeft download smollm2-135m-instruct`
    model, tok = load_pretrained("path/to/folder")          # config.json + model.safetensors (+ tokenizer.json)
    model, tok = load_pretrained("model.Q4_1.gguf")         # llama.cpp's format, dequantized
    save_pretrained(model, "out", tok)                      # what transformers' from_pretrained reads

HF layout: config.json (model_type llama, mistral or qwen2), model.safetensors or the shards listed in
model.safetensors.index.json, tokenizer.json. Our state_dict keys are HF's, so nothing is renamed; a tied model
stores only the embedding. Weights move only through safetensors: nothing is unpickled (no pytorch_model.bin).
Loading checks before it builds: config.json's JSON types (CONFIG_TYPES) and values (ModelConfig), then the layer
count, names, shapes and dtypes in the safetensors headers against a model built on the "meta" device (shapes only,
no random init); only then are the tensors read, refused if NaN/inf, and put in with load_state_dict(assign=True).
inv_freq, in no checkpoint, is recomputed. Errors are one line naming the file, the key and what is valid.

GGUF (llama.cpp's format): read by gguf.py, then checked and assigned here like an HF folder.
"""

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import gguf
from .files import read_json, replace_dir
from .model import ModelConfig, Transformer, rope_inv_freq
from .registry import ASSETS, REGISTRY, SMOLLM2, _registered_path, download, minipeft_home  # noqa: F401 (re-exported)
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")  # what a save replaces
# What transformers' config classes assume for a key config.json leaves out (ModelConfig's defaults differ).
HF_DEFAULTS = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu")
HF_TYPE_DEFAULTS = {"llama": dict(max_position_embeddings=2048),
                    "mistral": dict(max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096),
                    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096,
                                  max_window_layers=28)}  # fmt: skip
SIZES = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads".split()
HF_FIELDS = SIZES + ("num_key_value_heads head_dim rms_norm_eps rope_theta rope_scaling max_position_embeddings "
                     "tie_word_embeddings bos_token_id eos_token_id").split()  # fmt: skip
# The JSON type of each config.json key we read, checked before any value is used ("|": one or the other).
JSON_TYPES = {"integer": (int,), "number": (int, float), "boolean": (bool,), "string": (str,), "array": (list,),
              "object": (dict,), "null": (type(None),)}  # fmt: skip
CONFIG_TYPES = {**dict.fromkeys(SIZES + ["max_position_embeddings", "max_window_layers"], "integer"),
                **dict.fromkeys(["num_key_value_heads", "head_dim", "sliding_window", "bos_token_id"], "integer|null"),
                **dict.fromkeys(["tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"], "boolean"),
                "rms_norm_eps": "number", "rope_theta": "number", "rope_scaling": "object|null",
                "rope_parameters": "object|null", "model_type": "string", "hidden_act": "string",
                "dtype": "string|null", "torch_dtype": "string|null", "eos_token_id": "integer|array of integer|null",
                "layer_types": "array of string|null"}  # fmt: skip
NF4_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"  # bitsandbytes' 4-bit layers (minipeft quantize)
FLOATS = ("F32", "F16", "BF16", "F64")  # safetensors' names of the dtypes a weight may have


def load_pretrained(name_or_path, *, dtype=None, device=None):
    """-> (Transformer, Tokenizer or None). dtype: default the checkpoint's own (float32 for GGUF). device="meta":
    the structure alone (every check of names and shapes, no weight read), as FSDP2's other ranks build it."""
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} not supported; use one of {list(DTYPES)}")
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in REGISTRY:
        path = _registered_path(str(name_or_path))
    weights = str(device) != "meta"
    if path.is_dir():
        model, tok = _load_hf_dir(path, dtype, weights)
    elif path.suffix == ".gguf" and path.is_file():
        model, tok = _load_gguf(path, dtype or torch.float32, weights)
    elif path.is_file():
        raise ValueError(f"{path} is a file but not a .gguf: pass a model folder or a .gguf file")
    else:
        raise FileNotFoundError(
            f"{name_or_path}: no such file or folder, nor a registered name ({', '.join(REGISTRY)})"
        )
    # where it came from, as transformers' name_or_path: get_peft_model records it in the adapter's config
    model.name_or_path = str(name_or_path) if path != Path(name_or_path) else os.path.realpath(path)
    return model.to(device or "cpu"), tok  # .to() recomputes inv_freq in the right dtype (Transformer._apply)


# ---- Hugging Face folders ------------------------------------------------------------------------------------
def _load_hf_dir(directory, dtype, weights=True):
    """Everything is checked against the config from the safetensors headers (names, shapes, dtypes) before any
    tensor is built; the weights are then read and checked to be finite (weights=False: the meta model)."""
    cfg, saved_dtype = config_from_hf(read_json(directory / "config.json"), directory / "config.json")
    handles = {}  # key -> the open file that holds it
    for file in _weight_files(directory):
        try:  # safe_open reads and validates the header: a truncated file fails here, before any work
            h = safe_open(file, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        if twice := sorted(handles.keys() & set(h.keys())):
            raise ValueError(f"{file}: {twice[0]} is also in another shard (each tensor must be in one file)")
        handles.update(dict.fromkeys(h.keys(), h))
    slices = {k: h.get_slice(k) for k, h in handles.items()}
    shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
    _check_layer_count(cfg, shapes, directory / "config.json")  # before building the model
    with torch.device("meta"):
        model = Transformer(cfg)
    for key in [k for k in handles if k.endswith(NF4_SUFFIX)]:
        _nf4_placeholder(model, key.removesuffix(NF4_SUFFIX), handles[key].get_tensor(key), shapes, directory)
    keys = _check_weights(model, shapes, directory)
    packed = tuple(f"{n}.weight" for n in nf4_layers(model))  # 4-bit codes and their statistics: nf4.py checks them
    if bad := sorted(k for k in keys if slices[k].get_dtype() not in FLOATS and not k.startswith(packed)):
        raise ValueError(f"{directory}: {bad[0]} is {slices[bad[0]].get_dtype()}; weights are {'/'.join(FLOATS)}")
    tok = Tokenizer.from_file(directory) if (directory / "tokenizer.json").is_file() else None
    if not weights:
        return _structure(model, dtype or saved_dtype), tok
    tensors = {k: handles[k].get_tensor(k) for k in keys}
    return _assign(model, tensors, dtype or saved_dtype, directory), tok


def _check_layer_count(cfg, shapes, source):
    """Before a model is built: a config with more layers than the weights name (model.layers.<i>.) fails here;
    otherwise the model is no larger than the checkpoint, and _check_weights compares the rest."""
    found = {int(p[2]) for p in (k.split(".") for k in shapes) if p[:2] == ["model", "layers"] and p[2].isdigit()}
    if cfg.num_hidden_layers > len(found):
        raise ValueError(f"{source}: num_hidden_layers={cfg.num_hidden_layers}, the weights hold {len(found)} layer(s)")


def config_from_hf(d, source="config.json"):
    """config.json's dict -> (ModelConfig, dtype). Keys we do not use are kept in ModelConfig.extra."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object {{...}}, got {_short(d)}")
    for key, want in CONFIG_TYPES.items():
        if key in d and not _is_json(d[key], want):
            got = next((t for t, types in JSON_TYPES.items() if type(d[key]) in types), "?")
            raise ValueError(f"{source}: {key} must be {want.replace('|', ' or ')}, got {_short(d[key])} ({got})")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    d = {**HF_DEFAULTS, **HF_TYPE_DEFAULTS[model_type], **d}
    if missing := [k for k in SIZES if k not in d]:
        raise ValueError(f"{source}: missing key(s) {missing}")
    if d["hidden_act"] != "silu":
        raise ValueError(f"{source}: hidden_act={d['hidden_act']!r} not supported (only silu)")
    # transformers < 5 writes rope_theta + rope_scaling, >= 5 rope_parameters {"rope_type", "rope_theta", ...}
    rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    theta = rope.pop("rope_theta", d["rope_theta"])  # a rope_theta in there wins, as in transformers
    kw = {k: d.get(k) for k in HF_FIELDS if k not in ("rope_theta", "rope_scaling")}
    kw.update(
        rope_theta=theta, rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    )
    if model_type == "qwen2":  # biases on q, k, v, none on o: hard-wired in HF's Qwen2
        kw.update(attention_bias=True, attention_out_bias=False, sliding_window=_qwen2_window(d, source))
    else:
        kw.update(attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False))
    if model_type == "mistral":  # every layer slides (transformers' MistralConfig default: 4096)
        kw.update(sliding_window=d["sliding_window"])
    used = set(kw) | set(HF_DEFAULTS) | {"rope_parameters", "dtype", "torch_dtype", "architectures"}
    extra = {k: v for k, v in d.items() if k not in used or (k == "sliding_window" and kw.get(k) is None)}
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{source}: dtype {name!r} not supported; supported: {list(DTYPES)}")
    try:
        return ModelConfig(**kw, extra=extra), DTYPES[name]
    except ValueError as e:  # a value out of range (ModelConfig checks them all): say which file
        raise ValueError(f"{source}: {e}") from None


def _qwen2_window(d, source):
    """Qwen2 slides the layers >= max_window_layers (or those layer_types says), if use_sliding_window. ModelConfig
    holds one window for all layers, or none: a mix is refused."""
    if not d.get("use_sliding_window") or d["sliding_window"] is None:
        return None
    first, L = d["max_window_layers"], d["num_hidden_layers"]
    kinds = set(d.get("layer_types") or ["full_attention"] * (first > 0) + ["sliding_attention"] * (first < L))
    if len(kinds) > 1:
        raise ValueError(
            f"{source}: use_sliding_window on some layers only (max_window_layers={first}, layer_types="
            f"{_short(d.get('layer_types'))}) is not supported; supported: a window on all layers (or none)"
        )
    return d["sliding_window"] if kinds == {"sliding_attention"} else None


def _is_json(value, want):  # want: JSON type names joined by "|"; "array of X" checks every item too
    return any(type(value) is list and all(_is_json(x, t[9:]) for x in value) if t.startswith("array of ")
               else type(value) in JSON_TYPES[t] for t in want.split("|"))  # fmt: skip


def _short(value, n=60):  # a JSON value for an error message, cut to one short line
    text = json.dumps(value, default=repr)
    return text if len(text) <= n else text[: n - 3] + "..."


def _weight_files(directory):
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or any(not isinstance(f, str) or "/" in f for f in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to shard file names in this folder")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} lists the shard {f.name}, which is missing from {directory}")
        return files
    pickle = any(directory.glob("pytorch_model*.bin"))
    hint = " (pytorch_model.bin is a pickle, never loaded here: convert it to safetensors)" if pickle else ""
    raise FileNotFoundError(f"{directory} has no model.safetensors nor model.safetensors.index.json{hint}")


def _check_weights(model, shapes, source):
    """Every parameter present with its shape, nothing left over. Returns the keys to load."""
    tied = model.config.tie_word_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    # Ignored on purpose, as transformers does: lm_head.weight stored by a tied checkpoint, and the rotary
    # buffer that old checkpoints saved.
    got = {k: s for k, s in shapes.items() if not (tied and k == "lm_head.weight") and "rotary_emb" not in k}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{source}: the weights do not match the config (tie_word_embeddings={tied}): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]} (at most 6 of each shown)"
        )
    for k, shape in expected.items():
        if got[k] != shape and not k.endswith("bitsandbytes__nf4"):  # that one is JSON text: any length
            raise ValueError(f"{source}: {k} has shape {got[k]} in the checkpoint, but {shape} in the config")
    return set(expected)


def nf4_layers(model):
    from .nf4 import NF4Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def _nf4_placeholder(model, name, quant_state, shapes, source):
    """Swap the meta Linear `name` for an empty NF4Linear shaped like the checkpoint's (4-bit sizes only, no dense
    matrix; its loader fills it in)."""
    from .nf4 import NF4Linear

    key = name + NF4_SUFFIX
    try:
        meta = json.loads(quant_state.numpy().tobytes())
        blocksize, dtype, shape = meta["blocksize"], DTYPES[meta["dtype"]], meta["shape"]
        linear = model.get_submodule(name)
        out_in, packed = [linear.out_features, linear.in_features], shapes.get(f"{name}.weight")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # (bad JSON or UTF-8 are ValueErrors)
        raise ValueError(f"{source}: {key} is no 4-bit metadata of a Linear ({type(e).__name__}: {e})") from None
    if shape != out_in or packed != ((out_in[0] * out_in[1] + 1) // 2, 1):  # checked before the placeholder allocates
        raise ValueError(f"{source}: {key} says shape {_short(shape)} (codes {packed}), the config {tuple(out_in)}")
    layer = NF4Linear(*out_in[::-1], bias=linear.bias is not None, device="cpu", blocksize=blocksize,
                      double_quant="nested_offset" in meta, dtype=dtype)  # fmt: skip
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def _structure(model, dtype):
    """The meta-device model as _assign would make it, without values: float weights in `dtype`, lm_head tied,
    4-bit placeholders moved to meta (their codes were never written: torch.empty touched no memory)."""
    keep = set(nf4_layers(model).values())
    for layer in keep:
        layer.to("meta")
    for m in model.modules():
        if m not in keep:
            for name, p in m.named_parameters(recurse=False):
                setattr(m, name, torch.nn.Parameter(p.to(dtype), p.requires_grad))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _assign(model, tensors, dtype, source):
    """Put checked tensors into the meta-device model, tie lm_head, make inv_freq real again."""
    keep = tuple(f"{n}." for n in nf4_layers(model))  # 4-bit codes and float32 statistics stay as stored
    tensors = {k: v if k.startswith(keep) else v.to(dtype) for k, v in tensors.items()}
    for k, v in tensors.items():  # a NaN or inf weight makes every output NaN: refuse it by name
        if v.is_floating_point() and not (finite := v.isfinite()).all():
            raise ValueError(f"{source}: {k} holds {(~finite).sum().item()} NaN/inf value(s) (as {v.dtype})")
    tied = model.config.tie_word_embeddings
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if tied:  # assign made two Parameters of the one tensor: make them one Parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_buffer("inv_freq", rope_inv_freq(model.config).float(), persistent=False)
    return model


# ---- GGUF (the format itself is in gguf.py) ------------------------------------------------------------
def _load_gguf(path, dtype, weights=True):
    reader, md = gguf.read_gguf(path)
    for t in reader.tensors:
        if t.tensor_type.name not in gguf.GGUF_TYPES:
            raise ValueError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which minipeft cannot "
                f"dequantize; supported: {', '.join(gguf.GGUF_TYPES)}"
            )
    cfg = gguf.config_from_gguf(md, {t.name for t in reader.tensors}, path)
    shape = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # GGUF lists dims inner first
    hf_shapes = {gguf.hf_name(t.name): shape[t.name] for t in reader.tensors}
    _check_layer_count(cfg, hf_shapes, path)
    with torch.device("meta"):
        model = Transformer(cfg)
    _check_weights(model, hf_shapes, path)
    try:
        tok = Tokenizer.from_gguf_metadata(md) if "tokenizer.ggml.tokens" in md else None
    except ValueError as e:  # the model is still usable on ids: say why there is no tokenizer
        warnings.warn(f"{path}: no tokenizer: {e}", stacklevel=3)
        tok = None
    if not weights:
        return _structure(model, dtype), tok
    tensors = {}
    for t in reader.tensors:
        w = gguf.dequantize(t.data, t.tensor_type.name, shape[t.name])
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = gguf.unpermute(w, cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads)
        tensors[gguf.hf_name(t.name)] = torch.from_numpy(w if w.flags.writeable else w.copy())  # copy out of the mmap
    return _assign(model, tensors, dtype, path), tok


# ---- saving -----------------------------------------------------------------------------------------------
def save_pretrained(model, path, tokenizer=None):
    """config.json + model.safetensors (+ tokenizer.json, tokenizer_config.json), as transformers writes them.
    Atomic: written into a new folder beside `path`, then swapped in. Files already in `path` that this save does
    not write (an adapter, notes) are kept; old model weights (model*.safetensors*) are not."""
    if not isinstance(model, Transformer):
        raise TypeError(
            f"save_pretrained takes a Transformer, got {type(model).__name__} "
            "(for adapters use PeftModel.save_pretrained, or merge_and_unload() first)"
        )
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    config = config_to_hf(model.config, model.dtype)
    if quantized := nf4_layers(model):  # a 4-bit model: record it the way transformers + bitsandbytes do
        q = next(iter(quantized.values())).qweight
        dense = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        config["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": q.nested,
            "bnb_4bit_compute_dtype": str(q.dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense,
        }
    tied = model.config.tie_word_embeddings
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    }
    with replace_dir(path, drop=WEIGHT_FILES) as tmp:  # other files already in the folder are kept
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def config_to_hf(cfg, dtype):
    qwen_style = cfg.attention_bias and cfg.attention_out_bias is False  # biases on q, k, v but not o
    window = cfg.sliding_window
    model_type = cfg.extra.get("model_type") or ("qwen2" if qwen_style else "mistral" if window else "llama")
    same_o = cfg.attention_out_bias in (None, cfg.attention_bias)
    ok = {
        "qwen2": qwen_style and not cfg.mlp_bias,
        "llama": same_o and window is None,  # Llama has no sliding window
        "mistral": not (cfg.attention_bias or cfg.mlp_bias or cfg.attention_out_bias),
    }.get(model_type)
    if not ok:
        raise ValueError(
            f"cannot write a Hugging Face {model_type!r} config with attention_bias={cfg.attention_bias}, "
            f"attention_out_bias={cfg.attention_out_bias}, mlp_bias={cfg.mlp_bias}, sliding_window={window}"
        )
    d = {k: v for k, v in cfg.extra.items() if k not in ("transformers_version", "_name_or_path")}
    d.update(architectures=[ARCHITECTURES[model_type]], model_type=model_type, hidden_act="silu")
    d.update({k: getattr(cfg, k) for k in HF_FIELDS})
    if cfg.rope_scaling:  # transformers >= 5 would take a rope_theta found in here over ours
        d["rope_scaling"] = {k: v for k, v in cfg.rope_scaling.items() if k != "rope_theta"}
    if model_type != "qwen2":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
        d.update(sliding_window=window)
    elif model_type == "qwen2" and window is None:
        d["use_sliding_window"] = False
    elif model_type == "qwen2":  # the window on every layer: max_window_layers=0 (see _qwen2_window)
        d.pop("layer_types", None)
        d.update(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    name = str(dtype).removeprefix("torch.")
    return {**d, "torch_dtype": name, "dtype": name}  # transformers < 5 reads the first, >= 5 the second
