"""QLoRA: LoRA on an NF4 base equals LoRA on the dense model whose weights are dequantize(quantize(W))."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import batch, tiny_model

import minipeft
from minipeft.gradcheck import lora_gradient_identity, max_error
from minipeft.lora import LoraConfig
from minipeft.nf4 import NF4Linear, memory_report, quantize_model
from minipeft.peft import get_peft_model

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def qlora_and_dense_reference(double_quant=True):
    base = tiny_model(dtype=torch.float64, intermediate_size=128)  # 64- and 128-wide: whole blocks per row
    quantized = quantize_model(copy.deepcopy(base), blocksize=64, double_quant=double_quant)
    dense = copy.deepcopy(base)
    with torch.no_grad():  # the reference: a plain float64 model holding exactly the dequantized weights
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Linear):
                dense.get_submodule(name).weight.copy_(m.dequantize())
    torch.manual_seed(5)
    q = get_peft_model(quantized, LoraConfig(**CFG))
    torch.manual_seed(5)
    d = get_peft_model(dense, LoraConfig(**CFG))
    return q, d


@pytest.mark.parametrize("double_quant", [True, False])
def test_lora_and_input_gradients_equal_dense_dequantized_model(double_quant):
    q, d = qlora_and_dense_reference(double_quant)
    b = batch()
    grads = []
    for pm in (q, d):
        emb = pm.base_model.model.embed_tokens(b["input_ids"]).detach().requires_grad_(True)
        loss = pm(inputs_embeds=emb, labels=b["labels"]).loss
        loss.backward()
        grads.append((loss.item(), emb.grad, {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}))
    (lq, eq, gq), (ld, ed, gd) = grads
    assert lq == pytest.approx(ld, rel=1e-12)
    torch.testing.assert_close(eq, ed, rtol=1e-10, atol=1e-14)
    assert gq.keys() == gd.keys() and len(gq) == 2 * 7 * 2
    for n in gq:
        torch.testing.assert_close(gq[n], gd[n], rtol=1e-10, atol=1e-14)


def test_qlora_gradient_identity_against_full_finetuning_of_merged_weight():
    q, _ = qlora_and_dense_reference()
    assert max_error(lora_gradient_identity(q, batch(pad_left=2))) < 1e-9


def test_bits_per_parameter_and_counting():
    base = tiny_model(dtype=torch.float32, intermediate_size=128)
    n_dense = sum(p.numel() for p in base.parameters())
    model = quantize_model(base, blocksize=64, double_quant=True)
    report = memory_report(model)
    # per layer: 4 bits a weight, one 8-bit absmax per 64 weights, one float32 per 256 absmax (per started block)
    sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear)]
    bits = sum(4 * n + 8 * -(-n // 64) + 32 * -(-n // (64 * 256)) for n in sizes)
    assert report["bits_per_param"] == pytest.approx(bits / sum(sizes), abs=1e-12)
    big = memory_report(quantize_model(torch.nn.Linear(1024, 2048)))  # whole nested blocks: the 4.127 of the paper
    assert big["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-12)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert pm.num_parameters() == n_dense + pm.num_parameters(trainable_only=True)
    no_dq = memory_report(quantize_model(tiny_model(dtype=torch.float32, intermediate_size=128), double_quant=False))
    assert no_dq["bits_per_param"] == pytest.approx(4.5, abs=1e-9)


def test_merge_on_4bit_base_is_exact_in_full_precision_and_requantizing_costs():
    q, d = qlora_and_dense_reference()
    ids = batch()["input_ids"]
    adapted = q(ids).logits.detach()
    with pytest.raises(TypeError, match="cannot merge in place into a NF4Linear base; use merge_and_unload"):
        q.merge_adapter()
    merged = copy.deepcopy(q).merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-10, atol=1e-12)
    requantized = q.merge_and_unload(requantize=True)
    assert sum(isinstance(m, NF4Linear) for m in requantized.modules()) == 2 * 7
    report = q.merge_report
    assert len(report) == 14 and all(r["requantize_error"] > 0 and r["delta_norm"] > 0 for r in report.values())
    assert (requantized(ids).logits - adapted).abs().max() > 1e-6  # no longer exact


# bitsandbytes 0.50's CPU dequantization is wrong when blocks cross rows (in_features % blocksize != 0 on AVX-512
# machines), so every in_features here is a multiple of the blocksize; our own round trip has no such limit.
@pytest.mark.parametrize("blocksize, double_quant, hidden", [(64, True, 64), (64, False, 64), (128, True, 128)])
def test_4bit_checkpoint_round_trips_and_loads_in_transformers_bitsandbytes(tmp_path, blocksize, double_quant, hidden):
    import transformers

    from minipeft.checkpoint import load_pretrained, save_pretrained

    base = tiny_model(dtype=torch.float32, hidden_size=hidden, intermediate_size=2 * hidden)
    model = quantize_model(base, blocksize, double_quant)
    ids = batch()["input_ids"]
    ref = model(ids).logits.detach()
    save_pretrained(model, tmp_path)
    ours, _ = load_pretrained(tmp_path)
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == 14
    torch.testing.assert_close(ours(ids).logits, ref, rtol=0, atol=0)
    # device_map="cpu": with a GPU, transformers puts a bitsandbytes-quantized model on cuda:0 by default
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    hf.train()  # bitsandbytes' eval-mode CPU kernel repacks the weight and rounds differently
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-5, atol=1e-5)


# Run in a fresh process: the peak resident memory (VmHWM) of loading argv[2], after a warm-up load of argv[1] has
# paged in the code of every op the load runs, and after every tensor of the loaded model has been read (safetensors
# maps the file: a tensor nobody reads is not resident yet, and the model is not loaded until it is).
PEAK_OF_LOAD = r"""
import re, sys
from minipeft import load_pretrained

