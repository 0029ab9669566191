"""The shared machinery: get_peft_model, PeftModel, saving and loading in Hugging Face PEFT's format.

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model(input_ids, labels=labels).loss.backward()      # only the adapter has requires_grad
    peft_model.save_pretrained("out")                         # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base, "out")       # the same files HF PEFT reads and writes

Two kinds of method plug in here:
- layer methods (LoRA, bottleneck adapters) wrap modules of the base model in place. Their layers expose
  `adapter_state(name)` (PEFT's key suffixes -> parameters), `adapter_list()`, `delete_adapter(name)`,
  `active_adapter`,
  `disabled` and `base_layer`; this file finds them by those attributes.
- prompt-learning methods (prefix tuning, prompt tuning) leave the model untouched and own a module in
  `PeftModel.prompt_encoder[name]` that runs the model: `forward_model(model, **kwargs)`, `peft_state()`
  (PEFT's `prompt_embeddings`), `load_peft_state(d)`, `num_virtual_tokens`.

File format (PEFT's): keys are the module path prefixed by `base_model.model.`, with the adapter name
stripped: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. A non-default adapter is saved
in `<dir>/<name>/`. Files are written to a temporary name and renamed, so a crash leaves the old file whole.
"""

import contextlib
import dataclasses
import json
import os
import re
import warnings

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import AdapterConfig
from .checkpoint import atomic_write
from .decoding import generate
from .lora import LoraConfig, combine_adapters, inject_lora
from .model import ModelOutput
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig

