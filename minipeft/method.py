"""What every method shares, in one small file: the config base, the layer base, the prompt base.

- PeftConfig: a method's config is a dataclass deriving from it, with its own fields and a `peft_type`, and
  implements `attach(model, adapter_name, tokenizer)`; peft.py reaches every method through that one protocol and
  never names one. Subclasses register themselves by their peft_type, which is how a saved adapter_config.json
  finds its class again.
- TunerLayer: what a layer method (LoRA, bottleneck adapters) wraps a module with: `base_layer`, the adapters by
  name, the active one, `disabled`; a subclass adds `update_layer(name, config)` (create one adapter's weights)
  and `adapter_state(name)` (PEFT's file keys -> its parameters), and `wrap()` puts it around the targets.
- PromptLearning: what a prompt method (prefix, prompt tuning) shares: its virtual tokens in front of the real
  ones (the context check, the attention mask they extend), and the model sizes its config records.

    LoraConfig(r=8, task_type="CAUSAL_LM").save_pretrained("dir")    # dir/adapter_config.json, PEFT's fields
    LoraConfig.from_pretrained("dir")                                 # the same config back

Field values are checked against the dataclass annotations exactly as JSON would carry them (a bool is not an
int, "false" is not a bool, NaN is not a number), so a hand-edited or hostile adapter_config.json is a clear
error, never a silently different adapter.
"""

import abc
import copy
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

CONFIG_NAME = "adapter_config.json"
TASK_TYPES = (None, "CAUSAL_LM")  # PEFT's task types that a decoder-only language model has
CONFIGS = {}  # peft_type -> config class, filled by PeftConfig subclasses as they are defined


def type_ok(value, annotation):
    """Is `value` (as JSON or a caller gives it) of the annotated type? int is not bool, float is finite."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, typing.get_origin(annotation) or annotation)


def type_name(annotation):
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a finite number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object"}  # fmt: skip
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


@dataclass
class PeftConfig(abc.ABC):
    """PEFT's fields every method has (keyword-only, so they follow each method's own fields)."""

    task_type: str | None = field(default="CAUSAL_LM", kw_only=True)  # accepted as in PEFT; CAUSAL_LM or None
    inference_mode: bool = field(default=False, kw_only=True)  # True: the adapter is loaded for inference only
    base_model_name_or_path: str | None = field(default=None, kw_only=True)
    revision: str | None = field(default=None, kw_only=True)  # recorded only (a hub revision of the base model)
    extra: dict = field(default_factory=dict, repr=False, kw_only=True)  # keys of a file we do not use
    peft_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.peft_type:
            CONFIGS[cls.peft_type] = cls

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not type_ok(value, f.type):
                raise ValueError(f"{type(self).__name__}.{f.name} must be {type_name(f.type)}, got {value!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type {self.task_type!r} is not supported; supported: {TASK_TYPES}")

    def to_dict(self):
        """adapter_config.json's content: PEFT's field names, peft_type first, inference_mode True (as PEFT saves)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "extra"}
        return {"peft_type": self.peft_type, **d, "inference_mode": True}

    def save_pretrained(self, save_directory):
        from .files import write_json

        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(save_directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path):
        """The config saved in `path` (a folder holding adapter_config.json, or the file itself)."""
        from .peft_io import load_config

        config = load_config(path)
        if cls is not PeftConfig and not isinstance(config, cls):
            raise ValueError(f"{path} holds a {type(config).__name__} ({config.peft_type}), not a {cls.__name__}")
        return config

    def for_shapes(self):
        """A copy of this config that creates the same weights without touching the model: what peft_io.py's dry
        run (the shapes of a load, on fake tensors) attaches. A method whose init rewrites the model overrides it."""
        return copy.deepcopy(self)

    @abc.abstractmethod
    def attach(self, model, adapter_name, tokenizer=None):
        """Add this adapter to `model` under adapter_name: wrap its layers and return None (layer methods), or
        return the module that runs the model with virtual tokens (prompt methods)."""


# ----------------------------------------------------------------------------------- finding target layers


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
        check_regex(target_modules)
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


