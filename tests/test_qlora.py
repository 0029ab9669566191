"""QLoRA: LoRA on an NF4 base equals LoRA on the dense model whose weights are dequantize(quantize(W))."""

import copy

import pytest
import torch
from helpers import batch, tiny_model

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
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    hf.train()  # bitsandbytes' eval-mode CPU kernel repacks the weight and rounds differently
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, rtol=1e-5, atol=1e-5)


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
