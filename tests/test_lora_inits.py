"""PiSSA and OLoRA starts: the model starts unchanged (W_res + s B A = W, float64), A and B are the weight's own
principal part (and HF PEFT's, up to the signs SVD and QR leave free), and PEFT's saving convention (a plain LoRA
relative to the original weight) loads on the original base, in ours and in PEFT.
LoftQ: the base becomes our NF4 of the last residual, the error falls with each alternating step and starts below
QLoRA's, A and B equal HF PEFT's loftq_init (run on the CPU with bitsandbytes' CPU NF4), files cross both ways."""

import copy
import inspect
import json

import pytest
import torch
from helpers import batch, hf_llama, tiny_model

from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.loftq import LoftQConfig
from minipeft.lora import LoraLayer
from minipeft.nf4 import NF4Linear, dequantize_nf4, quantize_nf4

TARGETS = ["q_proj", "v_proj", "down_proj"]


def layers(pm):
    return {n: m for n, m in pm.base_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_the_model_starts_unchanged_and_ba_is_the_weights_principal_part(init):
    base = tiny_model()  # float64
    original = {n: m.weight.clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    ids = batch()["input_ids"]
    ref = base(ids).logits.detach()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    torch.testing.assert_close(pm(ids).logits, ref, rtol=1e-10, atol=1e-12)
    for name, layer in layers(pm).items():
        W, delta = original[name], layer.delta_weight("default")
        torch.testing.assert_close(layer.base_layer.weight + delta, W, rtol=0, atol=1e-12)  # W_res + sBA = W
        if init == "pissa":  # s B A = U_r S_r V_r^T, the best rank-4 approximation
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            torch.testing.assert_close(delta, U[:, :4] * S[:4] @ Vh[:4], rtol=1e-10, atol=1e-12)
        if init == "olora":  # B = Q_r has orthonormal columns, A = R_r is upper triangular
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=B.dtype), rtol=0, atol=1e-12)
            assert torch.equal(A[:, :4], A[:, :4].triu())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_and_b_are_hf_peft_s_up_to_signs(init):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kw))
    mine = get_peft_model(ours, LoraConfig(**kw))
    for name, layer in layers(mine).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A0, B0 = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        sign = torch.sign((A * A0).sum(1))  # each rank-1 pair may come out negated, both its row of A and column of B
        torch.testing.assert_close(A * sign[:, None], A0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B * sign[None, :], B0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, rtol=1e-4, atol=1e-5)