def unmatched_targets(model, target_modules):
    """The names in a list of target_modules that match no Linear layer (PEFT ignores them; the CLI refuses)."""
    if isinstance(target_modules, str) or target_modules is None:
        return []
    names = [n for n, m in model.named_modules() if is_linear(m) or hasattr(m, "adapter_state")]
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def check_regex(pattern):
    """Refuse a regex that repeats something which itself repeats or branches, such as (.*)*x or (a|b)+:
    Python's backtracking engine can take exponential time on those, so a hostile adapter_config.json could hang
    the loader. Module-name patterns never need them ('.*\\.(q_proj|v_proj)' is fine)."""
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser
    try:
        tree = parser.parse(pattern)
    except re.error as e:
        raise ValueError(f"target_modules {pattern!r} is not a valid regex: {e}") from None

    def nested(items, repeated):
        for op, av in items:
            op = str(op)
            if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, sub = av
                if (repeated and hi > 1) or nested(sub, repeated or hi > 1):
                    return True
            elif op == "BRANCH" and (repeated or any(nested(b, repeated) for b in av[1])):
                return True
            elif op in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT") and nested(av[-1], repeated):
                return True
        return False

    if nested(tree, False):
        raise ValueError(
            f"target_modules regex {pattern!r} repeats a group that itself repeats or branches (like (.*)* or "
            "(a|b)+), which can take exponential time to match; write it without nesting, e.g. '.*\\.(q_proj|v_proj)'"
        )


def check_shapes(expected, state, source):
    """Every expected key present with its shape and nothing else; errors name the key and both shapes."""
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"adapter at {source} does not fit this model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(
                f"adapter at {source}: {k} has shape {tuple(state[k].shape)} in the file but {tuple(shape)} in the "
                "model (was it made for another base model?)"
            )


def trainable_dtype(dtype):
    """The dtype an adapter's weights train in: float32 on a bf16/fp16 base (as PEFT's autocast_adapter_dtype),
    because AdamW's small updates of 16-bit weights lose most of their bits; the base's dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------ layer methods' base


class TunerLayer(nn.Module):
    """Wraps `base_layer` (nn.Linear, or NF4Linear for QLoRA) and holds adapters by name, as PEFT does."""

    adapter_layer_names: ClassVar[tuple] = ()  # the dicts holding each adapter's parts, keyed by adapter name

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.active_adapter = "default"
        self.disabled = False  # set by PeftModel.disable_adapter()

    def base_dtype_device(self):
        """The base layer's compute dtype and device, read without dequantizing a 4-bit base."""
        w = getattr(self.base_layer, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.dtype, w.device
        return self.base_layer.dtype, self.base_layer.device  # NF4Linear states them

    def adapter_kwargs(self):  # device and dtype for a new adapter's weights
        dtype, device = self.base_dtype_device()
        return dict(device=device, dtype=trainable_dtype(dtype))

    def adapter_list(self):
        return list(getattr(self, self.adapter_layer_names[0]))

    def delete_adapter(self, name):
        for attr in self.adapter_layer_names:
            if name in getattr(self, attr):
                del getattr(self, attr)[name]

    @classmethod
    def wrap(cls, model, targets, config, name="default"):
        """Wrap each (qualified name, module) of `targets` in cls (or add adapter `name` to an existing wrapper)."""
        for qualname, module in targets:
            if not isinstance(module, cls):
                parent_name, _, child = qualname.rpartition(".")
                module = cls(module)
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
            if name in module.adapter_list():
                raise ValueError(f"adapter {name!r} already exists on {qualname}")
            module.name_in_model = qualname  # (a method may choose by name, e.g. IA3's feedforward modules)
            module.update_layer(name, config)


# ------------------------------------------------------------------------------------ prompt methods' base


def fill_from_model(config, actual, context):
    """Set the model sizes a prompt config records for PEFT (token_dim, num_layers, ...), refusing ones that were
    set already to other values: such an adapter was made for another base model."""
    for name, value in actual.items():
        if getattr(config, name) is not None and getattr(config, name) != value:
            raise ValueError(
                f"{type(config).__name__}.{name}={getattr(config, name)} does not fit this model, which has "
                f"{name}={value} (was the adapter made for another base model?)"
            )
        setattr(config, name, value)
    if config.num_virtual_tokens >= context:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for a real token in the context of "
            f"max_position_embeddings={context}"
        )


class PromptLearning(nn.Module):
    """P virtual tokens ahead of the real ones: they take positions 0 .. P-1, the real tokens P, P+1, ..."""

    kind: ClassVar[str] = ""  # what the virtual tokens are called in errors ("prefix", "prompt")

    def __init__(self, num_virtual_tokens):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def prologue(self, model, x, attention_mask, position_ids, past_key_values):
        """-> (B, T, P, attention_mask with P ones in front, position_ids + P). The context must hold the virtual
        tokens too."""
        B, T, P = x.shape[0], x.shape[1], self.num_virtual_tokens
        past = past_key_values[0][0].size(2) if past_key_values else P  # the cache length, virtual tokens included
        max_len = model.config.max_position_embeddings
        if past + T > max_len:
            raise ValueError(
                f"{T} tokens (+ {past - P} cached) + {P} virtual tokens of the {self.kind} exceed the context "
                f"max_position_embeddings={max_len}"
            )
        if attention_mask is not None:  # the P virtual tokens are always visible
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        return B, T, P, attention_mask, None if position_ids is None else position_ids + P
