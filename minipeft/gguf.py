"""GGUF, llama.cpp's file format: metadata -> ModelConfig, tensors -> float32 arrays under HF's names.

GGUF (llama.cpp): llama.* metadata gives the config, tokenizer.ggml.* the tokenizer (see tokenizer.py). Tensors
are F32, F16, BF16 or quantized in blocks of 32 weights sharing a float16 scale d (and offset m):
    Q8_0: w = d * q          q int8        34 bytes = d + 32 q
    Q4_0: w = d * (q - 8)    q in 0..15    18 bytes = d + 16 bytes of 4-bit q
    Q4_1: w = d * q + m      q in 0..15    20 bytes = d + m + 16 bytes of 4-bit q
(byte j of the 4-bit ones holds weight j in its low nibble and weight j + 16 in its high nibble). llama.cpp also
reorders the rows of q_proj and k_proj: its rotary rotates adjacent channels (2i, 2i+1) of a head together, HF's
rotate_half channel i with i + head_dim/2. `unpermute` puts the rows back, exactly as transformers' loader does.

The gguf package (an optional extra) parses the file; checkpoint.load_pretrained checks and assigns the weights.
"""

import numpy as np

from .model import ModelConfig

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # what `dequantize` handles
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
# GGUF metadata llama.<key> that must be there, as transformers' GGUF_CONFIG_MAPPING reads it
GGUF_CONFIG = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
               "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
               "rms_norm_eps": "attention.layer_norm_rms_epsilon"}  # fmt: skip
