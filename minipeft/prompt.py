"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning") in one file.

Freeze the model and learn P "virtual token" embeddings, a soft prompt, prepended to the input embeddings:

    inputs_embeds = [prompt ; embed(input_ids)]       prompt: (P, D), the same for every row    (B, P + T, D)

Shapes: P num_virtual_tokens, D hidden_size, B batch, T real tokens, V vocab. Trainable parameters: P * D.

Semantics (as HF PEFT's PeftModelForCausalLM):
- the virtual tokens take positions 0 .. P-1 and the real tokens follow at P, P+1, ...; an attention mask,
  when given, is extended by P ones at the front; position ids, when given, are shifted by P (PEFT ignores
  them with a warning instead);
- labels are padded with P times -100 at the front, so the loss is over the real tokens only, and the last
  virtual token predicts the first real token (PEFT's loss, exactly);
- `PeftModel.forward` returns logits for the real tokens only, (B, T, V), like every other method here.
  HF PEFT returns (B, P + T, V), the virtual positions included: compare ours with PEFT's logits[:, P:].
With generate and the KV cache only the first call (past_key_values=None) prepends the prompt; its cache then
holds P + T positions, so later calls pass just the new token, with the mask extended by P ones.

Initialisation (prompt_tuning_init), as PEFT:
    "RANDOM"        N(0, 1), nn.Embedding's own init
    "SAMPLE_VOCAB"  the embeddings of P token ids drawn uniformly from the vocabulary
    "TEXT"          the embeddings of prompt_tuning_init_text's token ids, repeated or truncated to P. The text
                    goes through the tokenizer given to get_peft_model(model, config, tokenizer=tok): any object
                    with .encode(text) -> list[int]
The paper found vocabulary/text init clearly better than random for small models.

Saved as PEFT saves it: `prompt_embeddings` (P, D) in adapter_model.safetensors, with PEFT's config fields
(token_dim = hidden_size, num_attention_heads, num_layers, num_transformer_submodules=1, ...). HF PEFT refuses
a config with prompt_tuning_init "TEXT" and no tokenizer_name_or_path; set that field (or give a tokenizer with
a `name_or_path`), else the file records the init as "RANDOM" (the init only matters before training).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .method import PeftConfig, PromptLearning, check_shapes, fill_from_model, trainable_dtype

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PeftConfig):
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"  # "RANDOM" | "SAMPLE_VOCAB" | "TEXT"
    prompt_tuning_init_text: str | None = None  # for "TEXT"
    tokenizer_name_or_path: str | None = None  # only recorded, for HF PEFT (it needs one with "TEXT")
    # Filled from the model by build(), because PEFT reads them from adapter_config.json:
    token_dim: int | None = None  # hidden_size
    num_attention_heads: int | None = None
    num_layers: int | None = None
    num_transformer_submodules: int = 1  # 1: decoder-only (2 would be encoder-decoder, not supported)
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()  # the JSON types of every field
        P = self.num_virtual_tokens
        if P <= 0:
            raise ValueError(f"PromptTuningConfig.num_virtual_tokens must be a positive integer, got {P!r}")
        if self.prompt_tuning_init not in INITS:
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init must be one of {list(INITS)}, got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text or "").strip():
            raise ValueError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose token embeddings start the "
                f"prompt), got {self.prompt_tuning_init_text!r}"
            )
        if self.num_transformer_submodules != 1:
            raise ValueError(
                f"PromptTuningConfig.num_transformer_submodules must be 1 (decoder-only models), "
                f"got {self.num_transformer_submodules!r}"
            )

    def to_dict(self):
        d = super().to_dict()
        if d["prompt_tuning_init"] == "TEXT" and not d["tokenizer_name_or_path"]:
            d["prompt_tuning_init"] = "RANDOM"  # HF PEFT refuses TEXT without a tokenizer name (see the docstring)
        return d

    def attach(self, model, adapter_name="default", tokenizer=None):
        return self.build(model, tokenizer)

    def build(self, model, tokenizer=None):
        """Check the init against the model and tokenizer, fill token_dim etc., and return the PromptEncoder."""
        cfg = model.config
        actual = dict(token_dim=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                      num_layers=cfg.num_hidden_layers)  # fmt: skip
        fill_from_model(self, actual, cfg.max_position_embeddings)
        init_ids = None
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode:
            if tokenizer is None or not hasattr(tokenizer, "encode"):
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs the model's tokenizer: get_peft_model(model, config, "
                    f"tokenizer=tok), with tok.encode(text) -> list[int]; got tokenizer={tokenizer!r}"
                )
            if self.tokenizer_name_or_path is None:
                self.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None)
            ids = list(tokenizer.encode(self.prompt_tuning_init_text))
            if not ids:
                raise ValueError(f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} encodes to no tokens")
            if any(not 0 <= i < cfg.vocab_size for i in ids):
                raise ValueError(f"the tokenizer gave ids outside the model's vocabulary of {cfg.vocab_size}: {ids}")
            P = self.num_virtual_tokens
            init_ids = (ids * math.ceil(P / len(ids)))[:P]  # repeat, then truncate to P (as PEFT)
        elif self.prompt_tuning_init == "SAMPLE_VOCAB" and not self.inference_mode:
            init_ids = torch.randint(0, cfg.vocab_size, (self.num_virtual_tokens,)).tolist()
        # float32 on a 16-bit model (method.trainable_dtype); cast when used
        encoder = PromptEncoder(self.num_virtual_tokens, cfg.hidden_size, model.device, trainable_dtype(model.dtype))
        if init_ids is not None:
            with torch.no_grad():
                embed = model.model.embed_tokens.weight
                encoder.embedding.weight.copy_(embed[torch.tensor(init_ids, device=embed.device)])
        return encoder


