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
# # 03 · Bottleneck adapters: Houlsby and Pfeiffer
#
# Before LoRA there were **adapters** (Houlsby et al. 2019, *Parameter-Efficient Transfer Learning for NLP*):
# freeze the transformer and insert small trainable MLPs into it. Each adapter squeezes the hidden state through
# a bottleneck of $b \ll D$ units and adds the result back:
#
# $$a(h) = h + W_{\text{up}}\, f(W_{\text{down}} h + b_{\text{down}}) + b_{\text{up}} \qquad
# W_{\text{down}}: (b, D), \; W_{\text{up}}: (D, b)$$
#
# In this lesson you will:
#
# 1. build the bottleneck inline and make it the **identity at init**;
# 2. insert it where Houlsby puts it (after attention *and* after the MLP) and where Pfeiffer et al. 2021 put
#    it (after the MLP only), and check your model against `minipeft/adapter.py`;
# 3. verify it against full fine-tuning: the base gradients are unchanged at init, and the adapter's own
#    gradients match finite differences;
# 4. **measure** the latency adapters add, and see where it comes from;
# 5. train Houlsby and Pfeiffer adapters on Shakespeare's sonnets and look at what they learned.
#
# **What you need first.** Lesson 00 (the decoder block: `x = x + o_proj(attention)`, `x = x + down_proj(mlp)`)
# and lesson 02 (LoRA; `get_peft_model`; why $B = 0$ at init).
#
# Runs in about RUNTIME minutes on a 2-core CPU (measured, full mode); the tests run it in a shorter mode.

# %%
import os
import time

import matplotlib.pyplot as plt
import torch
from common import BATCH, DEVICE, FAST, SEQ_LEN, STEPS, exercise, finetune_config, train_and_report

MODEL = "tiny-shakespeare"
BOTTLENECK = 64  # b: `minipeft finetune --method adapter`'s default (--bottleneck)
torch.manual_seed(0)
print(f"device: {DEVICE}, fast: {FAST}, torch {torch.__version__}")

# %%
import copy
import tempfile

from torch import nn

from minipeft.adapter import AdapterConfig, AdapterLayer
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.gradcheck import finite_difference_check, rel_err
from minipeft.lora import LoraConfig
from minipeft.peft import PeftModel, get_peft_model

model, tok = load_pretrained(MODEL)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
D, L = model.config.hidden_size, model.config.num_hidden_layers
ids = next(batches(val_data, 2, shuffle=False))["input_ids"]  # (2, SEQ_LEN): two blocks of sonnet text
print(f"{MODEL}: D = {D}, L = {L} blocks")
# The training budget of lessons 02-08 (`minipeft finetune`'s): STEPS steps of BATCH blocks of SEQ_LEN tokens
print(
    f"sonnets: {len(train_data)} training blocks of {SEQ_LEN} tokens = {train_data.num_tokens():,} tokens; "
    f"{STEPS} steps x {BATCH} blocks = {STEPS * BATCH / len(train_data):.1f} passes over them; "
    f"held-out: {len(val_data)} blocks"
)


# %% [markdown]
# ## 1. The bottleneck, identity at init
#
# Down-project, a nonlinearity, up-project, add the input back (the adapter's own skip connection). Zero
# $W_{\text{up}}$ and $b_{\text{up}}$ and the adapter adds exactly nothing, so the adapted model starts as the
# pretrained one. $W_{\text{down}}$ keeps `nn.Linear`'s random init: if it were zero too, the bottleneck would
# output the same vector for every token, and the first steps could only learn a constant shift (LoRA zeroes only
# $B$ for a similar reason).


# %%
class Bottleneck(nn.Module):
    def __init__(self, dim, bottleneck):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)  # (b, D) + (b,): kaiming-uniform, nn.Linear's own init
        self.up = nn.Linear(bottleneck, dim)  # (D, b) + (D,)
        nn.init.zeros_(self.up.weight)  # a(h) = h at init
        nn.init.zeros_(self.up.bias)

    def forward(self, h):  # h: (B, T, D)
        return h + self.up(torch.relu(self.down(h)))


torch.manual_seed(0)
adapter = Bottleneck(D, BOTTLENECK)
h = torch.randn(2, 5, D)
assert torch.equal(adapter(h), h)  # the identity, exactly
n_params = sum(p.numel() for p in adapter.parameters())
print(
    f"one adapter with b = {BOTTLENECK}: {n_params:,} parameters (two weight matrices, two biases); "
    f"the block it sits in has {sum(p.numel() for p in model.model.layers[0].parameters()):,}"
)

