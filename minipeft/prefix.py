"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation") in one file.

Freeze the model and learn, for every layer, P key vectors and P value vectors that every real token attends to
as if they were the keys/values of P earlier tokens: a learned key/value cache of length P.

    layer i:  K_i = [prefix_k_i ; W_k x]      V_i = [prefix_v_i ; W_v x]      prefix_k_i, prefix_v_i: (K, P, hd)

Shapes: P num_virtual_tokens, L layers, K num_key_value_heads (GQA: the prefix has as many heads as the cache,
not as many as the queries), hd head_dim, token_dim = K * hd. The whole prefix is one table

    prefix: (P, L * 2 * token_dim), each row split as [2L, K, hd]: layer i's key at 2i, its value at 2i + 1

which is exactly Hugging Face PEFT's `prompt_embeddings` for a decoder-only model (num_transformer_submodules=1).

Semantics (as HF PEFT's PeftModelForCausalLM with a Llama):
- the prefix is handed to the model as `past_key_values`, so the real tokens take positions P, P+1, ... (our
  model counts positions from the cache length, or from the mask's cumsum, which counts the P ones we prepend);
- the prefix keys are used as stored, no rotary embedding is applied to them (a cache holds rotated keys; the
  prefix was never rotated: it is learned directly in the space the cache lives in);
- an attention mask, when given, is extended by P ones at the front, on every call: the cache always holds
  the P prefix positions. Position ids, when given, are shifted by P (as PEFT does);
- logits and labels are for the real tokens only: (B, T, V); nothing is prepended to the sequence.
With generate and the KV cache the first call (past_key_values=None) gets the prefix as its cache; the cache it
returns holds P + T positions, so later calls already carry the prefix and only the mask is extended. A
past_key_values passed in by the caller is taken to be such a cache (it must start with the prefix).

Reparameterisation (prefix_projection=True, the paper's section 4.3, as PEFT's PrefixEncoder): optimising the
table directly is unstable, so it is produced by an MLP from a smaller embedding:
    prefix = Linear(E, L*2*token_dim)(tanh(Linear(token_dim, E)(embedding)))     embedding: (P, token_dim)
with E = encoder_hidden_size (default token_dim). After training only the table matters. PEFT saves only the
table, so its files cannot resume training of the MLP; minipeft also writes the MLP (`embedding.weight`,
`transform.0.weight`, ... the same names as PEFT's module) to `adapter_raw.safetensors`. Loading a file with
prefix_projection=True but no raw file (one made by PEFT) keeps the table as a fixed prefix (with a warning):
training then continues on the table itself, without the MLP.

Not done: encoder-decoder models (num_transformer_submodules=2), and the "zero" init of PEFT's init_weights.
"""

import os
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .method import PeftConfig, PromptLearning, check_shapes, fill_from_model, trainable_dtype

RAW_NAME = "adapter_raw.safetensors"  # minipeft's second file (peft_io.py writes and reads it)


def check_positive_int(owner, name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclass
class PrefixTuningConfig(PeftConfig):
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the MLP's hidden size; None: token_dim (as PEFT)
    # Filled from the model by build(), because PEFT reads them from adapter_config.json:
    token_dim: int | None = None  # num_key_value_heads * head_dim (PEFT's GQA-aware value for prefix tuning)
    num_attention_heads: int | None = None  # PEFT stores num_key_value_heads here for prefix tuning
    num_layers: int | None = None
    num_transformer_submodules: int = 1  # 1: decoder-only (2 would be encoder-decoder, not supported)
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    def __post_init__(self):
        super().__post_init__()  # the JSON types of every field
        check_positive_int("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        for name in ("encoder_hidden_size", "token_dim", "num_attention_heads", "num_layers"):
            check_positive_int("PrefixTuningConfig", name, getattr(self, name), allow_none=True)
        if self.num_transformer_submodules != 1:
            raise ValueError(
                f"PrefixTuningConfig.num_transformer_submodules must be 1 (decoder-only models), "
                f"got {self.num_transformer_submodules!r}"
            )

    def attach(self, model, adapter_name="default", tokenizer=None):
        return self.build(model, tokenizer)

    def build(self, model, tokenizer=None):
        """Fill token_dim, num_attention_heads, num_layers from the model (checking them when already set) and
        return the PrefixEncoder that PeftModel keeps in prompt_encoder[name]."""
        cfg = model.config
        actual = dict(token_dim=cfg.num_key_value_heads * cfg.head_dim, num_attention_heads=cfg.num_key_value_heads,
                      num_layers=cfg.num_hidden_layers)  # fmt: skip
        fill_from_model(self, actual, cfg.max_position_embeddings)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        return PrefixEncoder(self, model.device, trainable_dtype(model.dtype))  # float32 on a 16-bit model


class PrefixEncoder(PromptLearning):
    """Holds the prefix (a table, or embedding + MLP) and runs the model with it as the first P cache positions."""

    kind = "prefix"

    def __init__(self, config: PrefixTuningConfig, device=None, dtype=None):
        super().__init__(config.num_virtual_tokens)
        self.num_layers = config.num_layers
        self.num_kv_heads, self.head_dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
        self.token_dim, self.encoder_hidden_size = config.token_dim, config.encoder_hidden_size
        self.loaded_table = None  # the table of the last load_peft_state, to check a raw file against
        if config.prefix_projection:
            self.build_mlp(device, dtype)
        else:  # the table itself is the parameter, N(0, 1) like nn.Embedding (and PEFT)
            L2td = self.num_layers * 2 * self.token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, L2td, device=device, dtype=dtype)
            self.transform, self.prefix_projection = None, False

    def build_mlp(self, device, dtype):
        P, td, E = self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(P, td, **kw)  # (P, token_dim), N(0, 1)
        self.transform = nn.Sequential(  # token_dim -> E -> L * 2 * token_dim, nn.Linear's own init (as PEFT)
            nn.Linear(td, E, **kw), nn.Tanh(), nn.Linear(E, self.num_layers * 2 * td, **kw)
        )
        self.prefix_projection = True  # False after use_table(): a fixed table from a PEFT file

    def prefix(self):
        """The table: (P, L * 2 * token_dim), rows laid out [2L, K, hd]."""
        w = self.embedding.weight
        return self.transform(w) if self.prefix_projection else w

    def past_key_values(self, batch_size, dtype):
        """The prefix as a KV cache: a list over layers of (k, v), each (B, K, P, hd)."""
        P, L, K, hd = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        kv = self.prefix().to(dtype).view(P, 2 * L, K, hd).permute(1, 2, 0, 3)  # (2L, K, P, hd)
        kv = kv[:, None].expand(2 * L, batch_size, K, P, hd)  # the same prefix for every row
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]

    # The model's own keyword signature, written out again on purpose (in prefix.py and prompt.py alike): each
    # method shows exactly which inputs it changes on their way to the model.
    def forward_model(
        self,
        model,
        *,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        labels=None,
        return_logits=True,
    ):
        x = input_ids if input_ids is not None else inputs_embeds
        B, T, P, attention_mask, position_ids = self.prologue(model, x, attention_mask, position_ids, past_key_values)
        if not past_key_values:  # the first call: the prefix is the cache (real tokens at positions P, P+1, ...)
            past_key_values = self.past_key_values(B, model.dtype)
        return model(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            labels=labels,
            return_logits=return_logits,
        )

    # ----- saving and loading (the protocol of peft.py) -----
    def peft_state(self):
        """PEFT's inference form: {"prompt_embeddings": (P, L * 2 * token_dim)}."""
        return {"prompt_embeddings": self.prefix()}

    def raw_state(self):
        """The trainable parameters by name (the MLP when prefix_projection), so training can resume."""
        return dict(self.named_parameters())

    def load_peft_state(self, state, source="adapter"):
        shape = (self.num_virtual_tokens, self.num_layers * 2 * self.token_dim)
        check_shapes({"prompt_embeddings": shape}, state, source)
        table = state["prompt_embeddings"]
        self.loaded_table = table
        if self.prefix_projection:  # the file has only the projected table: keep it as a fixed table
            if not os.path.isfile(os.path.join(str(source), RAW_NAME)):  # (else load_raw_state brings the MLP back)
                warnings.warn(
                    f"{source}: prefix_projection=True but the adapter holds only the projected prefix (PEFT's "
                    "inference form), not the MLP: it is used as a fixed table, and training would continue on the "
                    "table itself, not on the MLP",
                    stacklevel=3,
                )
            self.use_table(table)
        else:
            with torch.no_grad():
                self.embedding.weight.copy_(table.to(self.embedding.weight.dtype))

    def use_table(self, table):
        w = self.embedding.weight
        self.embedding = nn.Embedding.from_pretrained(table.to(w), freeze=not w.requires_grad)
        self.transform, self.prefix_projection = None, False

    def load_raw_state(self, state, source="adapter_raw.safetensors"):
        """Load our second file: the MLP (or the table), checked to give the prompt_embeddings loaded before."""
        w = self.embedding.weight
        if "transform.0.weight" in state and not self.prefix_projection:
            self.build_mlp(w.device, w.dtype)
        P, td, E = self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size
        L2td = self.num_layers * 2 * td
        if self.prefix_projection:
            shapes = {
                "embedding.weight": (P, td),
                "transform.0.weight": (E, td),
                "transform.0.bias": (E,),
                "transform.2.weight": (L2td, E),
                "transform.2.bias": (L2td,),
            }
        else:
            shapes = {"embedding.weight": (P, L2td)}
        check_shapes(shapes, state, source)
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(state[k].to(p.dtype))
                p.requires_grad_(w.requires_grad)
            if self.loaded_table is not None:
                ref = self.loaded_table.to(w)
                err = ((self.prefix() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
                if err > 1e-3:
                    raise ValueError(
                        f"{source}: the raw parameters give a prefix that differs from prompt_embeddings by {err:.2g} "
                        "(relative): the two files do not belong together"
                    )