# The type each metadata value read here must have (a float may also be an int), checked before any is used
GGUF_KEY_TYPES = {**{f"llama.{k}": float if k.endswith("epsilon") else int for k in GGUF_CONFIG.values()},
                  **dict.fromkeys(["llama.vocab_size", "llama.attention.head_count_kv", "llama.attention.key_length",
                                   "llama.context_length", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"], int),
                  "llama.rope.freq_base": float, "llama.rope.scaling.factor": float, "general.architecture": str,
                  "llama.rope.scaling.type": str, "tokenizer.ggml.tokens": list}  # fmt: skip


def read_gguf(path):
    """-> (gguf.GGUFReader, {metadata key: Python value}). The tensors stay in the file (memory-mapped)."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install 'minipeft[gguf]'") from None

    def value(field):  # what field.contents() gives in gguf >= 0.16; this works from 0.10 on
        kind, parts = field.types[-1], [field.parts[i] for i in field.data]
        values = [bytes(p).decode() if kind == gguf.GGUFValueType.STRING else p.tolist()[0] for p in parts]
        return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]

    try:  # a short or corrupt file fails in numpy's reshape/view, in the reader's checks, or in decoding
        reader = gguf.GGUFReader(path)
        return reader, {k: value(f) for k, f in reader.fields.items()}
    except (ValueError, IndexError, KeyError, OSError, TypeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is not a valid GGUF file, or it is truncated or corrupt: {e}") from None


def config_from_gguf(md, tensor_names, source="GGUF"):
    if md.get("general.architecture") != "llama":
        raise ValueError(
            f"{source}: GGUF architecture {md.get('general.architecture')!r} is not supported; supported: 'llama'"
        )
    if missing := [f"llama.{k}" for k in GGUF_CONFIG.values() if f"llama.{k}" not in md]:
        raise ValueError(f"{source}: missing GGUF metadata key(s) {missing}")
    if "llama.vocab_size" not in md and "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"{source}: missing GGUF metadata llama.vocab_size (and no tokenizer.ggml.tokens to count)")
    for key, want in GGUF_KEY_TYPES.items():
        if key in md and type(md[key]) not in ((int, float) if want is float else (want,)):
            got = f"{md[key]!r}"[:60]
            raise ValueError(
                f"{source}: GGUF metadata {key} must be {want.__name__}, got {got} ({type(md[key]).__name__})"
            )
    scaling = md.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{source}: llama.rope.scaling.type {scaling!r} not supported; supported: none, linear")
    linear = {"rope_type": "linear", "factor": md.get("llama.rope.scaling.factor")}
    try:
        return ModelConfig(
            **{ours: md[f"llama.{key}"] for ours, key in GGUF_CONFIG.items()},
            vocab_size=md.get("llama.vocab_size") or len(md["tokenizer.ggml.tokens"]),
            num_key_value_heads=md.get("llama.attention.head_count_kv"),
            head_dim=md.get("llama.attention.key_length"),
            rope_theta=md.get("llama.rope.freq_base", 10000.0),
            rope_scaling=linear if scaling == "linear" else None,
            max_position_embeddings=md.get("llama.context_length", 2048),
            tie_word_embeddings="output.weight" not in tensor_names,  # no output matrix: llama.cpp reuses token_embd
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        )
    except ValueError as e:  # a value out of range (ModelConfig checks them all): say which file
        raise ValueError(f"{source}: {e}") from None


def hf_name(name):  # blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names stay as they are
    p = name.split(".")
    if p[0] == "blk" and len(p) == 4 and p[2] in GGUF_NAMES:
        return f"model.layers.{p[1]}.{GGUF_NAMES[p[2]]}.{p[3]}"
    return f"{GGUF_NAMES[p[0]]}.{p[1]}" if len(p) == 2 and p[0] in GGUF_NAMES else name


def dequantize(data, kind, shape):
    """One GGUF tensor's data (as GGUFReader gives it) -> float32 numpy array of `shape` (HF order: out, in)."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if kind == "F32":
        w = raw.view(np.float32)
    elif kind == "F16":
        w = raw.view(np.float16).astype(np.float32)
    elif kind == "BF16":  # bfloat16 is the top half of a float32
        w = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind in ("Q8_0", "Q4_0", "Q4_1"):
        blocks = raw.reshape(-1, {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind])  # (n_blocks, bytes per block)
        d = blocks[:, :2].view(np.float16).astype(np.float32)  # (n_blocks, 1) scale
        if kind == "Q8_0":
            w = d * blocks[:, 2:].view(np.int8).astype(np.float32)
        else:
            qs = blocks[:, -16:]  # (n_blocks, 16): low nibbles are weights 0..15, high nibbles 16..31
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
            w = d * (q - 8) if kind == "Q4_0" else d * q + blocks[:, 2:4].view(np.float16).astype(np.float32)
    else:
        raise ValueError(f"GGUF tensor type {kind} not supported; supported: {', '.join(GGUF_TYPES)}")
    return w.reshape(shape)


def unpermute(w, n_heads):
    """llama.cpp -> HF row order of q_proj / k_proj. In each head, GGUF row 2i + j is HF row j * head_dim/2 + i
    (i < head_dim/2, j = 0 or 1): rows (n_heads, head_dim/2, 2) -> (n_heads, 2, head_dim/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- writing: a model (merged or base) and a LoRA adapter, for llama.cpp / Ollama ----------------------------
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what write_model writes 2-D weights as (1-D ones stay float32)
GGUF_OF = {v: k for k, v in GGUF_NAMES.items()}  # HF module name -> llama.cpp's


def gguf_name(name):  # model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (hf_name's inverse)
    p = name.split(".")
    if p[:2] == ["model", "layers"] and ".".join(p[3:-1]) in GGUF_OF:
        return f"blk.{p[2]}.{GGUF_OF['.'.join(p[3:-1])]}.{p[-1]}"
    if ".".join(p[:-1]) in GGUF_OF:
        return f"{GGUF_OF['.'.join(p[:-1])]}.{p[-1]}"
    raise ValueError(f"no GGUF name for tensor {name!r}")


def permute(w, n_heads):
    """HF -> llama.cpp row order of q_proj / k_proj (unpermute's inverse): rows (n_heads, 2, hd/2) -> (n_heads,
    hd/2, 2), so that llama.cpp's rotary, which turns adjacent channels together, meets the same pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_writable(cfg):
    """Refuse, before any work, a model llama.cpp's "llama" architecture would compute differently."""
    bad = {k: v for k, v in dict(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
                                 sliding_window=cfg.sliding_window).items() if v}  # fmt: skip
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
    if kind not in ("default", "linear"):
        bad["rope_scaling"] = kind
    if bad:
        raise ValueError(f"cannot write this model as a GGUF 'llama' (llama.cpp would compute it differently): {bad}")


def _writer(path, gguf):
    return gguf.GGUFWriter(str(path), arch="llama")


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model(model, tokenizer, path, outtype="f32", name="minipeft"):
    """A Transformer (e.g. merge_and_unload()'s) as a llama.cpp GGUF file: llama.cpp's tensor names and q/k row
    order, the architecture metadata, the tokenizer and chat template. outtype: how 2-D weights are stored."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; valid: {', '.join(OUTTYPES)}")
    cfg = model.config
    check_writable(cfg)
    w = _writer(path, gguf)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling:  # linear (check_writable refused the others)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip
    w.add_file_type(file_type)
    if tokenizer is not None:
        for key, value in tokenizer.gguf_metadata().items():
            w.add_key_value(key, value[0], value[1])
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # no output.weight: llama.cpp then reuses token_embd
        data = t.detach().float().cpu().numpy()
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            data = permute(data, cfg.num_attention_heads if ".q_proj." in key else cfg.num_key_value_heads)
        _add_tensor(w, gguf, gguf_name(key), data, outtype if data.ndim == 2 else "f32")
    _finish(w)


def _add_tensor(writer, gguf, name, data, outtype):
    if outtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:  # bf16, q8_0: bytes from the gguf package's quantizer (Q8_0 needs rows of a multiple of 32)
        kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # as llama.cpp's converter falls back
            writer.add_tensor(name, data.astype(np.float16))
            return
        q = gguf.quants.quantize(data, kind)  # the blocks' bytes (bf16: uint16 values), rows as data's
        writer.add_tensor(name, q.view(np.uint8), raw_dtype=kind)


def write_lora(layers, config, model_config, path):
    """A LoRA adapter as llama.cpp reads one (`llama-cli --lora`): general.type "adapter", adapter.type "lora",
    adapter.lora.alpha; per adapted weight `<gguf name>.lora_a` (r, in) and `.lora_b` (out, r). llama.cpp scales
    B A by alpha / r, so rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r). q/k's B rows get llama.cpp's row
    order (their product is the weight's update). layers: {module name: (A, B)} as float tensors."""
    import gguf

    check_writable(model_config)
    w = _writer(path, gguf)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(config.lora_alpha * (config.r**0.5 if config.use_rslora else 1.0)))
    for module, (A, B) in layers.items():
        a, b = A.detach().float().cpu().numpy(), B.detach().float().cpu().numpy()
        if module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            n_heads = (
                model_config.num_attention_heads if module.endswith("q_proj") else model_config.num_key_value_heads
            )
            b = permute(b, n_heads)
        stem = gguf_name(module + ".weight")
        w.add_tensor(stem + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(stem + ".lora_b", np.ascontiguousarray(b))
    _finish(w)


def apply_lora(model, path):
    """Add a llama.cpp LoRA adapter file to `model`'s weights in place, as llama.cpp applies one: W += alpha / r * B A
    (B's q/k rows put back in HF's order). Our own reading of write_lora's format, to check it."""
    import torch

    reader, md = read_gguf(path)
    if md.get("general.type") != "adapter" or md.get("adapter.type") != "lora":
        raise ValueError(f"{path} is not a llama.cpp LoRA adapter (general.type {md.get('general.type')!r})")
    tensors = {t.name: dequantize(t.data, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)))
               for t in reader.tensors}  # fmt: skip
    cfg, alpha = model.config, float(md["adapter.lora.alpha"])
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_a"):
                continue
            b, name = tensors[key.removesuffix("_a") + "_b"], hf_name(key.removesuffix(".lora_a"))
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
                b = unpermute(b, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
            weight = model.get_parameter(name)
            weight += torch.from_numpy(alpha / a.shape[0] * (b @ a)).to(weight)
    return model