# %% [markdown]
# ## 2. Where it goes: Houlsby and Pfeiffer
#
# Houlsby puts an adapter on the output of each sub-layer, **before** it is added to the residual stream: one
# after attention, one after the MLP, two per block. Pfeiffer et al. 2021 (*AdapterFusion*) found one adapter
# per block, after the MLP, nearly as good at half the parameters and half the extra computation.
#
# In our decoder block "the attention sub-layer's output, before the residual add" is exactly the output of
# `o_proj`, and the MLP's is the output of `down_proj`. So inserting an adapter needs no change to the model:
# replace `o_proj` by `Sequential(o_proj, adapter)`.

# %%
PLACEMENTS = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}


def insert_adapters(model, placement, bottleneck):
    for block in model.model.layers:
        for path in PLACEMENTS[placement]:
            parent, child = path.split(".")
            sub = getattr(block, parent)
            setattr(sub, child, nn.Sequential(getattr(sub, child), Bottleneck(D, bottleneck)))
    return model


torch.manual_seed(0)
with torch.no_grad():
    base_logits = model(ids).logits
    for placement in PLACEMENTS:
        ours = insert_adapters(copy.deepcopy(model), placement, BOTTLENECK)
        assert torch.equal(ours(ids).logits, base_logits)  # identity at init: the pretrained model, exactly
        n = sum(p.numel() for m in ours.modules() if isinstance(m, Bottleneck) for p in m.parameters())
        per_block = len(PLACEMENTS[placement])
        assert n == per_block * L * n_params
        print(f"{placement:9s}: {per_block} adapter(s) per block, {n:,} parameters; output == base model's")

# %% [markdown]
# Identity at init cannot tell a correct adapter from a missing one. So give the library's adapters random
# non-zero $W_{\text{up}}$ (`init_weights=False`, meant for tests), copy them into ours, and compare the logits:

# %%
torch.manual_seed(0)
config = AdapterConfig(bottleneck_size=BOTTLENECK, placement="houlsby", init_weights=False)
lib = get_peft_model(copy.deepcopy(model), config)
ours = insert_adapters(copy.deepcopy(model), "houlsby", BOTTLENECK)
with torch.no_grad():
    for i, block in enumerate(ours.model.layers):
        for path in PLACEMENTS["houlsby"]:
            mine = block.get_submodule(path)[1]
            theirs = lib.base_model.model.layers[i].get_submodule(path)  # an AdapterLayer
            assert isinstance(theirs, AdapterLayer)
            for a, b in ((mine.down, theirs.adapter_down["default"]), (mine.up, theirs.adapter_up["default"])):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
    ours_logits, lib_logits = ours(ids).logits, lib(ids).logits
print(
    "max |ours - library|:",
    (ours_logits - lib_logits).abs().max().item(),
    "  max |adapted - base|:",
    (lib_logits - base_logits).abs().max().item(),
)
assert torch.allclose(ours_logits, lib_logits, atol=1e-5, rtol=0)
assert not torch.allclose(lib_logits, base_logits, atol=1e-3)  # the adapters really do something

# %% [markdown]
# ## 3. The library
#
# `AdapterConfig(bottleneck_size, placement, activation)`. `get_peft_model` freezes the base and wraps each
# `o_proj` / `down_proj` in an `AdapterLayer` (composition: the layer keeps its `base_layer`, as LoRA does). The
# trainable count is that of our inline adapters (it has a closed form: exercise 2); `disable_adapter()` gives the
# base model back exactly. What it cannot do is merge: $a(h)$ is nonlinear in $h$, so there is no weight matrix
# to fold it into.

# %%
houlsby = get_peft_model(copy.deepcopy(model), AdapterConfig(bottleneck_size=BOTTLENECK, placement="houlsby"))
pfeiffer = get_peft_model(copy.deepcopy(model), AdapterConfig(bottleneck_size=BOTTLENECK, placement="pfeiffer"))
for name, peft_model in (("houlsby", houlsby), ("pfeiffer", pfeiffer)):
    print(f"{name:9s}", end=" ")
    peft_model.print_trainable_parameters()
    assert peft_model.num_parameters(trainable_only=True) == len(PLACEMENTS[name]) * L * n_params  # = ours
