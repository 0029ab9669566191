"""The reference transformer: the Llama family in one file.

    x -> embed -> [ h = x + Attn(RMSNorm(x)) ; x = h + MLP(RMSNorm(h)) ] * L -> RMSNorm -> lm_head -> logits

Pieces, in reading order:
- RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias.
- Rotary position embeddings (Su et al. 2021): each pair of channels of q and k is rotated by an angle
  position * theta_i, so q.k depends only on the distance between positions. HF's "rotate_half" layout
  (channel i pairs with i + head_dim/2), with optional Llama-3 frequency scaling.
- Grouped-query attention (Ainslie et al. 2023): n_heads query heads share n_kv_heads key/value heads,
  computed by torch's scaled_dot_product_attention. Optionally (Mistral) a sliding window: query q sees key k
  only if 0 <= q - k < sliding_window, so each query sees at most sliding_window positions, itself included.
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)).

Shapes: B batch, T new tokens, S = past + T keys, D hidden, H query heads, K kv heads, hd head dim, V vocab.

The state_dict keys are exactly Hugging Face LlamaForCausalLM's (model.layers.0.self_attn.q_proj.weight,
...), so HF checkpoints load without renaming and PEFT adapter keys map one to one. q, k and v stay
separate Linear layers on purpose: every method in minipeft adapts them independently.

Precision: everything runs in the parameters' dtype. Only bf16/fp16 are upcast to float32 where it matters
(norms, the loss); a float64 model stays float64 end to end, which the gradient checks rely on.

Beside this file: the loss in loss.py, the decoding loop in decoding.py. Speed levers (compiled or checkpointed
blocks, a chunked loss) are applied from the outside by fast.py; this file stays the plain math.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoding import generate
from .loss import HALF, causal_lm_loss

# rope_scaling types and the keys each needs (rope_inv_freq); every one must be a positive number
ROPE_KEYS = {"default": (), "linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}
POSITIVE_INTS = ("vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
                 "head_dim max_position_embeddings sliding_window").split()  # fmt: skip


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or {"rope_type": "linear", ...}
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # Mistral: a query sees only the last sliding_window positions (its own too)
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v (and o unless attention_out_bias says otherwise)
    mlp_bias: bool = False
    attention_out_bias: bool | None = None  # Qwen2: biases on q, k, v but not on o_proj
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    extra: dict = field(default_factory=dict, repr=False)  # config.json keys we carry but do not use

    def __post_init__(self):
        """Every value is checked here, so that a bad config fails at once, before any tensor exists."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in POSITIVE_INTS:  # below 2**31: a sanity bound far above any real model; shapes fit in int64
            v = getattr(self, name)
            if name == "head_dim" and v is None:  # hidden_size and num_attention_heads are checked by now
                if self.hidden_size % self.num_attention_heads:
                    raise ValueError(
                        f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                        f"({self.num_attention_heads}): set head_dim"
                    )
                v = self.head_dim = self.hidden_size // self.num_attention_heads
            if not (_is_int(v) and 0 < v < 2**31 or name == "sliding_window" and v is None):
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even (rotary turns channels in pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not (_is_number(self.rms_norm_eps) and 0 <= self.rms_norm_eps < math.inf):
            raise ValueError(f"ModelConfig.rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        if not (_is_number(self.rope_theta) and 0 < self.rope_theta < math.inf):
            raise ValueError(f"ModelConfig.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if not isinstance(rs := self.rope_scaling or {}, dict):
            raise ValueError(f"ModelConfig.rope_scaling must be a dict or None, got {rs!r}")
        if (kind := rs.get("rope_type", rs.get("type", "default"))) not in tuple(ROPE_KEYS):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_KEYS)}")
        for key in ROPE_KEYS[kind] + tuple(k for k in ("low_freq_factor", "high_freq_factor") if k in rs):
            if not (_is_number(rs.get(key)) and 0 < rs[key] < math.inf):
                raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {rs.get(key)!r}")


def _is_int(x):  # a bool is an int to Python, never to a config
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        if dtype in HALF:  # the mean of squares overflows/underflows in 16 bits
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg):
    """theta_i = rope_theta^(-2i/hd) for i < hd/2, with Llama-3 or linear scaling of the long wavelengths."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":  # positions divided by factor
        return inv_freq / rs["factor"]
    if kind == "llama3":
        # Low frequencies (wavelength > old_ctx / low_freq_factor) are slowed down by `factor`, high
        # frequencies (wavelength < old_ctx / high_freq_factor) are kept, and the band between is blended.
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(mid, blended, out)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):  # x (B, heads, T, hd); cos, sin (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        out_bias = cfg.attention_bias if cfg.attention_out_bias is None else cfg.attention_out_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=out_bias)

    def forward(self, x, cos, sin, mask, past_kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:  # cached keys are stored already rotated; prefix-tuning keys are used as given
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)  # (B, K, S, hd)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
        # GQA: each kv head serves n_heads / n_kv_heads query heads. enable_gqa lets SDPA share them without
        # materialising repeated copies of k and v (what k.repeat_interleave(rep, dim=1) would do).
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)  # (registration order = HF's state_dict order)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv=None, use_cache=False):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv if use_cache else None  # (keys, values) if asked


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: list | None = None

    def __getitem__(self, i):  # as transformers' outputs: out[0] is the loss when there is one, else the logits
        return (
            getattr(self, i)
            if isinstance(i, str)
            else tuple(v for v in (self.loss, self.logits, self.past_key_values) if v is not None)[i]
        )


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, m):  # HF Llama's initializer_range = 0.02
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _apply(self, fn, recurse=True):  # keep inv_freq in float32 (or float64) when the model is cast to bf16
        super()._apply(fn, recurse)
        dt = torch.float64 if self.model.embed_tokens.weight.dtype == torch.float64 else torch.float32
        self.inv_freq = rope_inv_freq(self.config).to(device=self.model.embed_tokens.weight.device, dtype=dt)
        return self

    # Speed levers live in fast.py; these two names are kept for convenience (and transformers' API).
    def compile_blocks(self, **options):  # each Block through torch.compile while training: fast.compile_blocks
        from . import fast

        return fast.compile_blocks(self, **options)

    @property
    def gradient_checkpointing(self):  # recompute each block in backward: fast.checkpoint_blocks
        return any(layer.__dict__.get("_fast", {}).get("checkpoint") for layer in self.model.layers)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled):
        from . import fast

        fast.checkpoint_blocks(self, enabled)

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def rotary(self, position_ids, dtype):  # -> cos, sin (B, 1, T, hd)
        freqs = position_ids[:, :, None].to(self.inv_freq.dtype) * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids=None,
        *,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        labels=None,
        return_logits=True,  # False with labels: only the loss (fast.chunked_loss then never makes the logits)
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past = past_key_values[0][0].size(2) if past_key_values else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens (past {past} + new {T}) exceeds the context "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(
                f"attention_mask must be (batch, past + new) = {(B, past + T)}, got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
            else:  # left padding: real tokens count positions from 0 (as HF generate does)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = self.attention_mask(attention_mask, B, T, past, x.device)
        cache = [] if use_cache else None  # (kept only when asked: every layer's keys and values, a KV cache)
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None, use_cache)
            if use_cache:
                cache.append(kv)
        x = self.model.norm(x)
        if labels is not None and not return_logits:  # the loss alone (what train() asks for)
            return ModelOutput(loss=self.hidden_loss(x, labels), past_key_values=cache)
        logits = self.lm_head(x)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=cache)

    def hidden_loss(self, hidden, labels):
        """The loss from the final hidden states (B, T, D): through the logits here; fast.chunked_loss replaces
        this on a model with one that never holds the (B, T, V) logits."""
        return causal_lm_loss(self.lm_head(hidden), labels)

    def attention_mask(self, attention_mask, B, T, past, device):
        """Boolean (B, 1, T, S) mask, True = may attend; None when plain causal attention does the job."""
        S, window = past + T, self.config.sliding_window
        slides = window is not None and S > window  # else no key is ever out of the window
        if attention_mask is None and not slides and (past == 0 or T == 1):
            return None  # SDPA's is_causal (or no mask at all for one new token)
        q_pos, k_pos = torch.arange(past, S, device=device)[:, None], torch.arange(S, device=device)[None, :]
        mask = k_pos <= q_pos  # (T, S) causal
        if slides:  # Mistral's sliding window (as transformers): key k is seen from query q iff q - k < window
            mask = mask & (q_pos - k_pos < window)
        mask = mask[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # A padding query sees no key at all, which would make softmax NaN: let it see itself.
            mask = mask | (k_pos == q_pos)[None, None]
        return mask.expand(B, 1, T, S)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=32, **sampling):
        """Sample up to max_new_tokens with the KV cache; returns (B, T + new): the input ids then the new ones.

        sampling: temperature=0.0 (greedy), top_k, top_p, eos_token_id, attention_mask (left-padded batches),
        generator. Rows that produced eos keep emitting eos. The loop is in decoding.py, shared with PeftModel.
        """
        return generate(self, input_ids, max_new_tokens, **sampling)
