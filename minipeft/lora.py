"""LoRA, rsLoRA and DoRA in one file.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): freeze W (out, in) and learn a
low-rank update
    h = W x + s * B A x,        A: (r, in), B: (out, r), s = lora_alpha / r
A starts kaiming-uniform (a = sqrt(5), nn.Linear's own init, as in PEFT), B starts at zero, so the adapted
model starts exactly as the base model and only B gets a non-zero gradient at the first step.

rsLoRA (Kalajdzievski 2023): s = lora_alpha / sqrt(r). With alpha/r the update's scale shrinks as r grows, so
large ranks learn no faster than small ones; 1/sqrt(r) keeps the learning dynamics rank-stable.

DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): split the merged weight into a magnitude per
output row and a direction,
    W' = m * (W + s B A) / ||W + s B A||_row,     m: (out,), initialised to ||W||_row
and, as the paper suggests (section 4.3), treat the norm as a constant in backward (it is detached).
In forward this is computed without forming W':   h = W x + (m/n - 1) * W x + (m/n) * s * B A x,  n = ||W + sBA||.

The layer wraps the layer it adapts (`base_layer`: nn.Linear, or NF4Linear for QLoRA) and keeps its adapters in
small dicts keyed by adapter name ("default" unless you name them), as PEFT does, so several adapters can live
on one base. Saved keys follow PEFT: `<module>.lora_A.weight`, `<module>.lora_B.weight`,
`<module>.lora_magnitude_vector` (the adapter name is stripped in the file). Starts other than B = 0 (PiSSA, OLoRA,
LoftQ) are in lora_init.py.
"""

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora_init
from .loftq import LoftQConfig, check_loftq_config
from .loss import HALF
from .method import PeftConfig, TunerLayer, find_targets

# PEFT's defaults for target_modules=None, by config.json's model_type (all three: the attention's q and v)
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj")}


@dataclass
class LoraConfig(PeftConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # names/suffixes, a full-match regex, "all-linear", or None: PEFT's default for the model type (q_proj, v_proj)
    target_modules: tuple | list | str | None = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False
    # True: PEFT's init (B = 0); "gaussian": A ~ N(0, 1/r); False: A, B random; "pissa", "pissa_niter_K", "olora":
    # A and B from the weight itself, the base weight rewritten so that the model starts unchanged; "loftq" (with
    # loftq_config): the base quantized to NF4 and B A cancelling part of its error (both: lora_init.py)
    init_lora_weights: bool | str = True
    loftq_config: dict = field(default_factory=dict)  # PEFT's: {"loftq_bits": 4, "loftq_iter": T}, or a LoftQConfig
    bias: str = "none"
    modules_to_save: list | None = None
    fan_in_fan_out: bool = False  # PEFT's flag for Conv1D-style (in, out) weights; our Linears are (out, in)
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self):
        if isinstance(self.loftq_config, LoftQConfig):  # stored as a dict, as PEFT does
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        super().__post_init__()  # the JSON types of every field
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        init = self.init_lora_weights
        if init not in (True, False, "gaussian", "pissa", "olora", "loftq") and not re.fullmatch(
            r"pissa_niter_\d+", str(init)
        ):
            raise ValueError(
                "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K an integer), "
                f"'olora' or 'loftq', got {init!r}"
            )
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4, "
                    f"loftq_iter=1), got {self.loftq_config!r}"
                )
            check_loftq_config(self.loftq_config)
        elif self.loftq_config:  # as PEFT: kept out of the adapter, with a warning
            warnings.warn(f"loftq_config is ignored unless init_lora_weights='loftq' (it is {init!r})", stacklevel=3)
            self.loftq_config = {}
        if self.bias != "none":
            raise ValueError(f"only bias='none' is supported (biases stay frozen), got {self.bias!r}")
        if self.modules_to_save:
            raise ValueError(f"modules_to_save is not supported, got {self.modules_to_save!r}")
        if self.fan_in_fan_out:
            raise ValueError("fan_in_fan_out=True is for GPT-2's Conv1D layers; Llama-family Linears need False")
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.target_modules, tuple) and not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoraConfig.target_modules must hold module names, got {list(self.target_modules)}")

    @property
    def scaling(self):
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def for_shapes(self):
        """A copy that creates the same weights without touching the model (peft_io.py's dry run before a load)."""
        return dataclasses.replace(self, init_lora_weights=True, loftq_config={})

    def relative_to_initial(self, state, initial_config, initial_state):
        """PiSSA/OLoRA saved as a plain LoRA on the original weight (lora_init.relative_to_initial)."""
        return lora_init.relative_to_initial(self, state, initial_config, initial_state)

    @classmethod
    def combined(cls, configs, combination_type, svd_rank=None):
        """The config of add_weighted_adapter's result (see combine_adapters): its rank, and alpha = r (scaling 1)."""
        if combination_type not in ("cat", "linear", "svd"):
            raise ValueError(f"unknown combination_type {combination_type!r}; valid: 'cat', 'linear', 'svd'")
        if any(c.use_dora for c in configs):
            raise ValueError("add_weighted_adapter combines plain LoRA adapters only, not DoRA")
        ranks = [c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}")
        r = {"cat": sum(ranks), "svd": svd_rank or max(ranks), "linear": ranks[0]}[combination_type]
        return cls(r=r, lora_alpha=r, target_modules=configs[0].target_modules,
                   base_model_name_or_path=configs[0].base_model_name_or_path)  # fmt: skip

    def attach(self, model, adapter_name="default", tokenizer=None):
        """Wrap every target Linear in a LoraLayer (or add this adapter to an existing one)."""
        if self.target_modules is None:  # resolved once, and saved resolved, as PEFT does
            self.target_modules = DEFAULT_TARGETS.get(
                model.config.extra.get("model_type", "llama"), ("q_proj", "v_proj")
            )
        LoraLayer.wrap(model, find_targets(model, self.target_modules), self, adapter_name)