with torch.no_grad():
    assert torch.equal(houlsby(ids).logits, base_logits)  # identity at init
    with lib.disable_adapter():
        assert torch.equal(lib(ids).logits, base_logits)  # non-zero adapters, switched off
try:
    houlsby.merge_and_unload()
except ValueError as e:
    print("merge_and_unload():", e)

# %% [markdown]
# ## 4. Verified against full fine-tuning
#
# Two facts, checked in float64 (where rounding is ~1e-16, so any real difference shows):
#
# * **At init the adapter's Jacobian is the identity** ($W_{\text{up}} = 0$), so every base weight gets exactly
#   the gradient it gets in full fine-tuning of the plain model. We unfreeze the base of an adapted model and
#   compare. A consequence: at the first step only $W_{\text{up}}$ and $b_{\text{up}}$ get gradient;
#   $\partial L / \partial W_{\text{down}}$ is exactly zero (the gradient reaches $W_{\text{down}}$ only through
#   $W_{\text{up}} = 0$), and $\partial L / \partial W_{\text{up}}$ is a sum over tokens built from $g_t$, the
#   gradient arriving at the adapter's output, and $z_t = f(W_{\text{down}} h_t + b_{\text{down}})$, its
#   bottleneck activation (exercise 3 asks you for it, checked against autograd).
# * **With non-zero adapters**, their gradients match central finite differences
#   ($\frac{f(p + \epsilon u) - f(p - \epsilon u)}{2\epsilon}$ along random directions $u$), with a smooth
#   activation (at ReLU's kink a finite difference is not a derivative).

# %%
m64, _ = load_pretrained(MODEL, dtype=torch.float64)
batch = ids[:, :32]
full = copy.deepcopy(m64).requires_grad_(True)
full(batch, labels=batch).loss.backward()

adapted = get_peft_model(copy.deepcopy(m64), AdapterConfig(bottleneck_size=16, placement="houlsby"))
first = adapted.base_model.model.layers[0].mlp.down_proj
for p in adapted.parameters():
    p.requires_grad_(True)  # base included, only for this comparison
adapted(batch, labels=batch).loss.backward()

full_grads = dict(full.named_parameters())
worst = 0.0
for name, p in adapted.named_parameters():
    if "adapter_" not in name:  # base_model.model.X.base_layer.weight -> X.weight
        ref = full_grads[name.removeprefix("base_model.").replace(".base_layer", "")]
        worst = max(worst, rel_err(p.grad, ref.grad))
print(f"base gradients, adapted (at init) vs full fine-tuning: max relative error {worst:.1e}")
assert worst < 1e-12

down, up = first.adapter_down["default"], first.adapter_up["default"]
print(
    f"dL/dW_down: max |.| = {down.weight.grad.abs().max().item()}; "
    f"dL/dW_up: max |.| = {up.weight.grad.abs().max().item():.1e}"
)
assert torch.all(down.weight.grad == 0) and torch.all(down.bias.grad == 0)
assert up.weight.grad.abs().max() > 0 and up.bias.grad.abs().max() > 0

# %%
torch.manual_seed(0)
# tanh, not relu: at relu's kink a finite difference is not a derivative (the backward code is the same for both)
config = AdapterConfig(bottleneck_size=16, placement="houlsby", activation="tanh", init_weights=False)
nonzero = get_peft_model(copy.deepcopy(m64), config)
adapter_params = [p for p in nonzero.parameters() if p.requires_grad]
err = finite_difference_check(lambda: nonzero(batch, labels=batch).loss, adapter_params)
print(f"adapter gradients vs finite differences (non-zero adapters): max relative error {err:.1e}")
assert err < 1e-6
del m64, full, adapted

# %% [markdown]
# ## 5. Where the extra latency comes from (measured)
#
# An adapter adds very few FLOPs: $4Db$ per token (two small matmuls), against $2 \times$ (parameters) for the
# model. But its two matmuls sit **in sequence on the main path**: the next block cannot start before the
# adapter has finished. When the work per operation is tiny, as when generating one token at a time, each extra
# operation costs a roughly fixed overhead (a kernel launch on a GPU, dispatch on a CPU), whatever its size.
#
# LoRA adds operations too while it is unmerged, but it can be **merged** into $W$ for inference: then the model
# is exactly as fast as the base. Adapters cannot. We count the FLOPs (`torch.utils.flop_counter`), the
# `Linear` calls per forward, and time two things: a **decode step** (1 new token, a KV cache of 64) and a
# **prefill** (a whole batch of sequences).