CONFIG_CLASSES = {  # peft_type -> config class
    "LORA": LoraConfig,
    "BOTTLENECK": AdapterConfig,
    "PREFIX_TUNING": PrefixTuningConfig,
    "PROMPT_TUNING": PromptTuningConfig,
}
PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING"}  # they own a prompt_encoder module instead of wrapping layers
# metadata, and settings that only matter when a feature we do not have is switched on elsewhere in the file
METADATA_KEYS = {
    "peft_type",
    "task_type",
    "inference_mode",
    "peft_version",
    "revision",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
}
SAFETENSORS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def is_linear(module):
    """nn.Linear or anything shaped like one (NF4Linear), but not an already-wrapped adapter layer."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and not hasattr(module, "adapter_state")
    )


def find_targets(model, target_modules):
    """(qualified name, module) pairs for target_modules: names/suffixes, a full-match regex, or "all-linear"."""
    linears = {}
    for name, m in model.named_modules():
        if hasattr(m, "adapter_state"):  # an existing adapter layer: its base layer is the target
            linears[name] = m
        elif is_linear(m) and not any(name.startswith(k + ".") for k in linears):
            linears[name] = m
    if target_modules == "all-linear":
        hits = {n: m for n, m in linears.items() if not re.search(r"(^|\.)lm_head$", n)}
    elif isinstance(target_modules, str):
        hits = {n: m for n, m in linears.items() if re.fullmatch(target_modules, n)}
    else:
        hits = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in target_modules)}
    if not hits:
        candidates = sorted({n.rpartition(".")[2] for n in linears})
        raise ValueError(
            f"target_modules={target_modules!r} matched no Linear layer; candidates: {candidates} "
            "(or 'all-linear', or a regex matching full names such as 'model.layers.0.self_attn.q_proj')"
        )
    return list(hits.items())


def config_from_dict(d, source="adapter config"):
    if "peft_type" not in d:
        raise ValueError(f"{source} has no 'peft_type'; expected one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES.get(d["peft_type"])
    if cls is None:
        raise ValueError(f"{source}: unknown peft_type {d['peft_type']!r}; supported: {sorted(CONFIG_CLASSES)}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in fields}
    # Keys we do not use are ignored; a warning only where the value could change the result.
    unused = {k: v for k, v in d.items() if k not in fields and k not in METADATA_KEYS}
    ignored = sorted(k for k, v in unused.items() if v not in (None, False, {}, [], ""))
    if ignored:
        warnings.warn(f"{source}: ignoring keys minipeft does not use: {ignored}", stacklevel=3)
    return cls(**known, extra={k: d[k] for k in ignored})


def read_safetensors(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt file: safetensors raises its own error types
        raise ValueError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None


class PeftModel(nn.Module):
    def __init__(self, model, config, adapter_name="default", tokenizer=None):
        super().__init__()
        self.base_model = model
        self.peft_config = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        self.add_adapter(adapter_name, config, tokenizer=tokenizer)

    @property
    def config(self):
        return self.base_model.config

    @property
    def adapters(self):
        return list(self.peft_config)

    @property
    def active_peft_config(self):
        return self.peft_config[self.active_adapter]

    def tuner_layers(self):
        return [(n, m) for n, m in self.base_model.named_modules() if hasattr(m, "adapter_state")]

    # ----- adding, switching, deleting adapters -----
    def add_adapter(self, adapter_name, config, tokenizer=None):
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter name {adapter_name!r} already exists; adapters: {self.adapters}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name) or adapter_name == "__base__":
            raise ValueError(f"bad adapter name {adapter_name!r}: use letters, digits, '_' or '-' (not '__base__')")
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and config.peft_type not in kinds:
            raise ValueError(f"cannot add a {config.peft_type} adapter next to {sorted(kinds)} adapters")
        if config.peft_type in PROMPT_LEARNING:
            self.prompt_encoder[adapter_name] = config.build(self.base_model, tokenizer=tokenizer)
        elif isinstance(config, LoraConfig):
            inject_lora(self.base_model, find_targets(self.base_model, config.target_modules), config, adapter_name)
        else:
            config.inject(self.base_model, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def set_adapter(self, adapter_name):
        """Make adapter_name the one forward uses; as in PEFT, only the active adapter is trainable."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {self.adapters}")
        self.active_adapter = adapter_name
        for _, layer in self.tuner_layers():  # one pass over the model
            layer.active_adapter = adapter_name
            for name in layer.adapter_list():
                for p in layer.adapter_state(name).values():
                    p.requires_grad_(name == adapter_name)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name):
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {self.adapters}")
        del self.peft_config[adapter_name]
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        for name, layer in self.tuner_layers():
            layer.delete_adapter(adapter_name)
            if not layer.adapter_list():
                self.replace_module(name, layer.base_layer)  # no adapter left here: unwrap
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def replace_module(self, qualname, new):
        parent_name, _, child = qualname.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, child, new)

    def adapter_parameters(self, adapter_name):
        """PEFT's file key -> parameter, for one adapter (the adapter name stripped, as PEFT's files have it)."""
        if adapter_name in self.prompt_encoder:
            return {f"prompt_encoder.{k}": p for k, p in self.prompt_encoder[adapter_name].named_parameters()}
        out = {}
        for name, layer in self.tuner_layers():
            if adapter_name in layer.adapter_list():
                for k, p in layer.adapter_state(adapter_name).items():
                    out[f"base_model.model.{name}.{k}"] = p
        return out

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None):
        """A new LoRA adapter from a weighted combination of existing ones ("cat", "linear" or "svd").

        Returns {module name: squared Frobenius error of the rank truncation} (zeros except for "svd").
        """
        if combination_type not in ("cat", "linear", "svd"):
            raise ValueError(f"unknown combination_type {combination_type!r}; valid: 'cat', 'linear', 'svd'")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; adapters: {self.adapters}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter name {adapter_name!r} already exists; adapters: {self.adapters}")
        configs = [self.peft_config[a] for a in adapters]
        if any(c.peft_type != "LORA" or c.use_dora for c in configs):
            raise ValueError("add_weighted_adapter combines plain LoRA adapters only (not DoRA or other methods)")
        ranks = [c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}")
        r = (
            sum(ranks)
            if combination_type == "cat"
            else svd_rank or max(ranks)
            if combination_type == "svd"
            else ranks[0]
        )
        config = LoraConfig(r=r, lora_alpha=r, target_modules=configs[0].target_modules,
                            base_model_name_or_path=configs[0].base_model_name_or_path)  # fmt: skip
        errors = {}
        for name, layer in self.tuner_layers():
            if any(a in layer.lora_A for a in adapters):
                errors[name] = combine_adapters(layer, adapters, weights, adapter_name, combination_type, config)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter)  # only the active adapter stays trainable
        return errors

    # ----- running -----
    def forward(
        self,
        input_ids=None,
        *,
        attention_mask=None,
        labels=None,
        inputs_embeds=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        adapter_names=None,
        return_logits=True,
    ) -> ModelOutput:
        kwargs = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            labels=labels,
            return_logits=return_logits,
        )
        with self.mixed_batch(adapter_names, input_ids if input_ids is not None else inputs_embeds):
            if self.active_peft_config.peft_type in PROMPT_LEARNING and not self._disabled:
                return self.prompt_encoder[self.active_adapter].forward_model(self.base_model, **kwargs)
            ids = kwargs.pop("input_ids")
            return self.base_model(ids, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names, batch):
        if adapter_names is None:
            yield
            return
        if self.active_peft_config.peft_type != "LORA":
            raise ValueError("adapter_names (mixed batches) works for LoRA adapters only")
        if len(adapter_names) != batch.size(0):
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch.size(0)} rows")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"unknown adapter names {unknown}; adapters: {self.adapters} and '__base__'")
        layers = [m for _, m in self.tuner_layers()]
        if any(m.merged_adapters for m in layers) or any(m.lora_magnitude_vector for m in layers):
            raise ValueError("mixed batches need unmerged, non-DoRA LoRA adapters (as in PEFT)")
        for m in layers:
            m.adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for m in layers:
                m.adapter_names = None

    def generate(
        self,
        input_ids,
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        attention_mask=None,
        generator=None,
        adapter_names=None,
    ):
        P = (
            0
            if self._disabled
            else getattr(self.prompt_encoder[self.active_adapter], "num_virtual_tokens", 0)
            if self.active_adapter in self.prompt_encoder
            else 0
        )
        kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            attention_mask,
            generator,
            max_len=self.config.max_position_embeddings - P,
            **kw,
        )

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this block the model is exactly the base model."""
        layers = [m for _, m in self.tuner_layers()]
        if any(getattr(m, "merged_adapters", None) for m in layers):
            raise ValueError("disable_adapter() needs unmerged adapters: call unmerge_adapter() first")
        old = [m.disabled for m in layers]
        self._disabled = True
        for m in layers:
            m.disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for m, d in zip(layers, old):
                m.disabled = d

    def compile_blocks(self, **options):  # Transformer.compile_blocks on the base model (a speed lever)
        self.base_model.compile_blocks(**options)
        return self

    # ----- counting -----
    def num_parameters(self, trainable_only=False):
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        if not trainable_only:  # a 4-bit layer packs two parameters per byte in a buffer, not a Parameter
            total += sum(m.in_features * m.out_features for m in self.modules() if type(m).__name__ == "NF4Linear")
        return total

    def print_trainable_parameters(self):
        t, a = self.num_parameters(trainable_only=True), self.num_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ----- merging -----
    def _lora_layers(self, what):
        if any(c.peft_type != "LORA" for c in self.peft_config.values()):
            raise ValueError(
                f"{what} works for LoRA/DoRA only; {self.active_peft_config.peft_type} adapters cannot be merged "
                "into the weights (they add computation the base model does not have)"
            )
        return self.tuner_layers()

    def merge_adapter(self):
        for _, layer in self._lora_layers("merge_adapter()"):
            layer.merge()

    def unmerge_adapter(self):
        for _, layer in self._lora_layers("unmerge_adapter()"):
            layer.unmerge()

    def merge_and_unload(self, requantize=False):
        """Replace every LoRA layer by a plain nn.Linear holding W' (the active adapter); return the base model.

        On a 4-bit (QLoRA) base, W' = dequantize(W_nf4) + sBA is computed in full precision, so the result is a
        full-precision model that equals the adapted model exactly. requantize=True quantizes W' back to NF4
        (same blocksize and double quantization): smaller, but no longer exact. The price is recorded in
        self.merge_report[name] = {"requantize_error": ||Q(W') - W'||, "delta_norm": ||sBA||}: when the first is
        not small next to the second, re-quantizing throws away much of what the adapter learned.
        """
        self.merge_report = {}
        for name, layer in self._lora_layers("merge_and_unload()"):
            if layer.merged_adapters:
                layer.unmerge()
            merged = layer.merged_linear()
            q = getattr(layer.base_layer, "qweight", None)  # an NF4Linear base
            if requantize and q is not None:
                from .nf4 import NF4Linear

                requantized = NF4Linear.from_linear(merged, blocksize=q.blocksize, double_quant=q.nested)
                with torch.no_grad():
                    self.merge_report[name] = {
                        "requantize_error": (requantized.dequantize() - merged.weight).norm().item(),
                        "delta_norm": (merged.weight - layer.base_weight()).norm().item(),
                    }
                merged = requantized
            self.replace_module(name, merged)
        return self.base_model

    def unload(self):
        """Remove every adapter without merging; return the base model as it was."""
        for name, layer in self.tuner_layers():
            if getattr(layer, "merged_adapters", None):
                layer.unmerge()
            self.replace_module(name, layer.base_layer)
        return self.base_model

    # ----- saving and loading -----
    def save_pretrained(self, save_directory, selected_adapters=None):
        for name in selected_adapters or self.adapters:
            d = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(d, exist_ok=True)
            state = self.adapter_state_dict(name)
            atomic_write(os.path.join(d, SAFETENSORS_NAME), lambda p, s=state: save_file(s, p, {"format": "pt"}))
            if name in self.prompt_encoder and hasattr(self.prompt_encoder[name], "raw_state"):
                raw = {k: v.detach().contiguous() for k, v in self.prompt_encoder[name].raw_state().items()}
                atomic_write(os.path.join(d, "adapter_raw.safetensors"), lambda p, s=raw: save_file(s, p))
            text = json.dumps(self.peft_config[name].to_peft_dict(), indent=2, sort_keys=True)
            atomic_write(os.path.join(d, CONFIG_NAME), lambda p, t=text: open(p, "w").write(t))

    def adapter_state_dict(self, adapter_name):
        if adapter_name in self.prompt_encoder:
            state = self.prompt_encoder[adapter_name].peft_state()
        else:
            state = self.adapter_parameters(adapter_name)
        return {k: v.detach().contiguous() for k, v in state.items()}

    @classmethod
    def from_pretrained(cls, model, path, adapter_name="default", is_trainable=False, tokenizer=None):
        config = load_config(path)
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model.base_model, peft_model.peft_config = model, {}
        peft_model.prompt_encoder, peft_model.active_adapter, peft_model._disabled = (
            nn.ModuleDict(),
            adapter_name,
            False,
        )
        peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable, config=config, tokenizer=tokenizer)
        return peft_model

    def load_adapter(self, path, adapter_name, is_trainable=False, config=None, tokenizer=None):
        """Add an adapter from a PEFT-format directory; every key and shape is checked before it is kept."""
        config = config or load_config(path)
        state = read_safetensors(os.path.join(path, SAFETENSORS_NAME))
        self.add_adapter(adapter_name, config, tokenizer=tokenizer)
        try:
            if adapter_name in self.prompt_encoder:
                self.prompt_encoder[adapter_name].load_peft_state(state, source=path)
                raw_path = os.path.join(path, "adapter_raw.safetensors")
                if os.path.isfile(raw_path):  # minipeft's own extra file: the trainable form (e.g. the MLP)
                    self.prompt_encoder[adapter_name].load_raw_state(read_safetensors(raw_path))
            else:
                load_into(self.adapter_parameters(adapter_name), state, path)
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was: never a partial load
            raise
        if not is_trainable:
            for p in self.adapter_parameters(adapter_name).values():
                p.requires_grad_(False)
            self.eval()
        return self


def load_config(path):
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory not found: {path}")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {path} a PEFT adapter directory?")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    return config_from_dict(d, source=cfg_path)


def load_into(params, state, source):
    """Copy state into params after checking every key and shape (names the offending key and both shapes)."""
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter at {source} does not fit this model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(
                f"adapter at {source}: {k} has shape {tuple(state[k].shape)} in the file but "
                f"{tuple(p.shape)} in the model (was it made for another base model?)"
            )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def get_peft_model(model, config, adapter_name="default", tokenizer=None) -> PeftModel:
    """Freeze every base parameter, add the adapter described by config, and return the PeftModel."""
    if config.peft_type not in CONFIG_CLASSES:
        raise ValueError(f"unknown method {type(config).__name__}; supported peft_types: {list(CONFIG_CLASSES)}")
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel: use peft_model.add_adapter(name, config) instead")
    for p in model.parameters():
        p.requires_grad_(False)
    return PeftModel(model, config, adapter_name, tokenizer=tokenizer)
