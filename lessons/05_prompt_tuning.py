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
#
# Runs in about RUNTIME minutes on a 2-core CPU (measured, full mode); the tests run it in a shorter mode.

# %%
import os

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, VAL_BATCHES, exercise, finetune_config, lr, train_and_report

MODEL = "tiny-shakespeare"
VIRTUAL_TOKENS = 20  # P when training: `minipeft finetune --method prompt`'s default (--virtual-tokens)
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
from minipeft.train import evaluate

model, tok = load_pretrained(MODEL)
m64, _ = load_pretrained(MODEL, dtype=torch.float64)  # for the exact checks
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
D = model.config.hidden_size
n_model = sum(p.numel() for p in model.parameters())
print(f"{MODEL}: {n_model / 1e6:.1f}M parameters, D = {D}, vocabulary {model.config.vocab_size}")
# The training budget of lessons 02-08 (`minipeft finetune`'s): STEPS steps of BATCH blocks of SEQ_LEN tokens
print(
    f"sonnets: {len(train_data)} training blocks of {SEQ_LEN} tokens = {train_data.num_tokens():,} tokens; "
    f"{STEPS} steps x {BATCH} blocks = {STEPS * BATCH / len(train_data):.1f} passes over them"
)


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
# In later layers the real tokens' states have been mixed with the prompt's values, so their queries and keys
# differ and the pattern among them can change there, but only indirectly, through what the earlier layers let in.
#
# Prefix tuning is no way out of this. Within any one layer, a prefix does exactly what the prompt does in the
# first: it takes a share of each real token's attention and mixes in its values, and the pattern among the real
# tokens, renormalised, is the one that layer's inputs give (the real tokens' queries and keys are computed by the
# frozen weights from their states, whatever the prefix). In later layers it changes that pattern in the same
# indirect way, through the states. What prefix tuning has beyond prompt tuning is freedom, not a different kind of
# effect: a soft prompt's keys and values at every layer are *one particular* prefix (the frozen model computes
# them from the $P$ prompt vectors), while a prefix sets each layer's keys and values directly. So prefix tuning
# can do everything prompt tuning can, and not the reverse. The next cell checks the first half: the cache a soft
# prompt leaves behind, used as a prefix, gives the same logits. LoRA changes the weights themselves and has
# neither limit.
#
# Expect prompt tuning to be the weakest of the three on a small model: the model itself has to be capable enough
# to be *steered* by a few input vectors. Lester et al. found that prompt tuning matches full fine-tuning only at
# around 10 billion parameters; ours has the number of parameters printed at the top (under 5 million).

# %%
with torch.no_grad():
    prompt_cache = m64(inputs_embeds=random_prompt[None], use_cache=True).past_key_values  # L x (k, v): (1, K, P, hd)
    as_prefix = m64(x_ids, past_key_values=prompt_cache).logits  # the real tokens, the prompt as a learned cache
    as_prompt = with_prompt(m64, random_prompt, x_ids)[0]
print(f"max |prompt - the prefix made of its cache| = {(as_prefix - as_prompt).abs().max().item():.1e}")
assert torch.allclose(as_prefix, as_prompt, atol=1e-12, rtol=0)
assert n_model < 5e6
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
    f"a random N(0, 1) prompt vector: about {D**0.5:.0f}, {D**0.5 / norms.mean():.0f} times the average"
)
assert D**0.5 > 3 * norms.max()