def test_saved_relative_to_the_original_weight_loads_on_the_original_base_in_ours_and_peft(tmp_path):
    import peft

    hf, ours = hf_llama(tie_word_embeddings=False)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    pm = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")  # the adapter right after its init (PEFT's recipe)
    with torch.no_grad():  # "training"
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = batch(T=10)["input_ids"]
    trained = pm(ids).logits.detach()
    pm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    fresh = type(ours)(ours.config).eval()
    fresh.load_state_dict(original)  # the ORIGINAL base, never rewritten
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(loaded(ids).logits, trained, rtol=1e-5, atol=1e-5)
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(hp(ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_bad_inits_are_clear_errors():
    from minipeft.nf4 import quantize_model

    with pytest.raises(ValueError, match=r"init_lora_weights must be .*'pissa_niter_K'.*got 'pissa_niter_x'"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(
        ValueError, match="rewrites the base weight, so it needs a full-precision base, not a NF4Linear"
    ):
        get_peft_model(quantize_model(tiny_model(torch.float32)), LoraConfig(init_lora_weights="pissa"))


# ----------------------------------------------------------------------------------------------------- LoftQ


def loftq(r=4, alpha=8, steps=1, targets=TARGETS):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=steps))  # fmt: skip


def reference_loftq(W, r, steps):
    """LoftQ's alternation written out in float64: -> (the last residual that was quantized, its dequant, the best
    rank-r approximation of W minus it)."""
    res = W
    for _ in range(steps):
        quantized = res
        deq = dequantize_nf4(quantize_nf4(res, double_quant=False)).double()
        U, S, Vh = torch.linalg.svd(W - deq, full_matrices=False)
        low_rank = U[:, :r] * S[:r] @ Vh[:r]
        res = W - low_rank
    return quantized, deq, low_rank


def test_loftq_error_falls_each_step_below_qlora_s_and_q_is_our_nf4_of_the_last_residual():
    base = tiny_model()  # float64
    original = {n: m.weight.clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    pm = get_peft_model(base, loftq(r=4, alpha=8, steps=4))  # s = 2
    ids = batch()["input_ids"]
    for name, layer in layers(pm).items():
        W, q = original[name], layer.base_layer
        assert isinstance(q, NF4Linear) and not q.qweight.nested and q.dtype == torch.float64
        qlora = torch.linalg.matrix_norm(W - dequantize_nf4(quantize_nf4(W, double_quant=False)).double())
        start = torch.linalg.matrix_norm(W - (q.dequantize() + layer.delta_weight("default").detach()))
        errors = layer.loftq_errors
        assert len(errors) == 4 and errors[0] < qlora and all(b < a for a, b in zip(errors, errors[1:])), errors
        assert abs(errors[-1] - float(start)) < 1e-9 * float(start)  # the error reported is the model's
        last_residual, deq, low_rank = reference_loftq(W, 4, 4)
        expected = quantize_nf4(last_residual, double_quant=False)
        assert torch.equal(q.qweight.packed, expected.packed) and torch.equal(q.qweight.absmax, expected.absmax)
        torch.testing.assert_close(layer.delta_weight("default"), low_rank, rtol=1e-9, atol=1e-12)
    # the model computes dequant(Q) + s B A: the same logits as a dense model holding those weights
    dense = tiny_model()
    for name, layer in layers(pm).items():
        dense.get_submodule(name).weight.data.copy_(layer.base_layer.dequantize() + layer.delta_weight("default"))
    torch.testing.assert_close(pm(ids).logits, dense(ids).logits, rtol=1e-10, atol=1e-12)


def peft_loftq_init_on_cpu():
    """HF PEFT's own loftq_init, its source run unchanged but for the compute device: it moves the weight to "cuda"
    (or "xpu") to quantize with bitsandbytes, and bitsandbytes >= 0.45 quantizes NF4 on the CPU as well, with the
    same codes as on CUDA. So PEFT's algorithm runs with bitsandbytes' quantizer, not with ours."""
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count('"cuda"') == 1, "PEFT's loftq_init changed: update this test's device swap"
    namespace = dict(vars(loftq_utils))
    exec(source.replace('"cuda"', '"cpu"'), namespace)  # PEFT's installed source, not remote code
    return namespace["loftq_init"]


@pytest.mark.parametrize("alpha", [4, 16])
def test_loftq_equals_hf_peft_s_loftq_init(monkeypatch, alpha):
    """Through both libraries' get_peft_model, r=4, three steps. PEFT leaves its base as dequant(Q) in float32;
    ours is the NF4 Q itself. With alpha = r (s = 1) A and B equal PEFT's up to signs; with s = 4 PEFT's B A (no 1/s,
    peft#1982) is our s B A, and our start is the one that cancels the error."""
    import peft
    import peft.tuners.lora.layer as peft_layer

    monkeypatch.setattr(peft_layer, "loftq_init", peft_loftq_init_on_cpu())
    hf, ours = hf_llama(tie_word_embeddings=False)
    theirs = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=4,
            lora_alpha=alpha,
            target_modules=TARGETS,
            init_lora_weights="loftq",
            loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=3),
        ),  # fmt: skip
    )
    mine = get_peft_model(ours, loftq(r=4, alpha=alpha, steps=3))
    s = alpha / 4
    for name, layer in layers(mine).items():
        other = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.base_layer.dequantize(), other.base_layer.weight, rtol=0, atol=1e-6)
        A, B = layer.lora_A["default"].weight * s**0.5, layer.lora_B["default"].weight * s**0.5  # s B A = (B')(A')
        A0, B0 = other.lora_A["default"].weight, other.lora_B["default"].weight
        sign = torch.sign((A * A0).sum(1))
        torch.testing.assert_close(A * sign[:, None], A0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B * sign[None, :], B0, rtol=1e-4, atol=1e-5)
    if alpha == 4:
        ids = batch(T=10)["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(mine(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_loftq_saves_as_peft_and_loads_on_the_float_or_the_4_bit_base_in_ours_and_peft(tmp_path, monkeypatch):
    """PEFT writes init_lora_weights 'loftq' and loftq_config as given; loading such a file runs LoftQ again on a
    full-precision base (deterministic: the same Q) before the file's A and B, in PEFT and in ours; ours also loads it
    on the 4-bit base as a plain LoRA (how PEFT's LoftQ recipe loads its saved 4-bit backbone)."""
    import peft
    import peft.tuners.lora.layer as peft_layer

    hf, ours = hf_llama(tie_word_embeddings=False)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    pm = get_peft_model(ours, loftq(r=4, alpha=4, steps=2))
    with torch.no_grad():  # "training"
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = batch(T=10)["input_ids"]
    trained = pm(ids).logits.detach()
    pm.save_pretrained(tmp_path / "loftq")
    saved = json.loads((tmp_path / "loftq" / "adapter_config.json").read_text())
    peft_config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                                  loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2)).to_dict()  # fmt: skip
    for key in ("init_lora_weights", "loftq_config", "r", "lora_alpha"):
        assert saved[key] == peft_config[key], key
    with pytest.raises(ValueError, match="LoftQ adapter is a plain LoRA on its quantized base"):
        pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "loftq")

    fresh = type(ours)(ours.config).eval()
    fresh.load_state_dict(original)  # the original float base: LoftQ quantizes it again
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "loftq")
    assert isinstance(loaded.base_model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    torch.testing.assert_close(loaded(ids).logits, trained, rtol=1e-5, atol=1e-5)
    four_bit = copy.deepcopy(pm).unload()  # the LoftQ base in 4 bits, adapters gone
    torch.testing.assert_close(PeftModel.from_pretrained(four_bit, tmp_path / "loftq")(ids).logits, trained)

    monkeypatch.setattr(peft_layer, "loftq_init", peft_loftq_init_on_cpu())
    hp = peft.PeftModel.from_pretrained(hf, str(tmp_path / "loftq"))  # on the original HF model
    with torch.no_grad():
        torch.testing.assert_close(hp(ids).logits, trained, rtol=1e-4, atol=1e-4)
    hp.save_pretrained(tmp_path / "peft")  # and PEFT's file in ours
    fresh = type(ours)(ours.config).eval()
    fresh.load_state_dict(original)
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path / "peft")(ids).logits, trained,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_bad_loftq_input_is_a_clear_error():
    from minipeft.nf4 import quantize_model

    with pytest.raises(ValueError, match=r"init_lora_weights='loftq' needs loftq_config.*got \{\}"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits must be 4 .*got 8"):
        LoftQConfig(loftq_bits=8)
    with pytest.raises(ValueError, match="loftq_bits must be 4 .*got 2"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})
    with pytest.raises(ValueError, match=r"loftq_iter must be an integer >= 1 .*got 0"):
        LoftQConfig(loftq_iter=0)
    with pytest.raises(ValueError, match=r"loftq_config has unknown keys \['steps'\]"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"steps": 3})
    with pytest.raises(ValueError, match="quantizes the full-precision weight itself, so it needs an nn.Linear base"):
        get_peft_model(quantize_model(tiny_model(torch.float32)), loftq())
    with pytest.warns(UserWarning, match="loftq_config is ignored unless init_lora_weights='loftq'"):
        assert LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1}).loftq_config == {}