class PromptEncoder(PromptLearning):
    """Holds the soft prompt and runs the model with it prepended to the input embeddings."""

    kind = "prompt"

    def __init__(self, num_virtual_tokens, hidden_size, device=None, dtype=None):
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, device=device, dtype=dtype)  # (P, D)

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
        if past_key_values:  # a later generate step: the prompt is already in the cache
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
        if inputs_embeds is None:
            inputs_embeds = model.model.embed_tokens(input_ids)  # (B, T, D)
        prompt = self.embedding.weight.to(inputs_embeds.dtype)[None].expand(B, P, -1)  # (B, P, D)
        inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)  # (B, P + T, D)
        if labels is not None:  # nothing to predict at the virtual positions but the first real token
            labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
        if position_ids is not None:  # virtual tokens at 0 .. P-1, real ones after (already shifted by P)
            virtual = torch.arange(P, device=position_ids.device).expand(B, P)
            position_ids = torch.cat([virtual, position_ids], dim=1)
        out = model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=use_cache,
            labels=labels,
            return_logits=return_logits,
        )
        if out.logits is not None:
            out.logits = out.logits[:, P:]  # (B, T, V): the real tokens only (HF PEFT keeps all P + T)
        return out

    def num_targets(self, labels):
        """The tokens the loss is a mean over: every label but -100, the first one included, because the last
        virtual token predicts the first real token (PEFT's loss: labels padded with P times -100 in front)."""
        return int((labels != -100).sum())

    # ----- saving and loading (the protocol of peft.py) -----
    def peft_state(self):
        """PEFT's form: {"prompt_embeddings": (P, D)}."""
        return {"prompt_embeddings": self.embedding.weight}

    def raw_state(self):
        """The trainable parameters by name (here the prompt again: it is its own inference form)."""
        return dict(self.named_parameters())

    def load_peft_state(self, state, source="adapter"):
        self.load_checked(state, {"prompt_embeddings": self.embedding.weight}, source)

    def load_raw_state(self, state, source="adapter_raw.safetensors"):
        self.load_checked(state, dict(self.named_parameters()), source)

    @staticmethod
    def load_checked(state, params, source):
        check_shapes({k: p.shape for k, p in params.items()}, state, source)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.dtype))