def status_bytes(key):  # a line of /proc/self/status, in bytes
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

load_pretrained(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # Linux >= 4.0: the peak (VmHWM) starts again from the current RSS
before = status_bytes("VmRSS")
model, _ = load_pretrained(sys.argv[2])
for t in model.state_dict().values():  # the 4-bit codes and statistics (bnb's keys) and every other tensor
    t.max()
print(status_bytes("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loading_a_4bit_checkpoint_peaks_under_twice_its_packed_size(tmp_path):
    """Loading keeps what it reads: the file's tensors become the model's (load_state_dict(assign=True)), 4-bit
    codes and statistics as stored, so the loaded model is 1x the file. Before that, each NF4Linear is made empty
    (NF4Weight.empty): codes from torch.empty (never written, so never resident), absmax zeros (1/8 of a bit a
    weight); the rest is small (metadata, the 16- and 256-entry tables). So the peak is the file plus small change,
    under 2x. A placeholder quantized from a dense zero (out, in) matrix, as before, holds the largest layer in bf16
    (2 bytes a weight, 4x its codes) and, while quantizing it, float32 copies and int64 bucket indices: over 2x the
    whole file whenever that layer is more than a few percent of the model. Measured on this 16M-weight layer
    (9.2 MB file): 1.04x now, 16x before (147 MB)."""
    kw = dict(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8)
    big = quantize_model(tiny_model(torch.bfloat16, num_hidden_layers=1, **kw))  # 16M weights, 4M in each MLP Linear
    minipeft.save_pretrained(big, tmp_path / "big")
    minipeft.save_pretrained(quantize_model(tiny_model(torch.bfloat16)), tmp_path / "warm")
    packed = (tmp_path / "big" / "model.safetensors").stat().st_size  # nearly all of it 4-bit codes
    package = str(Path(minipeft.__file__).parent.parent)  # the minipeft under test, not another installed one
    run = [sys.executable, "-c", PEAK_OF_LOAD, str(tmp_path / "warm"), str(tmp_path / "big")]
    result = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": package})
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    assert 0.9 * packed < peak < 2 * packed, (peak, packed)  # the loaded model seen, and little more


def test_compiled_qlora_recomputes_the_dense_weights_instead_of_keeping_them():
    """Under compile_blocks, what a QLoRA step keeps for backward holds no dense (out, in) weight (the compiler
    would otherwise merge the two dequantizations and keep W), and the gradients equal the eager step's."""
    torch._dynamo.reset()
    base = quantize_model(tiny_model(torch.float32, hidden_size=128, intermediate_size=256))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    dense = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    ids = batch()["input_ids"]

    def step():
        model.zero_grad(set_to_none=True)
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        return shapes, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_shapes, eager_grads = step()
    model.compile_blocks()
    step()  # compiles
    shapes, grads = step()
    assert not dense & set(eager_shapes)
    assert not dense & set(shapes), sorted(dense & set(shapes))
    for n, g in eager_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)