# %%
from torch.utils.flop_counter import FlopCounterMode

lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules="all-linear"))
variants = {
    "base": model,
    "LoRA unmerged": lora,
    "LoRA merged": copy.deepcopy(lora).merge_and_unload(),
    "Pfeiffer": pfeiffer,
    "Houlsby": houlsby,
}
tokens = torch.randint(0, model.config.vocab_size, (1, 16))
flops, linear_calls = {}, {}
for name, m in variants.items():
    counter = []
    hooks = [
        mod.register_forward_hook(lambda *_, c=counter: c.append(1))
        for mod in m.modules()
        if isinstance(mod, nn.Linear)
    ]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(tokens)
    for hk in hooks:
        hk.remove()
    flops[name], linear_calls[name] = fc.get_total_flops() / tokens.numel(), len(counter)
    print(
        f"{name:14s} {flops[name] / 1e6:7.3f} MFLOP/token  (+{flops[name] / flops['base'] - 1:6.2%})  "
        f"{linear_calls[name]:3d} Linear calls per forward"
    )
extra_flops_per_token = flops["Houlsby"] - flops["base"]
assert extra_flops_per_token == L * 2 * (4 * D * BOTTLENECK)  # two adapters per block, 4Db each
assert flops["LoRA merged"] == flops["base"] and linear_calls["LoRA merged"] == linear_calls["base"]
extra_calls = {n: linear_calls[n] - linear_calls["base"] for n in variants}
assert extra_calls["Pfeiffer"] == L * 2 and extra_calls["Houlsby"] == L * 4  # two Linear calls per adapter
assert extra_calls["LoRA unmerged"] == L * 7 * 2  # A and B on each of the 7 projections of a block
# The same two adapters per block in a Llama-7B-sized block (D = 4096, MLP 11008, 4 square attention projections)
D7, F7 = 4096, 11008
share_7b = 2 * 4 * D7 * BOTTLENECK / (2 * (4 * D7 * D7 + 3 * D7 * F7))
print(f"Houlsby with b = {BOTTLENECK} in a Llama-7B-sized block: +{share_7b:.2%} FLOPs (without attention scores)")


# %%
def median_times(fns, repeats):
    # round-robin: every repeat times each variant once, so a change in machine load hits them all alike
    times = {name: [] for name in fns}
    for i in range(repeats + 2):  # the first 2 rounds are warm-up
        for name, fn in fns.items():
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