P_TRAIN = VIRTUAL_TOKENS
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
    train_config = finetune_config("prompt", lr=lr, eval_every=max(1, STEPS // 3))
    before, metrics = train_and_report(name, peft_model, train_data, val_data, train_config)
    return peft_model, before, metrics, start


print(f"finetune's learning rates: prompt tuning {lr('prompt')}, LoRA {lr('lora')}")
runs = {name: finetune(name, config, lr=lr("prompt")) for name, config in inits.items()}
runs["LoRA r=1"] = finetune("LoRA r=1", lora_config, lr=lr("lora"))

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
ends = {name: runs[name][2]["val_loss"] for name in inits}
print(f"the three prompts end within {max(ends.values()) - min(ends.values()):.3f} of each other")
assert runs["random"][1] < min(runs["text"][1], runs["vocabulary"][1])  # random starts closest to no prompt
if not FAST:  # what the full run shows (a few fast-mode steps are too few to separate the curves)
    assert max(ends.values()) - min(ends.values()) < 0.1
    assert runs["LoRA r=1"][2]["val_loss"] < min(ends.values())

# %% [markdown]
# What the runs show. The **random** prompt starts *closest* to the unprompted model. The **text** and
# **vocabulary** prompts start worse: they are real words and the model reads them, and a fixed line of text, or a
# handful of random words, in front of every block of a sonnet is not what it expects. After the full budget the
# three end close together (the spread is printed, and asserted under 0.1 in full mode), here with no advantage
# for the text initialisation; the printed losses say which ends lowest on your machine. That is not the paper's
# finding (it saw random init clearly worse for smaller models), and the learning rate is a large part of why.
# finetune's learning rate for prompt tuning is Lester et al.'s, 0.3, and Adam moves every coordinate by about
# the learning rate per step, whatever its size. A real embedding has norm about 1 over 256 coordinates (printed
# above), so a step of 0.3 per coordinate carries it far from the word it started as within a few steps; a random
# $N(0, 1)$ vector, about 1 per coordinate, moves a smaller fraction of its length. Section 5 measures both: at this
# learning rate the text prompt does not stay near its words, so starting from them buys little. (At a ten times
# smaller rate the text init keeps more of its start and ends lower than the random one: try it, with
# `lr=lr("prompt") / 10` in the cell above.)
#
# **LoRA** with about as many parameters ends lowest (asserted in full mode): the prompt can only steer the
# frozen computation through attention, LoRA changes it. That is "weak at small scale", measured.
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
assert drift["random"] < drift["text"] / 3  # the same steps per coordinate: far smaller relative to a long vector

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
#   and its gradient is the model's input-embedding gradient at $p$'s positions (float64: the relative errors printed in section 1).
# * It cannot change how the real tokens attend to each other in the first layer, only take a share of that
#   attention; prefix tuning has the same limit in every layer and can do all a prompt can (a prompt's cache is a
#   prefix). With a few thousand parameters on a model of under 5M, it trails LoRA with as many.
# * The initialisation and the learning rate go together: random $N(0, 1)$ vectors are over ten times longer than
#   real embeddings, and Adam's steps are about the learning rate per coordinate whatever the length. At
#   finetune's 0.3 a text-initialised prompt soon leaves its words, and here the three inits ended close together.
# * It lives in **`minipeft/prompt.py`** (`PromptTuningConfig`, `PromptEncoder`), saved in HF PEFT's format.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it, which checks your function against the library on its own inputs: "correct", or what differs.

# %% [markdown]
# **Exercise 1.** The two things prompt tuning does to a batch before the model sees it: prepend the prompt to
# every row's embeddings, and pad the labels so that the loss is on the real tokens only (PEFT's semantics, as in
# section 1). The check runs a small float64 model on your two tensors and compares the logits and the loss with
# the library's prompt tuning, on labels that already hold some -100.

# %%
from exercises.l05 import check_prepend_prompt, check_text_init_ids


def prepend_prompt(prompt, embeds, labels):
    """prompt (P, D), embeds (B, T, D), labels (B, T) -> (inputs_embeds (B, P + T, D), labels (B, P + T)).

    Hint: the model shifts the labels itself; what label means "no loss here"?"""
    raise NotImplementedError  # your code


# %%
exercise("prepend_prompt", prepend_prompt, check_prepend_prompt)

# %% [markdown]
# **Exercise 2.** The `"TEXT"` initialisation: which token starts each of the $P$ virtual tokens, given the ids of
# `prompt_tuning_init_text`? Texts longer than $P$ tokens are cut; shorter ones are repeated, as PEFT does. The check
# compares the embedding rows of your ids with the prompt the library builds.


# %%
def text_init_ids(ids, P):
    """ids: a list of token ids (the init text's), P: the number of virtual tokens -> a list of P ids.

    Hint: try ids = [5, 9, 2] with P = 8 and with P = 2 on paper first."""
    raise NotImplementedError  # your code


# %%
exercise("text_init_ids", text_init_ids, check_text_init_ids)
