"""IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning") in one file: learned vectors that rescale activations, the smallest adapter there is.

    attention's keys and values:   k = l_k ⊙ (W_k x)        v = l_v ⊙ (W_v x)          l_k, l_v: (out,)
    the MLP's intermediate:        y = W_down (l_ff ⊙ h)    h = silu(gate(x)) ⊙ up(x)    l_ff: (intermediate,)

A target module's output is scaled (y = l ⊙ base(x)); a "feedforward" module's input is scaled instead
(y = base(l ⊙ x)), which for down_proj is exactly the MLP's intermediate activation. Every l starts at 1, so the
model starts as the base model. Trainable parameters per layer, with PEFT's default targets: k_proj's and
v_proj's output widths (kv heads * head_dim each) plus down_proj's input width (the MLP's intermediate size).

Merging folds l into the weight: W' = diag(l) W (output scaling, the bias too) or W' = W diag(l) (input scaling),
exact; unmerging divides again (refused when some l is 0). The gradient, tied to full fine-tuning of W' with
G = dL/dW':  dL/dl = rowsum(G ⊙ W) (output scaling)  or  colsum(G ⊙ W) (input scaling)  (gradcheck.py).

Saved as HF PEFT saves it (peft_type "IA3"): `<module>.ia3_l` of shape (out, 1) for an output-scaled target and
(1, in) for a feedforward one; PEFT's defaults for Llama-family models: target_modules k_proj, v_proj, down_proj,
feedforward_modules down_proj.
"""

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .method import PeftConfig, TunerLayer, find_targets

# PEFT's defaults for target_modules=None / feedforward_modules=None (llama, mistral and qwen2 alike)
DEFAULT_TARGETS, DEFAULT_FEEDFORWARD = ("k_proj", "v_proj", "down_proj"), ("down_proj",)


@dataclass
class IA3Config(PeftConfig):
    target_modules: tuple | list | str | None = None  # names/suffixes or a full-match regex; None: PEFT's defaults
    feedforward_modules: tuple | list | str | None = None  # which targets scale their input (a subset of them)
    init_ia3_weights: bool = True  # True: every l = 1 (the base model); False: random (tests)
    fan_in_fan_out: bool = False
    modules_to_save: list | None = None
    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self):
        super().__post_init__()  # the JSON types of every field
        if self.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True is for GPT-2's Conv1D layers; Llama-family Linears need False")
        if self.modules_to_save:
            raise ValueError(f"modules_to_save is not supported, got {self.modules_to_save!r}")
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))

    def attach(self, model, adapter_name="default", tokenizer=None):
        if self.target_modules is None:  # resolved once, and saved resolved, as PEFT does
            self.target_modules = DEFAULT_TARGETS
            self.feedforward_modules = (
                DEFAULT_FEEDFORWARD if self.feedforward_modules is None else self.feedforward_modules
            )
        targets = find_targets(model, self.target_modules)
        names = [n for n, _ in targets]
        if not isinstance(self.feedforward_modules, str):  # (a regex may match none; a listed name must match)
            stray = [f for f in self.feedforward_modules or () if not any(matches(n, (f,)) for n in names)]
            if stray:
                raise ValueError(f"feedforward_modules {stray} are not among the target layers {names[:4]} ...")
        IA3Layer.wrap(model, targets, self, adapter_name)


def matches(name, patterns):
    """PEFT's rule: a regex string matches the full name; a list matches a name or its last dotted parts."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class IA3Layer(TunerLayer):
    """base_layer(l ⊙ x) for a feedforward target, l ⊙ base_layer(x) otherwise, for the active adapter."""

    adapter_layer_names = ("ia3_l", "is_feedforward")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = {}  # per adapter: does it scale the input (True) or the output (False)
        self.merged_adapters = []

    def update_layer(self, name, config: IA3Config):
        feedforward = matches(self.name_in_model, config.feedforward_modules or ())
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes, in its files
        l = torch.ones(shape, **self.adapter_kwargs())  # float32 on a 16-bit base (method.py)
        if not config.init_ia3_weights:  # random around 1, so tests see the vectors' effect
            nn.init.normal_(l, mean=1.0, std=0.1)
        self.ia3_l[name], self.is_feedforward[name] = nn.Parameter(l), feedforward

    def forward(self, x):
        name = self.active_adapter
        if self.disabled or self.merged_adapters or name not in self.ia3_l:
            return self.base_layer(x)
        l = self.ia3_l[name].flatten()  # (in,) or (out,)
        if self.is_feedforward[name]:
            return self.base_layer((x * l).to(x.dtype))
        y = self.base_layer(x)
        return (y * l).to(y.dtype)

    def adapter_state(self, name):
        return {"ia3_l": self.ia3_l[name]}

    # ----- merging: l folded into the weight (and the bias, for output scaling) -----
    def base_weight(self):
        return self.base_layer.dequantize() if hasattr(self.base_layer, "dequantize") else self.base_layer.weight

    def merged_weight(self, name, w=None):
        w = self.base_weight() if w is None else w
        return w * self.ia3_l[name].to(w.dtype)  # (out, in) * (out, 1) scales rows, * (1, in) columns

    def merge(self, names=None, safe_merge=False):
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(f"cannot merge in place into a {type(self.base_layer).__name__}: use merge_and_unload()")
        for name in [n for n in (names or [self.active_adapter]) if n in self.ia3_l and n not in self.merged_adapters]:
            with torch.no_grad():
                merged = self.merged_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} gives NaN or inf weights: refused (safe_merge=True)")
                self.base_layer.weight.copy_(merged)
                if self.base_layer.bias is not None and not self.is_feedforward[name]:
                    self.base_layer.bias.mul_(self.ia3_l[name].flatten().to(self.base_layer.bias.dtype))
            self.merged_adapters.append(name)

    def unmerge(self):
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            l = self.ia3_l[name]
            if (l == 0).any():
                raise ValueError(f"cannot unmerge IA3 adapter {name!r}: some of its scales are 0")
            with torch.no_grad():
                self.base_layer.weight.div_(l.to(self.base_layer.weight.dtype))
                if self.base_layer.bias is not None and not self.is_feedforward[name]:
                    self.base_layer.bias.div_(l.flatten().to(self.base_layer.bias.dtype))

    def merged_linear(self, names=None, safe_merge=False, name=""):
        with torch.no_grad():
            w, bias = self.base_weight(), getattr(self.base_layer, "bias", None)
            for n in [n for n in (names or [self.active_adapter]) if n in self.ia3_l]:
                w = self.merged_weight(n, w)
                if bias is not None and not self.is_feedforward[n]:
                    bias = bias * self.ia3_l[n].flatten().to(bias.dtype)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"merging {names} into {name or 'a layer'} gives NaN or inf weights: refused")
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin
