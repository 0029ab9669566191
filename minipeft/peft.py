"""The shared machinery: get_peft_model, PeftModel, saving and loading in Hugging Face PEFT's format.

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model(input_ids, labels=labels).loss.backward()      # only the adapter has requires_grad
    peft_model.save_pretrained("out")                         # adapter_config.json + adapter_model.safetensors
    peft_model = PeftModel.from_pretrained(base, "out")       # the same files HF PEFT reads and writes

Every method plugs in one way (method.py): `config.attach(model, adapter_name, tokenizer)`. Layer methods (LoRA,
bottleneck adapters) wrap modules of the base model in place and return None; their layers expose
`adapter_state(name)` (PEFT's key suffixes -> parameters), `adapter_list()`, `delete_adapter(name)`,
`active_adapter`, `disabled` and `base_layer`, and this file finds them by those attributes (layers that can be
merged also have `merge`/`unmerge`/`merged_linear`). Prompt-learning methods (prefix, prompt tuning) leave the
model untouched and return a module kept in `PeftModel.prompt_encoder[name]` that runs the model:
`forward_model(model, **kwargs)`, `peft_state()` (PEFT's `prompt_embeddings`), `load_peft_state(d)`.
This file names no method.

Saving and loading is in peft_io.py (PEFT's file format and key names, the checks a load makes before it
allocates anything); PeftModel's save_pretrained, load_adapter, adapter_state_dict, ... are thin calls into it.
"""

import contextlib

import torch
import torch.nn as nn

from . import fast, peft_io
from .decoding import generate
from .method import CONFIG_NAME, CONFIGS, check_shapes, find_targets, unmatched_targets  # noqa: F401 (re-exported)
from .model import ModelOutput
from .peft_io import LoadResult, config_from_dict, load_config, read_safetensors  # noqa: F401 (re-exported)


