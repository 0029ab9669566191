"""Checks for lesson 10's exercises: each calls your function on fixed inputs and compares it with an independent
reference (minipeft's JSONL loader, the model's own loss, merge_and_unload on an adapter read back from disk); it
raises AssertionError saying what differs, never what the answer is."""

import json
import tempfile
from pathlib import Path

import torch
from common import check_close

PAIRS = [
    ("Continue this line of a Shakespeare sonnet with the line that follows it:\nShall I compare thee",
     "Thou art more lovely and more temperate:"),
    ("Say 'hi'.", "hi"),
    ("Two lines,\nplease — with a dash.", "Rough winds do shake\nthe darling buds of May,"),
    ("  spaces around  ", " a leading space and a trailing one "),
]  # fmt: skip


def _smollm2_tokenizer():
    from minipeft.checkpoint import download
    from minipeft.tokenizer import Tokenizer

    return Tokenizer.from_file(download("smollm2-135m-instruct"))


def check_build_example(build_example):
    """Against minipeft's load_dataset on a JSONL file of the same pairs (chat format on), with SmolLM2's
    tokenizer: the same input_ids and labels, example by example."""
    from minipeft.data import load_jsonl_dataset

    tok = _smollm2_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pairs.jsonl"
        rows = PAIRS + [("held out", "x")]  # the loader holds out the last example
        path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows), encoding="utf-8")
        train, _ = load_jsonl_dataset(path, tok, seq_len=4096, val_fraction=1 / len(rows), chat=True)
    assert len(train) == len(PAIRS)
    for i, (prompt, response) in enumerate(PAIRS):
        out = build_example(tok, prompt, response)
        assert isinstance(out, tuple) and len(out) == 2, "return a tuple (input_ids, labels)"
        ids, labels = (list(map(int, x)) for x in out)
        want_ids, want_labels = train.input_ids[i].tolist(), train.labels[i].tolist()
        assert len(ids) == len(labels), f"pair {i}: {len(ids)} input_ids but {len(labels)} labels"
        assert len(ids) == len(want_ids), (
            f"pair {i}: {len(ids)} tokens, expected {len(want_ids)} "
            f"({'too many' if len(ids) > len(want_ids) else 'too few'})"
        )
        bad = [t for t, (a, b) in enumerate(zip(ids, want_ids)) if a != b]
        assert not bad, f"pair {i}: input_ids differ at {len(bad)} positions, the first at position {bad[0]}"
        n_masked, want_masked = sum(y == -100 for y in labels), sum(y == -100 for y in want_labels)
        assert n_masked == want_masked, f"pair {i}: {n_masked} positions labelled -100, expected {want_masked}"
        bad = [t for t, (a, b) in enumerate(zip(labels, want_labels)) if a != b]
        assert not bad, f"pair {i}: labels differ at {len(bad)} positions, the first at position {bad[0]}"


def _tiny_model(dtype=torch.float64):
    from minipeft.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return Transformer(cfg).to(dtype)


def check_response_loss(response_loss):
    """Against the model's own loss (labels shifted inside, mean over every target of the batch), in float64, on a
    batch whose rows have different numbers of targets: masked prompts and right padding."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt of 4 tokens
    labels[1, :7] = -100  # a longer prompt
    labels[2, :2], labels[2, 9:] = -100, -100  # a prompt, and right padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits.detach().clone().requires_grad_(True)
    ours = response_loss(logits, labels.clone())
    assert isinstance(ours, torch.Tensor), f"expected a tensor, got {type(ours).__name__}"
    assert ours.dim() == 0, f"expected a scalar (a 0-d tensor), got shape {tuple(ours.shape)}"
    check_close("the loss", ours.detach(), out.loss.detach(), rtol=1e-10, atol=1e-12)
    ours.backward()
    reference = out.logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)).backward()
    assert logits.grad is not None, "no gradient reaches the logits: compute the loss from them"
    check_close("dloss/dlogits", logits.grad, reference.grad, rtol=1e-8, atol=1e-12)


def check_merge_from_files(merge_from_files):
    """An adapter saved by save_pretrained and read back from its two files, with and without rsLoRA; every adapted
    layer against merge_and_unload()'s weight."""
    from safetensors.torch import load_file

    from minipeft.lora import LoraConfig
    from minipeft.peft import get_peft_model

    for rslora in (False, True):
        model = _tiny_model(torch.float32)
        base = {n: p.detach().clone() for n, p in model.state_dict().items()}
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=rslora,
                            init_lora_weights=False)  # fmt: skip
        peft_model = get_peft_model(model, config)
        with tempfile.TemporaryDirectory() as d:
            peft_model.save_pretrained(d)
            tensors = load_file(str(Path(d) / "adapter_model.safetensors"))
            cfg = json.loads((Path(d) / "adapter_config.json").read_text())
        merged = peft_model.merge_and_unload().state_dict()
        modules = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors
                   if k.endswith("lora_A.weight")]  # fmt: skip
        assert len(modules) == 4
        for module in modules:
            ours = merge_from_files(base[module + ".weight"].clone(), dict(tensors), dict(cfg), module)
            check_close(f"{module} (rsLoRA {rslora})", ours, merged[module + ".weight"], rtol=1e-5, atol=1e-6)


CHECKS = {
    "build_example": check_build_example,
    "response_loss": check_response_loss,
    "merge_from_files": check_merge_from_files,
}
