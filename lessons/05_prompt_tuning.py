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
# # 05 · Prompt tuning: soft prompts
#
# Prompt tuning (Lester, Al-Rfou, Constant 2021, *The Power of Scale for Parameter-Efficient Prompt Tuning*) is
# the smallest PEFT method there is. Freeze everything, and learn $P$ vectors that are prepended to the input
# embeddings, a **soft prompt**:
#
# $$\text{inputs\_embeds} = [\,\text{prompt} \,;\, \mathrm{embed}(x)\,] \qquad \text{prompt}: (P, D)
# \qquad P \cdot D \text{ trainable numbers}$$
#
# A real prompt is a sequence of rows of the embedding matrix; a soft prompt is free to be any vectors at all.
# In this lesson you will:
#
# 1. build it inline in a few lines, and show **exactly** that a soft prompt set to the embeddings of real tokens
#    $p$ reproduces the model on $[p; x]$, gradients included;
# 2. check `minipeft/prompt.py` against that;
# 3. prove, numerically, one thing a prompt *cannot* do;
# 4. train from random, from vocabulary and from text initialisations (and plot the curves), against LoRA with
#    the same number of parameters;
# 5. look at what the learned vectors are close to.
#
# **What you need first.** Lesson 00 (the embedding layer; `inputs_embeds`; labels shifted inside the model,
# -100 ignored) and lesson 04's idea that real tokens follow virtual ones at positions $P, P+1, \dots$.

# %%
import os
import time

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("MINIPEFT_FAST", "") not in ("", "0")  # the tests set it: fewer steps, the same cells
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU, when there is one, gets bigger settings
MODEL = "tiny-shakespeare"
torch.manual_seed(0)
print(f"device: {DEVICE}, fast: {FAST}, torch {torch.__version__}")

# %%
import copy
import tempfile

from torch import nn

from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.gradcheck import rel_err
from minipeft.lora import LoraConfig
from minipeft.model import apply_rotary
from minipeft.peft import PeftModel, get_peft_model
from minipeft.prompt import PromptTuningConfig
from minipeft.train import TrainConfig, evaluate, train

# The sonnets hold ~24k training tokens: a GPU gets longer blocks, not more epochs (that would only overfit).
if DEVICE == "cuda":
    STEPS, SEQ_LEN, BATCH, VAL_BATCHES = 300, 128, 8, None
elif FAST:
    STEPS, SEQ_LEN, BATCH, VAL_BATCHES = 15, 64, 8, 3
else:
    STEPS, SEQ_LEN, BATCH, VAL_BATCHES = 300, 64, 8, None

model, tok = load_pretrained(MODEL)
m64, _ = load_pretrained(MODEL, dtype=torch.float64)  # for the exact checks
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
D = model.config.hidden_size
print(f"{MODEL}: D = {D}, vocabulary {model.config.vocab_size}")


# %% [markdown]
# ## 1. A soft prompt, inline
#
# Prepend $P$ vectors to the embedded input, and pad the labels with $P$ times -100 so that the loss is on the
# real tokens only. (With the labels shifted inside the model, the *last* virtual position predicts the first
# real token: every real token is predicted, as in PEFT.)
#
# Initialise the prompt with the embeddings of real tokens $p$, and the model must be exactly the model on
# $[p; x]$:


# %%
def with_prompt(model, prompt, x, labels=None):
    # prompt (P, D), x (B, T) -> the logits of x's positions (B, T, V) and the loss on x's tokens
    B, P = x.size(0), prompt.size(0)
    embeds = torch.cat([prompt[None].expand(B, -1, -1), model.model.embed_tokens(x)], dim=1)  # (B, P + T, D)
    if labels is not None:
        labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)  # no loss at the virtual positions
    out = model(inputs_embeds=embeds, labels=labels)
    return out.logits[:, P:], out.loss


