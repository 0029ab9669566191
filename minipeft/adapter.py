"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) in one file.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": freeze the transformer and insert, after a
sub-layer and before its residual add, a small bottleneck MLP with a skip connection:

    a(h) = h + W_up act(W_down h + b_down) + b_up        h: (B, T, D)   W_down: (b, D)   W_up: (D, b)

with b = bottleneck_size << D. W_up and b_up start at zero, so a(h) = h and the adapted model starts exactly
as the base model; W_down starts as nn.Linear's own init (kaiming-uniform), so that W_up gets a non-zero
gradient at the first step. Trainable parameters per adapter, with both biases: 2 * D * b + b + D.

Placement:
    "houlsby"   two adapters per layer: one on the attention sub-layer's output, one on the MLP's
    "pfeiffer"  one adapter per layer, on the MLP's output (Pfeiffer et al. 2021, "AdapterFusion", found this
                one adapter nearly as good as two at half the parameters; their adapter reads the output after
                the residual add and LayerNorm, ours reads the MLP's output before the residual add, like
                Houlsby's: the same position as Houlsby's second adapter)

Why no change to model.py is needed: in model.py a decoder block computes

    x = x + self_attn.o_proj(y)                          the attention sub-layer's output is o_proj's output
    x = x + mlp.down_proj(silu(gate_proj(x)) * up_proj(x))   the MLP's output is down_proj's output

so "the sub-layer's output before the residual add" is exactly the output of `o_proj` / `down_proj`. An
AdapterLayer wraps those Linear layers (composition, like LoRA's base_layer) and returns a(base_layer(x)).

Saved like a PEFT adapter (PEFT has no bottleneck adapters, so `peft_type` is minipeft's "BOTTLENECK"): keys are
the module path prefixed by `base_model.model.`, the adapter name stripped:
    base_model.model.model.layers.0.mlp.down_proj.adapter_down.weight   (b, D)
    base_model.model.model.layers.0.mlp.down_proj.adapter_down.bias     (b,)
    base_model.model.model.layers.0.mlp.down_proj.adapter_up.weight     (D, b)
    base_model.model.model.layers.0.mlp.down_proj.adapter_up.bias       (D,)
Adapters cannot be merged into the weights: a(h) is non-linear in h, so it is extra computation the base model
does not have (merge_and_unload() says so). Not done: adapter dropout, and the adapter's own LayerNorm that some
variants add.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from .method import PeftConfig, TunerLayer

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = {  # placement -> the modules (suffixes of qualified names) whose output gets an adapter
    "houlsby": ("self_attn.o_proj", "mlp.down_proj"),
    "pfeiffer": ("mlp.down_proj",),
}


@dataclass
class AdapterConfig(PeftConfig):
    bottleneck_size: int = 64
    placement: str = "houlsby"  # "houlsby": after attention and after the MLP; "pfeiffer": after the MLP only
    activation: str = "relu"
    init_weights: bool = True  # True: W_up = 0, b_up = 0 (starts as the base model); False: random W_up (tests)
    peft_type: ClassVar[str] = "BOTTLENECK"

    def __post_init__(self):
        super().__post_init__()  # the JSON types of every field
        if self.bottleneck_size <= 0:
            raise ValueError(f"AdapterConfig.bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def attach(self, model, adapter_name="default", tokenizer=None):
        """Wrap every o_proj / down_proj that the placement names (or add an adapter to an existing wrapper)."""
        AdapterLayer.wrap(model, adapter_targets(model, self.placement), self, adapter_name)


class AdapterLayer(TunerLayer):
    """a(base_layer(x)) = h + adapter_up(act(adapter_down(h))), h = base_layer(x), for the active adapter."""

    adapter_layer_names = ("adapter_down", "adapter_up", "adapter_act")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def update_layer(self, name, config: AdapterConfig):
        kw = self.adapter_kwargs()  # float32 adapters on a 16-bit base (method.py)
        D, b = self.out_features, config.bottleneck_size
        self.adapter_down[name] = nn.Linear(D, b, **kw)  # kaiming-uniform(a=sqrt(5)) weight, uniform bias
        self.adapter_up[name] = nn.Linear(b, D, **kw)
        self.adapter_act[name] = ACTIVATIONS[config.activation]()
        if config.init_weights:  # W_up = 0 and b_up = 0: the adapter adds exactly nothing at the start
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)
        else:  # a non-zero adapter, so tests see its effect
            nn.init.normal_(self.adapter_up[name].weight, std=0.02)
            nn.init.normal_(self.adapter_up[name].bias, std=0.02)

    def forward(self, x):
        h = self.base_layer(x)  # the sub-layer's output (B, T, D), before the residual add
        name = self.active_adapter
        if self.disabled or name not in self.adapter_down:
            return h
        down, up, act = self.adapter_down[name], self.adapter_up[name], self.adapter_act[name]
        z = act(down(h.to(down.weight.dtype)))  # (B, T, b)
        return h + up(z).to(h.dtype)  # (B, T, D)

    # ----- the small protocol peft.py uses -----
    def adapter_state(self, name):
        """PEFT-style file keys (relative to this module) -> this adapter's parameters."""
        return {
            "adapter_down.weight": self.adapter_down[name].weight,
            "adapter_down.bias": self.adapter_down[name].bias,
            "adapter_up.weight": self.adapter_up[name].weight,
            "adapter_up.bias": self.adapter_up[name].bias,
        }


def adapter_targets(model, placement):
    """(qualified name, module) for every module whose output the placement adapts, in model order."""
    suffixes = PLACEMENTS[placement]
    hits = [(n, m) for n, m in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not hits:
        raise ValueError(
            f"placement {placement!r} adapts modules named {list(suffixes)}, but {type(model).__name__} has none"
        )
    return hits