class PeftModel(nn.Module):
    def __init__(self, model, config=None, adapter_name="default", tokenizer=None):
        super().__init__()
        self.base_model = model
        self.peft_config = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        if config is not None:  # (from_pretrained starts empty and loads the adapter from its file)
            self.add_adapter(adapter_name, config, tokenizer=tokenizer)

    @property
    def config(self):
        return self.base_model.config

    @property
    def adapters(self):
        return list(self.peft_config)

    @property
    def active_adapters(self):  # PEFT's name; one active adapter at a time here
        return [self.active_adapter]

    @property
    def active_peft_config(self):
        return self.peft_config[self.active_adapter]

    def get_base_model(self):
        return self.base_model

    def tuner_layers(self):
        return [(n, m) for n, m in self.base_model.named_modules() if hasattr(m, "adapter_state")]

    # ----- adding, switching, deleting adapters -----
    def add_adapter(self, adapter_name, config, tokenizer=None):
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter name {adapter_name!r} already exists; adapters: {self.adapters}")
        if (
            not isinstance(adapter_name, str)
            or not adapter_name.replace("-", "_").isidentifier()
            or adapter_name == "__base__"
        ):
            raise ValueError(f"bad adapter name {adapter_name!r}: use letters, digits, '_' or '-' (not '__base__')")
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and config.peft_type not in kinds:
            raise ValueError(f"cannot add a {config.peft_type} adapter next to {sorted(kinds)} adapters")
        encoder = config.attach(self.base_model, adapter_name, tokenizer=tokenizer)
        if encoder is not None:  # a prompt-learning method: it runs the model itself
            self.prompt_encoder[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def set_adapter(self, adapter_name):
        """Make adapter_name the one forward uses. As in PEFT, only the active adapter is trainable, and not if it
        was loaded for inference (is_trainable=False) or while the adapters are disabled."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {self.adapters}")
        self.active_adapter = adapter_name

        def trainable(name):
            return name == adapter_name and not self.peft_config[name].inference_mode and not self._disabled

        for _, layer in self.tuner_layers():  # one pass over the model
            layer.active_adapter = adapter_name
            for name in layer.adapter_list():
                for p in layer.adapter_state(name).values():
                    p.requires_grad_(trainable(name))
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable(name))

    def delete_adapter(self, adapter_name):
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {self.adapters}")
        if any(adapter_name in getattr(layer, "merged_adapters", ()) for _, layer in self.tuner_layers()):
            raise ValueError(f"cannot delete adapter {adapter_name!r} while it is merged: unmerge_adapter() first")
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
        return peft_io.adapter_parameters(self, adapter_name)

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None):
        """A new adapter from a weighted combination of existing ones (LoRA: "cat", "linear" or "svd"; see
        lora.combine_adapters). Returns {module name: squared Frobenius error of the rank truncation}."""
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; adapters: {self.adapters}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter name {adapter_name!r} already exists; adapters: {self.adapters}")
        configs = [self.peft_config[a] for a in adapters]
        if not hasattr(type(configs[0]), "combined"):
            raise ValueError(f"add_weighted_adapter does not combine {configs[0].peft_type} adapters")
        config = type(configs[0]).combined(configs, combination_type, svd_rank)  # validates, or a clear error
        errors = {}
        for name, layer in self.tuner_layers():
            if any(a in layer.adapter_list() for a in adapters):
                errors[name] = layer.combine(adapters, weights, adapter_name, combination_type, config)
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
            if self.active_adapter in self.prompt_encoder and not self._disabled:
                return self.prompt_encoder[self.active_adapter].forward_model(self.base_model, **kwargs)
            ids = kwargs.pop("input_ids")
            return self.base_model(ids, **kwargs)

    def num_targets(self, labels):
        """The tokens the loss is a mean over (train.py weighs micro-batches by it): labels shifted by one, -100
        excluded, plus what the active method adds (prompt tuning: the first real token, see prompt.py)."""
        encoder = self.prompt_encoder[self.active_adapter] if self.active_adapter in self.prompt_encoder else None
        if encoder is not None and not self._disabled and hasattr(encoder, "num_targets"):
            return encoder.num_targets(labels)
        return int((labels[:, 1:] != -100).sum())

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names, batch):
        if adapter_names is None:
            yield
            return
        if len(adapter_names) != batch.size(0):
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch.size(0)} rows")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"unknown adapter names {unknown}; adapters: {self.adapters} and '__base__'")
        layers = [m for _, m in self.tuner_layers()]
        if self.prompt_encoder or not all(hasattr(m, "check_mixed_batch") for m in layers):
            raise ValueError(f"adapter_names (mixed batches) does not work with {self.active_peft_config.peft_type}")
        for m in layers:
            m.check_mixed_batch(set(adapter_names))  # e.g. no merged adapter, no DoRA among the names used
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
        encoder = self.prompt_encoder[self.active_adapter] if self.active_adapter in self.prompt_encoder else None
        P = 0 if self._disabled or encoder is None else encoder.num_virtual_tokens
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

    # ----- switching adapters off -----
    def disable_adapter_layers(self):
        """Run the base model alone until enable_adapter_layers(); as in PEFT, no adapter is trainable meanwhile."""
        layers = [m for _, m in self.tuner_layers()]
        if any(getattr(m, "merged_adapters", None) for m in layers):
            raise ValueError("disabling adapters needs them unmerged: call unmerge_adapter() first")
        self._disabled = True
        for m in layers:
            m.disabled = True
        self.set_adapter(self.active_adapter)  # requires_grad off for every adapter

    def enable_adapter_layers(self):
        self._disabled = False
        for _, m in self.tuner_layers():
            m.disabled = False
        self.set_adapter(self.active_adapter)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this block the model is exactly the base model; on exit the previous state comes back."""
        was_disabled = self._disabled
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if not was_disabled:  # nested blocks: only the outermost one enables again
                self.enable_adapter_layers()

    # Speed levers (fast.py), under the names transformers and minipeft users call them by
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Recompute each block in backward (less memory, more time): fast.checkpoint_blocks."""
        fast.checkpoint_blocks(self, True)

    def gradient_checkpointing_disable(self):
        fast.checkpoint_blocks(self, False)

    def compile_blocks(self, **options):  # fast.compile_blocks
        return fast.compile_blocks(self, **options)

    # ----- counting -----
    def num_parameters(self, trainable_only=False):
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        if not trainable_only:  # a 4-bit layer packs two parameters per byte in a buffer, not a Parameter
            total += sum(m.in_features * m.out_features for m in self.modules() if hasattr(m, "qweight"))
        return total

    def get_nb_trainable_parameters(self):  # PEFT's name: (trainable, all)
        return self.num_parameters(trainable_only=True), self.num_parameters()

    def print_trainable_parameters(self):
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # ----- merging -----
    def _mergeable_layers(self, what):
        layers = self.tuner_layers()
        if self.prompt_encoder or not all(hasattr(m, "merged_linear") for _, m in layers):
            raise ValueError(
                f"{what} works for LoRA/DoRA only; {self.active_peft_config.peft_type} adapters cannot be merged "
                "into the weights (they add computation the base model does not have)"
            )
        return layers

    def _merge_names(self, adapter_names):
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        if unknown := [n for n in names if n not in self.peft_config]:
            raise ValueError(f"unknown adapters {unknown}; adapters: {self.adapters}")
        return names

    def merge_adapter(self, adapter_names=None, safe_merge=False):
        """Fold adapters (default: the active one) into the base weights, in place; unmerge_adapter() undoes it."""
        names = self._merge_names(adapter_names)
        for _, layer in self._mergeable_layers("merge_adapter()"):
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self):
        for _, layer in self._mergeable_layers("unmerge_adapter()"):
            layer.unmerge()

    def merge_and_unload(self, progressbar=False, safe_merge=False, adapter_names=None, requantize=False):
        """Replace every adapter layer by a plain nn.Linear holding W' (the active adapter, or adapter_names merged
        one after the other); return the base model. safe_merge=True refuses a W' with NaN or inf values.

        On a 4-bit (QLoRA) base, W' = dequantize(W_nf4) + sBA is computed in full precision, so the result is a
        full-precision model that equals the adapted model exactly. requantize=True quantizes W' back to NF4
        (same blocksize and double quantization): smaller, but no longer exact. The price is recorded in
        self.merge_report[name] = {"requantize_error": ||Q(W') - W'||, "delta_norm": ||sBA||}: when the first is
        not small next to the second, re-quantizing throws away much of what the adapter learned.
        """
        names = self._merge_names(adapter_names)
        layers = self._mergeable_layers("merge_and_unload()")
        merged = {}
        for name, layer in layers:  # all computed and checked first: a refused safe_merge changes nothing
            if layer.merged_adapters:
                layer.unmerge()
            merged[name] = layer.merged_linear(names, safe_merge=safe_merge, name=name)
        self.merge_report = {}
        for name, layer in layers:
            q = getattr(layer.base_layer, "qweight", None)  # a 4-bit base
            if requantize and q is not None:
                requantized = type(layer.base_layer).from_linear(merged[name], q.blocksize, q.nested)
                with torch.no_grad():
                    self.merge_report[name] = {
                        "requantize_error": (requantized.dequantize() - merged[name].weight).norm().item(),
                        "delta_norm": (merged[name].weight - layer.base_weight()).norm().item(),
                    }
                merged[name] = requantized
            self.replace_module(name, merged[name])
        return self.base_model

    def unload(self):
        """Remove every adapter without merging; return the base model as it was."""
        for name, layer in self.tuner_layers():
            if getattr(layer, "merged_adapters", None):
                layer.unmerge()
            self.replace_module(name, layer.base_layer)
        return self.base_model

    # ----- saving and loading -----
    def save_pretrained(self, save_directory, selected_adapters=None, path_initial_model_for_weight_conversion=None):
        """Each adapter's two files (default in save_directory, others in save_directory/<name>/), the whole folder
        replaced atomically; anything else already in it (a README, other adapters) is kept.

        path_initial_model_for_weight_conversion (PEFT's name): an adapter whose init rewrote the base weights
        (LoRA's "pissa", "olora") is saved relative to the ORIGINAL base instead, given the adapter as it was saved
        right after its init: the method's config says how (LoraConfig.relative_to_initial)."""
        peft_io.save_adapters(self, save_directory, selected_adapters, path_initial_model_for_weight_conversion)

    def adapter_state_dict(self, adapter_name):
        return peft_io.adapter_state_dict(self, adapter_name)

    @classmethod
    def from_pretrained(cls, model, path, adapter_name="default", is_trainable=False, tokenizer=None, config=None):
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = cls(model, adapter_name=adapter_name)
        peft_model.load_adapter(path, adapter_name, is_trainable=is_trainable, config=config, tokenizer=tokenizer)
        return peft_model

    def adapter_shapes(self, adapter_name, config, tokenizer=None):
        """The keys and shapes `config` would give this model, computed on fake tensors: no memory, no init."""
        return peft_io.adapter_shapes(self, adapter_name, config, tokenizer)

    def load_adapter(self, path, adapter_name, is_trainable=False, config=None, tokenizer=None):
        """Add an adapter from a PEFT-format directory. Everything is checked before anything is allocated or
        changed (see peft_io.py); returns PEFT's (missing_keys, unexpected_keys), both empty."""
        return peft_io.load_adapter(self, path, adapter_name, is_trainable, config, tokenizer)


def get_peft_model(model, config, adapter_name="default", tokenizer=None) -> PeftModel:
    """Freeze every base parameter, add the adapter described by config, and return the PeftModel."""
    if type(config) not in CONFIGS.values():
        raise ValueError(f"unknown method {type(config).__name__}; supported: {[c.__name__ for c in CONFIGS.values()]}")
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel: use peft_model.add_adapter(name, config) instead")
    for p in model.parameters():
        p.requires_grad_(False)
    if config.base_model_name_or_path is None:  # as PEFT: the model's own name_or_path (load_pretrained sets it)
        config.base_model_name_or_path = getattr(model, "name_or_path", None)
    return PeftModel(model, config, adapter_name, tokenizer=tokenizer)