p_ids = torch.tensor([tok.encode("Shall I compare thee to a summer's day?")])  # (1, P)
P = p_ids.size(1)
x_ids = next(batches(val_data, 1, shuffle=False))["input_ids"][:, :32]  # (1, 32) sonnet text

soft = nn.Parameter(m64.model.embed_tokens.weight[p_ids[0]].detach().clone())  # (P, D): the real tokens' rows
with torch.no_grad():
    joint = m64(torch.cat([p_ids, x_ids], dim=1)).logits[:, P:]  # the model on [p; x]
logits, loss = with_prompt(m64, soft, x_ids, x_ids)
print(
    f"P = {P}, prompt {tuple(soft.shape)}: max |model([p; x]) - model(x | soft prompt)| = "
    f"{(joint - logits).abs().max().item():.1e}"
)
assert torch.allclose(joint, logits, atol=1e-12, rtol=0)

# %% [markdown]
# The gradient: the soft prompt's gradient must be the plain model's gradient with respect to its input
# embeddings at $p$'s positions (run on $[p; x]$ with the loss on $x$ only):

# %%
loss.backward()
embeds = m64.model.embed_tokens(torch.cat([p_ids, x_ids], dim=1)).detach().requires_grad_()
labels = torch.cat([torch.full_like(p_ids, -100), x_ids], dim=1)
m64(inputs_embeds=embeds, labels=labels).loss.backward()
reference = embeds.grad[0, :P]  # (P, D)
print(f"dL/d(prompt) vs dL/d(inputs_embeds)[:P]: relative error {rel_err(soft.grad, reference):.1e}")
assert rel_err(soft.grad, reference) < 1e-12

# %% [markdown]
# ## 2. The library
#
# `PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init=...)` with PEFT's three initialisations:
# `"RANDOM"` ($N(0, 1)$, as `nn.Embedding`), `"SAMPLE_VOCAB"` (rows of random tokens) and `"TEXT"` (the rows of
# `prompt_tuning_init_text`'s tokens, repeated or cut to $P$; it needs the tokenizer). With the text of $p$ it is
# our prompt exactly:

# %%
config = PromptTuningConfig(
    num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text="Shall I compare thee to a summer's day?"
)
peft64 = get_peft_model(copy.deepcopy(m64), config, tokenizer=tok)
peft64.print_trainable_parameters()
assert peft64.num_parameters(trainable_only=True) == P * D
assert torch.equal(peft64.prompt_encoder["default"].embedding.weight, soft.detach())
out = peft64(x_ids, labels=x_ids)  # logits for the real tokens only: (B, T, V)
assert torch.allclose(out.logits, joint, atol=1e-12, rtol=0)
out.loss.backward()
assert rel_err(peft64.prompt_encoder["default"].embedding.weight.grad, reference) < 1e-12
print("library: same prompt, same logits as the model on [p; x], same gradient")


# %% [markdown]
# ## 3. What a prompt cannot do
#
# Prompt tuning only adds **inputs**. Look at the first layer's attention. A real token's query meets the
# prompt's keys and the real tokens' keys; the real tokens' own keys and queries are computed exactly as
# without the prompt (the first layer sees their embeddings), and rotary attention depends only on relative
# positions. So within the real tokens, the attention pattern is *unchanged*: the prompt can only take a share
# $\alpha$ of each token's attention for itself,
#
# $$\text{attn}_{\text{with prompt}}(i \to j) = (1 - \alpha_i)\; \text{attn}_{\text{without}}(i \to j)
# \qquad j \text{ a real token},$$
#
# and mix its own values in. It cannot make token $i$ look at token $j$ more than at token $k$ (Petrov, Torr,
# Bibi 2023, *When Do Prompting and Prefix-Tuning Work?*, make this precise for prefix tuning too). Check it with
# *any* prompt, here a random one:


