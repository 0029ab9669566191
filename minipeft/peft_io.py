"""Saving and loading adapters in Hugging Face PEFT's format: what PeftModel.save_pretrained writes and
PeftModel.from_pretrained / load_adapter read, and the key names both use. Part of peft.py's PeftModel (its
methods call the functions here with the model), in a file of its own for its length; peft.py re-exports
config_from_dict, load_config, read_safetensors and LoadResult.

File format (PEFT's): keys are the module path prefixed by `base_model.model.`, with the adapter name
stripped: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. A non-default adapter is saved
in `<dir>/<name>/`. A save replaces the folder atomically (files.replace_dir): a crash leaves the old adapter whole.
A load checks the file before allocating anything: the config's field types, then the shapes the config would
create (computed on fake tensors, no memory) against the file's, then finite floating-point values.
"""

import copy
import dataclasses
import os
import warnings
from collections import namedtuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode

from .files import existing_dir, read_json, replace_dir
from .method import CONFIG_NAME, CONFIGS, check_shapes

# metadata, and settings that only matter when a feature we do not have is switched on elsewhere in the file
METADATA_KEYS = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size"}
SAFETENSORS_NAME, RAW_NAME = "adapter_model.safetensors", "adapter_raw.safetensors"
LoadResult = namedtuple("LoadResult", "missing_keys unexpected_keys")  # what PEFT's load_adapter returns


def config_from_dict(d, source="adapter config"):
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if "peft_type" not in d:
        raise ValueError(f"{source} has no 'peft_type'; expected one of {sorted(CONFIGS)}")
    cls = CONFIGS.get(d["peft_type"]) if isinstance(d["peft_type"], str) else None
    if cls is None:
        raise ValueError(f"{source}: unknown peft_type {d['peft_type']!r}; supported: {sorted(CONFIGS)}")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    # Keys we do not use are ignored; a warning only where the value could change the result.
    unused = {k: v for k, v in d.items() if k not in names and k not in METADATA_KEYS and k != "peft_type"}
    ignored = sorted(k for k, v in unused.items() if v not in (None, False, {}, [], ""))
    if ignored:
        warnings.warn(f"{source}: ignoring keys minipeft does not use: {ignored}", stacklevel=3)
    try:
        return cls(**known, extra={k: d[k] for k in ignored})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def load_config(path):
    path = existing_dir(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory not found: {path}")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"{os.path.join(path, CONFIG_NAME)} not found: is {path} a PEFT adapter directory?")
    cfg_path = os.path.join(path, CONFIG_NAME)
    return config_from_dict(read_json(cfg_path, expect=dict), source=cfg_path)


def read_safetensors(path):
    """Every tensor of an adapter file, refused unless floating point and finite (each error names the key)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt file: safetensors raises its own error types
        raise ValueError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None
    for k, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: {k} has dtype {t.dtype}; adapter weights are floating point")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {k} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values")
    return state


def adapter_parameters(peft_model, adapter_name):
    """PEFT's file key -> parameter, for one adapter (the adapter name stripped, as PEFT's files have it)."""
    if adapter_name in peft_model.prompt_encoder:
        return {f"prompt_encoder.{k}": p for k, p in peft_model.prompt_encoder[adapter_name].named_parameters()}
    out = {}
    for name, layer in peft_model.tuner_layers():
        if adapter_name in layer.adapter_list():
            for k, p in layer.adapter_state(adapter_name).items():
                out[f"base_model.model.{name}.{k}"] = p
    return out


def adapter_state_dict(peft_model, adapter_name):
    """What is saved for one adapter: PEFT's file key -> tensor, detached (a prompt method's peft_state())."""
    if adapter_name in peft_model.prompt_encoder:
        state = peft_model.prompt_encoder[adapter_name].peft_state()
    else:
        state = peft_model.adapter_parameters(adapter_name)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_adapters(peft_model, save_directory, selected_adapters=None, path_initial_model_for_weight_conversion=None):
    """PeftModel.save_pretrained (its docstring says what is written where)."""
    selected = list(selected_adapters or peft_model.adapters)
    if unknown := [n for n in selected if n not in peft_model.peft_config]:
        raise ValueError(f"unknown adapters {unknown}; adapters: {peft_model.adapters}")
    if path_initial_model_for_weight_conversion is not None:
        initial_config = load_config(path_initial_model_for_weight_conversion)
        initial_state = read_safetensors(os.path.join(path_initial_model_for_weight_conversion, SAFETENSORS_NAME))
    with replace_dir(save_directory) as tmp:
        for name in selected:
            d = tmp if name == "default" else tmp / name
            d.mkdir(exist_ok=True)
            config, state = peft_model.peft_config[name], peft_model.adapter_state_dict(name)
            if path_initial_model_for_weight_conversion is not None:
                if not hasattr(config, "relative_to_initial"):
                    raise ValueError(f"{config.peft_type} adapters have no weight conversion to save")
                config, state = config.relative_to_initial(state, initial_config, initial_state)
            save_file(state, d / SAFETENSORS_NAME, {"format": "pt"})
            if name in peft_model.prompt_encoder and hasattr(peft_model.prompt_encoder[name], "raw_state"):
                raw = {k: v.detach().contiguous() for k, v in peft_model.prompt_encoder[name].raw_state().items()}
                save_file(raw, d / RAW_NAME)
            config.save_pretrained(d)


def adapter_shapes(peft_model, adapter_name, config, tokenizer=None):
    """The keys and shapes `config` would give this model, computed on fake tensors: no memory, no init."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        peft_model.add_adapter(adapter_name, config.for_shapes(), tokenizer=tokenizer)
        try:
            shapes = {k: tuple(v.shape) for k, v in peft_model.adapter_state_dict(adapter_name).items()}
        finally:
            peft_model.delete_adapter(adapter_name)
    return shapes


def load_adapter(peft_model, path, adapter_name, is_trainable=False, config=None, tokenizer=None):
    """PeftModel.load_adapter: everything checked before anything is allocated or changed, never a partial load."""
    path = existing_dir(path)
    config = copy.deepcopy(config) if config is not None else load_config(path)
    config.inference_mode = True  # build it without an init (the weights come from the file)
    state = read_safetensors(os.path.join(path, SAFETENSORS_NAME))
    check_shapes(peft_model.adapter_shapes(adapter_name, config, tokenizer), state, path)
    peft_model.add_adapter(adapter_name, config, tokenizer=tokenizer)
    try:
        if adapter_name in peft_model.prompt_encoder:
            peft_model.prompt_encoder[adapter_name].load_peft_state(state, source=path)
            raw_path = os.path.join(path, RAW_NAME)
            if os.path.isfile(raw_path):  # minipeft's own extra file: the trainable form (e.g. the MLP)
                peft_model.prompt_encoder[adapter_name].load_raw_state(read_safetensors(raw_path))
        else:
            with torch.no_grad():
                for k, p in peft_model.adapter_parameters(adapter_name).items():
                    p.copy_(state[k].to(p.dtype))
    except Exception:
        peft_model.delete_adapter(adapter_name)  # leave the model as it was: never a partial load
        raise
    config.inference_mode = not is_trainable
    peft_model.set_adapter(peft_model.active_adapter)  # requires_grad as is_trainable says
    if not is_trainable:
        peft_model.eval()
    return LoadResult([], [])