class LoraLayer(TunerLayer):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))) for the active adapter (plus DoRA's rescaling)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "scaling")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA only
        self.scaling = {}
        self.merged_adapters = []
        self.dora_norm = {}  # DoRA: ||W + sBA|| at merge time, for an exact unmerge
        self.adapter_names = None  # per-row adapter names for a mixed batch, set by PeftModel.forward

    def base_weight(self):  # dense (out, in) weight, also for a 4-bit base
        return self.base_layer.dequantize() if hasattr(self.base_layer, "dequantize") else self.base_layer.weight

    def update_layer(self, name, config: LoraConfig):
        kw = dict(bias=False, **self.adapter_kwargs())  # float32 adapters on a 16-bit base (method.py)
        self.lora_A[name] = nn.Linear(self.in_features, config.r, **kw)  # kaiming-uniform(a=sqrt(5)) by default
        self.lora_B[name] = nn.Linear(config.r, self.out_features, **kw)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
        if config.init_lora_weights is not False:  # False keeps nn.Linear's random init for B too, as PEFT
            nn.init.zeros_(self.lora_B[name].weight)
        if str(config.init_lora_weights).startswith(("pissa", "olora")):
            lora_init.start_from_weight(self, name, config.init_lora_weights)
        if config.init_lora_weights == "loftq":
            lora_init.start_from_loftq(self, name, config)
        if config.use_dora:
            with torch.no_grad():
                m = self.weight_norm(name).to(kw["dtype"])
            self.lora_magnitude_vector[name] = nn.Parameter(m)

    def delta_weight(self, name):  # s * B @ A: (out, in)
        return self.scaling[name] * self.lora_B[name].weight @ self.lora_A[name].weight

    def weight_norm(self, name):  # ||W + s B A|| per output row: (out,)
        w = self.base_weight()
        return torch.linalg.vector_norm(w + self.delta_weight(name).to(w.dtype), dim=1)

    def lora_forward(self, x, result, name):
        A, B, drop, s = self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
        if not torch.is_autocast_enabled(x.device.type):  # (under autocast the matmuls pick their dtype: no copy)
            x = x.to(A.weight.dtype)  # float32 adapters on a 16-bit base
        if name not in self.lora_magnitude_vector:  # one kernel scales, casts and adds: result += s * B A x
            return result.add_(B(A(drop(x))), alpha=s)
        # DoRA: (m/n - 1) * W x + (m/n) * s * B A x, with n detached (section 4.3 of the paper)
        w = self.base_weight().to(x.dtype)
        n = torch.linalg.vector_norm(w + (s * B.weight @ A.weight).detach(), dim=1).detach()
        scale = (self.lora_magnitude_vector[name] / n).to(x.dtype)  # (out,)
        if isinstance(drop, nn.Identity) or not self.training:
            base = result - self.base_layer.bias if self.base_layer.bias is not None else result
        else:  # with dropout PEFT applies W to the dropped-out input (an approximation it documents)
            x = drop(x)
            base = F.linear(x, w)
        return result + ((scale - 1) * base + scale * s * B(A(x))).to(result.dtype)

    def forward(self, x):
        result = self.base_layer(x)
        if self.disabled or self.merged_adapters:
            return result
        if self.adapter_names is None:
            return self.lora_forward(x, result, self.active_adapter) if self.active_adapter in self.lora_A else result
        # A mixed batch: each row uses its own adapter ("__base__", or one not on this layer: none); rows are
        # gathered per adapter.
        out = result.clone()
        for name in set(self.adapter_names) & set(self.lora_A):
            rows = torch.tensor([i for i, n in enumerate(self.adapter_names) if n == name], device=x.device)
            out[rows] = self.lora_forward(x[rows], result[rows], name)
        return out

    def check_mixed_batch(self, names):
        """A mixed batch needs unmerged adapters, and not DoRA among the adapters it uses (as in PEFT)."""
        if self.merged_adapters:
            raise ValueError("mixed batches need unmerged adapters: call unmerge_adapter() first")
        if dora := sorted(set(names) & set(self.lora_magnitude_vector)):
            raise ValueError(f"mixed batches do not work with DoRA adapters ({dora}), as in PEFT")

    # ----- merging -----
    def merged_weight(self, name, w=None):
        """The dense weight this adapter turns w (default: the base weight) into: w + sBA, or
        m * (w + sBA) / ||w + sBA|| for DoRA. In w's dtype (a float32 magnitude must not promote a bf16 base)."""
        w = self.base_weight() if w is None else w
        merged = w + self.delta_weight(name).to(w.dtype)
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.vector_norm(merged.float() if merged.dtype in HALF else merged, dim=1)
            scale = self.lora_magnitude_vector[name] / norm
            merged = merged * scale.to(w.dtype)[:, None]
        return merged

    def merge(self, names=None, safe_merge=False):
        """Fold adapters (default: the active one) into base_layer.weight, one after the other (nn.Linear bases
        only). safe_merge=True refuses a merge that would put NaN or inf into the weights."""
        names = [n for n in (names or [self.active_adapter]) if n in self.lora_A and n not in self.merged_adapters]
        if names and not isinstance(self.base_layer, nn.Linear):
            raise TypeError(
                f"cannot merge in place into a {type(self.base_layer).__name__} base; use merge_and_unload(), "
                "which dequantizes and returns a full-precision model"
            )
        for name in names:
            with torch.no_grad():
                merged = self.merged_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {name!r} gives NaN or inf weights: refused (safe_merge=True)")
                if name in self.lora_magnitude_vector:  # keep n = ||W + sBA|| so that unmerge can undo m / n exactly
                    self.dora_norm[name] = self.weight_norm(name)
                self.base_layer.weight.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self):
        """Undo every merge, the last one first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                w = self.base_layer.weight
                if name in self.lora_magnitude_vector:  # W' = m/n * (W + sBA)  =>  W = W' * n/m - sBA
                    w.mul_((self.dora_norm.pop(name) / self.lora_magnitude_vector[name]).to(w.dtype)[:, None])
                w.sub_(self.delta_weight(name).to(w.dtype))

    def merged_linear(self, names=None, safe_merge=False, name=""):
        """A plain nn.Linear holding the base weight with adapters `names` (default: the active one) merged one after
        the other (for merge_and_unload); safe_merge=True refuses NaN or inf weights."""
        with torch.no_grad():
            w = self.base_weight()
            for n in names or [self.active_adapter]:
                if n in self.lora_A:
                    w = self.merged_weight(n, w)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"merging {names} into {name or 'a layer'} gives NaN or inf weights: refused")
        bias = getattr(self.base_layer, "bias", None)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def combine(self, adapters, weights, name, combination_type, config):  # for PeftModel.add_weighted_adapter
        return combine_adapters(self, adapters, weights, name, combination_type, config)

    # ----- the small protocol peft.py uses -----
    def adapter_state(self, name):
        """PEFT's file keys (relative to this module) -> this adapter's parameters."""
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state


def combine_adapters(layer, adapters, weights, name, combination_type, config):
    """Fill adapter `name` of `layer` with a weighted combination of `adapters` (as PEFT's add_weighted_adapter).

    "cat":    A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]: exactly sum_i w_i s_i B_i A_i, rank sum r_i.
    "linear": A = sum_i sqrt(|w_i s_i|) sign(w_i s_i) A_i, B = sum_i sqrt(|w_i s_i|) B_i (same ranks); NOT the
              weighted sum of the deltas (the product has cross terms B_i A_j): PEFT's definition, kept for parity.
    "svd":    the exact weighted sum of deltas, truncated to rank config.r by SVD: B = U_r S_r, A = V_r^T.
    The new adapter has lora_alpha = r, so its scaling is 1. Returns the squared Frobenius truncation error
    (the sum of the discarded squared singular values) for "svd", else 0.
    """
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    layer.update_layer(name, config)
    A_new, B_new = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        if combination_type == "cat":
            A = torch.cat([layer.lora_A[a].weight for a, _ in present], dim=0)
            B = torch.cat([w * layer.scaling[a] * layer.lora_B[a].weight for a, w in present], dim=1)
            A_new.zero_(), B_new.zero_()
            A_new[: A.size(0)], B_new[:, : B.size(1)] = A, B
            return 0.0
        if combination_type == "linear":
            A_new.zero_(), B_new.zero_()
            for a, w in present:
                c = w * layer.scaling[a]
                A_new.add_(math.copysign(math.sqrt(abs(c)), c) * layer.lora_A[a].weight)
                B_new.add_(math.sqrt(abs(c)) * layer.lora_B[a].weight)
            return 0.0
        delta = sum(w * layer.delta_weight(a) for a, w in present)  # (out, in)
        U, S, Vh = torch.linalg.svd(delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta,
                                    full_matrices=False)  # fmt: skip
        r = config.r
        B_new.copy_(U[:, :r] * S[:r])
        A_new.copy_(Vh[:r])
        return float((S[r:] ** 2).sum())