# %%
def layer0_attention(run):
    # the first layer's attention probabilities (B, H, T, S) during run()
    store = {}
    attn = m64.model.layers[0].self_attn

    def hook(module, inputs, output):
        x, cos, sin = inputs[:3]
        B, T, _ = x.shape
        q = apply_rotary(attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)
        k = output[1][0].repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        store["probs"] = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).masked_fill(~causal, float("-inf")).softmax(-1)

    handle = attn.register_forward_hook(hook)
    with torch.no_grad():
        run()
    handle.remove()
    return store["probs"]


torch.manual_seed(0)
random_prompt = torch.randn(P, D, dtype=torch.float64)
without = layer0_attention(lambda: m64(x_ids))  # (1, H, 32, 32)
with_p = layer0_attention(lambda: with_prompt(m64, random_prompt, x_ids))  # (1, H, P + 32, P + 32)
real_to_real = with_p[:, :, P:, P:]  # real queries, real keys
alpha = with_p[:, :, P:, :P].sum(-1, keepdim=True)  # the share each real token gives the prompt
print(f"mean share of layer-0 attention taken by the prompt: {alpha.mean().item():.2f}")
err = (real_to_real / (1 - alpha) - without).abs().max().item()
print(f"max |renormalised attention among real tokens - attention without the prompt| = {err:.1e}")
assert err < 1e-10

# %% [markdown]
# In later layers the real tokens' states have been mixed with the prompt's values, so the pattern can change
# there, but only through what the first layers let in. Prefix tuning has the same limit at *every* layer
# (its keys are fixed, not computed), but it can set every layer's keys and values directly; LoRA changes the
# weights themselves and has neither limit. Expect prompt tuning to be the weakest of the three on a small model:
# the model itself has to be capable enough to be *steered* by a few input vectors. Lester et al. found that prompt
# tuning matches full fine-tuning only at around 10 billion parameters; ours has 5 million.
#
# ## 4. Init from text, from the vocabulary, or random
#
# The paper found random initialisation clearly worse than starting from real embeddings, for smaller models.
# Look at the scales first: a random $N(0, 1)$ vector in $D = 256$ dimensions has norm $\sqrt{D} = 16$; the
# model's token embeddings are far smaller.

# %%
norms = model.model.embed_tokens.weight.norm(dim=1)
print(
    f"token embeddings: norm {norms.mean():.2f} on average (min {norms.min():.2f}, max {norms.max():.2f}); "
    f"a random N(0, 1) prompt vector: about {D**0.5:.0f}"
)
assert D**0.5 > 3 * norms.max()

P_TRAIN = 20
INIT_TEXT = "Sonnet. From fairest creatures we desire increase, that thereby beauty's rose might never die"
inits = {
    "random": PromptTuningConfig(num_virtual_tokens=P_TRAIN),
    "vocabulary": PromptTuningConfig(num_virtual_tokens=P_TRAIN, prompt_tuning_init="SAMPLE_VOCAB"),
    "text": PromptTuningConfig(
        num_virtual_tokens=P_TRAIN, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT
    ),
}
# LoRA with about as many parameters as the prompt (P_TRAIN * D): rank 1 on q_proj and v_proj
lora_config = LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"])


def finetune(name, config, lr):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(base, config, tokenizer=tok)
    start = [p.detach().clone() for p in peft_model.parameters() if p.requires_grad]
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=BATCH,
        lr=lr,
        warmup_steps=max(1, STEPS // 10),
        eval_every=max(1, STEPS // (1 if FAST else 6)),
        eval_batches=VAL_BATCHES,
        progress=False,
    )
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, cfg)
    print(
        f"{name:10s}: {peft_model.num_parameters(trainable_only=True):,} trainable, val loss {before:.3f} -> "
        f"{metrics['val_loss']:.3f} in {STEPS} steps, {time.perf_counter() - t0:.0f} s"
    )
    return peft_model, before, metrics, start


runs = {name: finetune(name, config, lr=3e-2) for name, config in inits.items()}
runs["LoRA r=1"] = finetune("LoRA r=1", lora_config, lr=3e-3)

# %%
no_prompt = evaluate(model.to(DEVICE), val_data, BATCH, VAL_BATCHES)[0]
fig, ax = plt.subplots(figsize=(8, 3.6))
for name, (peft_model, before, metrics, _) in runs.items():
    style = "s--" if name.startswith("LoRA") else "o-"
    label = f"{name} ({peft_model.num_parameters(trainable_only=True):,} parameters)"
    ax.plot(
        [0] + [e["step"] for e in metrics["eval"]],
        [before] + [e["val_loss"] for e in metrics["eval"]],
        style,
        label=label,
    )
ax.axhline(no_prompt, color="k", lw=1, ls=":", label="the model, no prompt")
ax.set_ylim(top=max(r[1] for r in runs.values()) + 0.05)
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend(fontsize=8)
ax.set_title("Prompt tuning: initialisations, and LoRA with as many parameters")
plt.show()
for name, (_, before, metrics, _) in runs.items():
    print(f"{name:10s} start {before:.3f}  end {metrics['val_loss']:.3f}")
    assert metrics["val_loss"] < before, name
if not FAST:  # what the full run shows (a few fast-mode steps are too few to separate the curves)
    assert runs["random"][1] < runs["text"][1] and runs["random"][2]["val_loss"] > runs["text"][2]["val_loss"]
    assert runs["LoRA r=1"][2]["val_loss"] < min(runs[n][2]["val_loss"] for n in inits)

# %% [markdown]
# What the full run shows (the default settings; fast mode is too short to tell): the **random** prompt starts
# *closest* to the unprompted model but learns the slowest and ends the worst of the three. The **text** and
# **vocabulary** prompts start worse (they are real words and the model reads them: a fixed line of text, or a
# handful of random words, in front of every block of a sonnet is not what it expects) but move fast and end lower. One reason random learns slowly: Adam moves
# every coordinate by about the learning rate per step, whatever its size, so at the same learning rate a vector of
# norm 16 changes far less, relative to its length, than one of norm 1 (section 5 measures it: in our full run the
# random prompt moved by 73% of its length, the text prompt by 359%). (Lester et al. trained their prompts with a
# learning rate of 0.3.)
#
# **LoRA** with about as many parameters ends lowest: the prompt can only steer the frozen computation through
# attention, LoRA changes it. That is "weak at small scale", measured.
#
# ## 5. Look at it
#
# How far did each prompt move from where it started, relative to its length? And where did the text-initialised
# prompt go: for each learned vector, the nearest token embedding (cosine similarity), next to the token it
# started from:

# %%
drift = {}
for name in inits:
    learned, start = runs[name][0].prompt_encoder["default"].embedding.weight.detach(), runs[name][3][0]
    drift[name] = ((learned - start).norm() / start.norm()).item()
    print(
        f"{name:10s}: the prompt moved by {drift[name]:.1%} of its length ({start.norm(dim=1).mean():.1f} per vector)"
    )
assert drift["random"] < drift["text"] / 3  # same learning rate, 14x longer vectors: far smaller relative steps

emb = torch.nn.functional.normalize(model.model.embed_tokens.weight.detach().to(DEVICE), dim=1)  # (V, D)
start_ids = (tok.encode(INIT_TEXT) * P_TRAIN)[:P_TRAIN]
for name in ("text", "random"):
    learned = torch.nn.functional.normalize(runs[name][0].prompt_encoder["default"].embedding.weight.detach(), dim=1)
    similarity, nearest = (learned @ emb.T).max(dim=1)
    print(f"{name} init, after training: max cosine similarity to any token {similarity.mean():.2f} on average")
    if name == "text":
        kept = sum(int(a == b) for a, b in zip(nearest.tolist(), start_ids))
        print(f"  {kept} of {P_TRAIN} vectors are still nearest to the token they started from")
        print("  started:", " | ".join(tok.decode([i]).strip() for i in start_ids[:10]), "...")
        print("  nearest:", " | ".join(tok.decode([i]).strip() for i in nearest.tolist()[:10]), "...")

prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=DEVICE)
with torch.no_grad():  # temperature 0.8, top-k 50, a fixed seed: greedy decoding of a model this small loops
    out = runs["text"][0].generate(
        prompt, 48, temperature=0.8, top_k=50, generator=torch.Generator(DEVICE).manual_seed(0)
    )
print("\nwith the trained text-initialised prompt:\n" + tok.decode(out[0].tolist()))

# %% [markdown]
# Saved as HF PEFT saves it, one tensor `prompt_embeddings` of shape $(P, D)$:

# %%
trained = runs["text"][0]
with tempfile.TemporaryDirectory() as d:
    trained.save_pretrained(d)
    print(sorted(os.listdir(d)), {k: tuple(v.shape) for k, v in trained.adapter_state_dict("default").items()})
    fresh, _ = load_pretrained(MODEL, device=DEVICE)
    loaded = PeftModel.from_pretrained(fresh, d)
    x = next(batches(val_data, 2, shuffle=False))["input_ids"].to(DEVICE)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trained(x).logits)
print("saved, loaded: same logits")

# %% [markdown]
# ## Summary
#
# * A soft prompt is $P$ free vectors prepended to the input embeddings; real tokens follow at positions
#   $P, P+1, \dots$; the labels are padded with -100, so the last virtual token predicts the first real one.
# * Set to the embeddings of real tokens $p$ it **is** the prompt $p$: same logits as the model on $[p; x]$,
#   and its gradient is the model's input-embedding gradient at $p$'s positions (float64, ~1e-15).
# * It cannot change how the real tokens attend to each other in the first layer, only take a share of that
#   attention; with a few thousand parameters on a 5M-parameter model, it trails LoRA with as many.
# * Initialise from text (or the vocabulary), not at random: random $N(0, 1)$ vectors are 14 times longer than
#   real embeddings, so at a learning rate that suits real embeddings they change far less, relative to their size.
# * It lives in **`minipeft/prompt.py`** (`PromptTuningConfig`, `PromptEncoder`), saved in HF PEFT's format.
#
# ## Exercises

# %% [markdown]
# **Exercise 1.** How many trainable parameters does `PromptTuningConfig(num_virtual_tokens=8)` have on this
# model?

# %%
answer_1 = None  # your code: an int

# %%
# check exercise 1
if answer_1 is None:
    print("exercise 1: not answered yet")
elif answer_1 == 8 * D:
    print("exercise 1: right!")
else:
    print("exercise 1: not quite. One vector of the hidden size per virtual token.")

# %% [markdown]
# **Exercise 2.** Make a float64 soft prompt (a `(P, D)` tensor) that turns the model into the model
# prompted with `"ROMEO:"`. The check compares logits with the model on `["ROMEO:"; x]`.

# %%
romeo = torch.tensor([tok.encode("ROMEO:")])
answer_2 = None  # your code: a (romeo.size(1), D) float64 tensor

# %%
# check exercise 2
if answer_2 is None:
    print("exercise 2: not answered yet")
else:
    with torch.no_grad():
        mine = with_prompt(m64, answer_2, x_ids)[0]
        ok = torch.allclose(mine, m64(torch.cat([romeo, x_ids], 1)).logits[:, romeo.size(1) :], atol=1e-9)
    print("exercise 2: right!" if ok else "exercise 2: not quite. Which rows of which matrix are the tokens of ROMEO:?")

# %% [markdown]
# **Exercise 3.** A batch of 2 rows of 32 tokens, with a soft prompt of 10 virtual tokens: how many tokens does
# the loss average over? (Without a prompt it would be 2 x 31: the first token of each row has nothing before it.)

# %%
answer_3 = None  # your code: an int

# %%
# check exercise 3
if answer_3 is None:
    print("exercise 3: not answered yet")
elif answer_3 == 2 * 32:
    print("exercise 3: right!")
else:
    print("exercise 3: not quite. With a prompt, what predicts the first real token?")