repeats = 10 if FAST else 30
prompt = torch.randint(0, model.config.vocab_size, (1, 64), device=DEVICE)
prefill_ids = torch.randint(0, model.config.vocab_size, (8, 128), device=DEVICE)
with torch.inference_mode():
    for m in variants.values():
        m.to(DEVICE).eval()
    cache = model(prompt, use_cache=True).past_key_values  # 64 cached positions, the same for every variant
    decode = median_times(
        {n: lambda m=m: m(prompt[:, -1:], past_key_values=cache) for n, m in variants.items()}, repeats
    )
    prefill = median_times({n: lambda m=m: m(prefill_ids) for n, m in variants.items()}, max(3, repeats // 5))
latency = {n: (decode[n], prefill[n]) for n in variants}
for n, (dec, pre) in latency.items():
    print(
        f"{n:14s} decode step {dec * 1e3:6.2f} ms ({dec / decode['base'] - 1:+6.1%})   prefill of 8 x 128 tokens "
        f"{pre * 1e3:7.1f} ms ({pre / prefill['base'] - 1:+6.1%})   FLOPs {flops[n] / flops['base'] - 1:+6.2%}"
    )

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, k, title in ((axes[0], 0, "decode step (1 token)"), (axes[1], 1, "prefill (8 x 128 tokens)")):
    ax.bar(list(latency), [latency[n][k] / latency["base"][k] for n in latency], color=["0.6", "C1", "C2", "C0", "C3"])
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("time / base model's")
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
plt.tight_layout()
plt.show()


# %% [markdown]
# Read the printed percentages and the two panels side by side. The FLOPs grow by a few percent (here
# $b = 64$ is large next to $D = 256$; the FLOP cell printed what the same adapters add to a Llama-7B-sized
# block: well under 1%). At decode each extra `Linear` call costs a roughly fixed overhead whatever its size:
# Houlsby adds 20 calls per forward, Pfeiffer 10 (both asserted above), so expect the decode step to slow down
# by more than the FLOP ratio, more for Houlsby than for Pfeiffer. In the prefill the matmuls are big, the fixed
# cost per operation is amortised, and the overhead shrinks towards the FLOP ratio. Unmerged LoRA on all seven
# projections adds the most calls of all (70); merged, it costs exactly nothing, and that is the difference: the
# adapters' cost cannot be merged away. Timings on a shared or busy machine are noisy: rerun the cell; the
# executed notebook shows one run on a shared 2-core CPU. On a GPU a decode step is a string of tiny kernel
# launches, and the same reasoning applies.
#
# ## 6. Train Houlsby and Pfeiffer
#
# Same bottleneck, same data, and the training budget of lessons 02-08: `minipeft finetune`'s (`STEPS` steps of
# `BATCH` x `SEQ_LEN` tokens, its learning rate for adapters, `lr("adapter")`, 5% warmup, gradients clipped to
# norm 1, the loss on `VAL_BATCHES` held-out batches), so the held-out losses compare with the other lessons'.
# Houlsby has twice the parameters and twice the insertion points.


# %%
def finetune(placement, bottleneck=BOTTLENECK):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(base, AdapterConfig(bottleneck_size=bottleneck, placement=placement))
    config = finetune_config("adapter", eval_every=max(1, STEPS // 3))
    before, metrics = train_and_report(placement, peft_model, train_data, val_data, config)
    return peft_model, before, metrics


runs = {placement: finetune(placement) for placement in ("houlsby", "pfeiffer")}
fig, ax = plt.subplots(figsize=(8, 3.4))
for placement, (peft_model, before, metrics) in runs.items():
    steps = [0] + [e["step"] for e in metrics["eval"]]
    label = f"{placement} ({peft_model.num_parameters(trainable_only=True):,} parameters)"
    ax.plot(steps, [before] + [e["val_loss"] for e in metrics["eval"]], "o-", label=label)
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend()
plt.show()
for placement, (_, before, metrics) in runs.items():
    assert metrics["val_loss"] < before, placement
gain = {p: before - metrics["val_loss"] for p, (_, before, metrics) in runs.items()}
print(f"Pfeiffer's improvement is {gain['pfeiffer'] / gain['houlsby']:.0%} of Houlsby's, with half the parameters")
if not FAST:  # what the full budget shows (a few fast-mode steps are too few to tell)
    assert 0.5 < gain["pfeiffer"] / gain["houlsby"] < 1

# %% [markdown]
# With this budget Houlsby ends lower, and Pfeiffer gets most of Houlsby's improvement (the share is printed, and
# asserted between a half and all of it in full mode) with half the parameters and half the latency cost:
# Pfeiffer et al.'s point, on a small scale. The held-out losses are those of `minipeft finetune --method adapter`
# (Houlsby, b = 64) and compare directly with the other methods' in lessons 02-08.
#
# ## 7. Look at it
#
# What did the adapters learn to do? Hook every `AdapterLayer` and measure, on validation text, how large the
# adapter's contribution $a(h) - h$ is next to the sub-layer output $h$ it modifies. Then let the model write.

# %%
tuned = runs["houlsby"][0]
ratios = {}


def measure(name):
    def hook(module, inputs, output):
        h = module.base_layer(inputs[0])
        ratios[name] = ((output - h).norm() / h.norm()).item()

    return hook


hooks = [
    m.register_forward_hook(measure(n)) for n, m in tuned.base_model.named_modules() if isinstance(m, AdapterLayer)
]
with torch.no_grad():
    tuned(next(batches(val_data, BATCH, shuffle=False))["input_ids"].to(DEVICE))
for hk in hooks:
    hk.remove()

attn = [v for k, v in ratios.items() if "o_proj" in k]
mlp = [v for k, v in ratios.items() if "down_proj" in k]
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar([i - 0.2 for i in range(L)], attn, 0.4, label="after attention (o_proj)")
ax.bar([i + 0.2 for i in range(L)], mlp, 0.4, label="after the MLP (down_proj)")
ax.set_xlabel("block")
ax.set_ylabel("|a(h) - h| / |h|")
ax.legend()
ax.set_title("How much each Houlsby adapter changes its sub-layer's output")
plt.show()
assert all(r > 0 for r in ratios.values())


def sample(peft_model, text="Shall I compare thee to a summer's day?\n", n=48):
    # temperature 0.8, top-k 50, a fixed seed: greedy decoding of a model this small loops
    ids = torch.tensor([tok.encode(text)], device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        out = peft_model.generate(ids, n, temperature=0.8, top_k=50, generator=g)
    return text + tok.decode(out[0, ids.size(1) :].tolist())


with tuned.disable_adapter():
    print("base model:\n" + sample(tuned))
print("\nwith the Houlsby adapters:\n" + sample(tuned))

# %% [markdown]
# Saving writes PEFT's two files. Bottleneck adapters have no PEFT counterpart, so `peft_type` is minipeft's own
# `"BOTTLENECK"`, with keys in PEFT's style. Load them onto a fresh base and the outputs are identical:

# %%
with tempfile.TemporaryDirectory() as d:
    tuned.save_pretrained(d)
    print(sorted(os.listdir(d)))
    fresh, _ = load_pretrained(MODEL, device=DEVICE)
    loaded = PeftModel.from_pretrained(fresh, d)
    keys = list(loaded.adapter_state_dict("default"))
    print(len(keys), "tensors, e.g.", keys[0])
    x = next(batches(val_data, 2, shuffle=False))["input_ids"].to(DEVICE)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tuned(x).logits)

# %% [markdown]
# ## Summary
#
# * A bottleneck adapter is $h + W_{\text{up}} f(W_{\text{down}} h)$ with its own skip connection; zero
#   $W_{\text{up}}$ makes it the identity at init, and keeps the first gradient on $W_{\text{up}}$ alone.
# * **Houlsby** puts two per block (after attention and after the MLP), **Pfeiffer** one (after the MLP); in a
#   Llama block those are the outputs of `o_proj` and `down_proj`, so an adapter just wraps those layers.
# * Verified in float64: the base gradients equal full fine-tuning's at init; the adapter's gradients match
#   finite differences.
# * **Latency**: adapters add few FLOPs but sequential operations that cannot be merged away; the cost shows
#   where the operations are small (decoding), and merged LoRA has none.
# * It lives in **`minipeft/adapter.py`** (`AdapterConfig`, `AdapterLayer`, `adapter_targets`); `peft.py` does
#   the freezing, counting, saving and loading.
#
# ## Exercises
#
# Each exercise is a function to write: replace `raise NotImplementedError` with your code and run the cell
# below it, which checks your function against the library (or autograd) on its own inputs: "correct", or what
# differs.

# %% [markdown]
# **Exercise 1.** A bottleneck adapter as a plain function of its four tensors, ReLU in the middle. With
# $W_{\text{up}} = 0$ and $b_{\text{up}} = 0$ it must give back $h$ exactly.

# %%
from exercises.l03 import check_adapter_forward, check_adapter_param_count, check_up_grad_at_init


def adapter_forward(h, w_down, b_down, w_up, b_up):
    """a(h) for h (B, T, D), w_down (b, D), b_down (b,), w_up (D, b), b_up (D,) -> (B, T, D).

    Hint: nn.Linear(x) is x @ W.T + bias; the adapter keeps its own skip connection."""
    raise NotImplementedError  # your code


# %%
exercise("adapter_forward", adapter_forward, check_adapter_forward)

# %% [markdown]
# **Exercise 2.** The closed form: how many trainable parameters does `AdapterConfig(bottleneck_size=b,
# placement=...)` add to a model of hidden size $D$ with $L$ blocks? The check compares with
# `get_peft_model(...).num_parameters(trainable_only=True)` on small models.


# %%
def adapter_param_count(D, L, b, placement):
    """-> an int: the trainable parameters of bottleneck adapters of size b, placement "houlsby" or "pfeiffer".

    Hint: count one adapter's tensors (shapes in section 1), then the adapters per block."""
    raise NotImplementedError  # your code


# %%
exercise("adapter_param_count", adapter_param_count, check_adapter_param_count)

# %% [markdown]
# **Exercise 3.** Section 4's gradient: for an adapter (at init or not), write $\partial L / \partial W_{\text{up}}$
# from $g$, the gradient arriving at the adapter's output, and $z$, its bottleneck activation. The check takes
# both from a real backward pass and compares with autograd's gradient.


# %%
def up_grad_at_init(g, z):
    """g (B, T, D) = dL/d(output of the adapter), z (B, T, b) = relu(h W_down^T + b_down) -> dL/dW_up (D, b).

    Hint: W_up's output at one token is W_up z_t; every row and every token contributes."""
    raise NotImplementedError  # your code


# %%
exercise("up_grad_at_init", up_grad_at_init, check_up_grad_at_init)
