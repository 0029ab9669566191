"""GGUF out: merged models and LoRA adapters for llama.cpp, read back by our loader and by transformers' GGUF loader
(independent of our code), on the bundled model and on SmolLM2-135M."""

import pytest
import torch
from safetensors.torch import load_file

from minipeft import LoraConfig, PeftModel, get_peft_model, load_pretrained
from minipeft.cli import main
from minipeft.gguf import apply_lora, write_model

TEXT = "Shall I compare thee to a summer's day? Thou art more lovely, 1234 and more temperate."


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA adapter on the bundled model, on every linear layer (q and k too: their rows are permuted in GGUF),
    with rsLoRA and random A and B, saved in PEFT's format; -> (adapter folder, the merged model, tokenizer)."""
    folder = tmp_path_factory.mktemp("gguf")
    model, tok = load_pretrained("tiny-shakespeare")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, init_lora_weights=False,
                        base_model_name_or_path="tiny-shakespeare")  # fmt: skip
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)  # a real update, small enough that the adapted model still writes text
    pm.save_pretrained(folder / "adapter")
    return folder, PeftModel.from_pretrained(load_pretrained("tiny-shakespeare")[0], folder / "adapter"), tok


@pytest.mark.parametrize("outtype, bound", [("f32", 1e-6), ("f16", 1e-2), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_merged_model_to_gguf_reads_back_in_ours_and_in_transformers(run, outtype, bound):
    """Logits of the merged model read back from GGUF: f32 exact up to 1e-6 relative, f16/bf16 within 1e-2; Q8_0
    (8-bit blocks of 32 with a float16 scale) measured 3.0e-3 relative on this model, bounded here by 1e-2."""
    import transformers

    folder, pm, tok = run
    ids = torch.tensor([tok.encode(TEXT)])
    expected = pm(ids).logits
    path = folder / f"merged-{outtype}.gguf"
    main(["merge", "--adapter", str(folder / "adapter"), "--gguf", str(path), "--outtype", outtype])
    ours, ours_tok = load_pretrained(path)
    assert rel(ours(ids).logits, expected) <= bound
    assert ours_tok.encode(TEXT) == tok.encode(TEXT) and ours_tok.eos_token_id == tok.eos_token_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
    assert rel(hf(ids).logits, expected) <= max(bound, 1e-5)  # (transformers' own float32 arithmetic: ~1e-7)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
    if outtype == "f32":  # greedy decoding from the file is the merged model's
        prompt = torch.tensor([tok.encode("ROMEO:")])
        assert torch.equal(ours.generate(prompt, 12), pm.generate(prompt, 12))


def test_lora_adapter_to_gguf_applied_to_the_base_equals_the_merged_model(run):
    folder, pm, tok = run
    ids = torch.tensor([tok.encode(TEXT)])
    main(["export", "--adapter", str(folder / "adapter"), "--gguf", str(folder / "lora.gguf")])
    base, _ = load_pretrained("tiny-shakespeare")
    write_model(base, tok, folder / "base.gguf", "f32")
    from_gguf, _ = load_pretrained(folder / "base.gguf")
    apply_lora(from_gguf, folder / "lora.gguf")  # what llama.cpp does with --lora: W += alpha / r * B A
    assert rel(from_gguf(ids).logits, pm(ids).logits) <= 1e-6
    n_pairs = len(load_file(folder / "adapter" / "adapter_model.safetensors")) // 2
    from minipeft.gguf import read_gguf

    reader, md = read_gguf(folder / "lora.gguf")
    assert md["general.type"] == "adapter" and md["adapter.type"] == "lora" and len(reader.tensors) == 2 * n_pairs
    assert md["adapter.lora.alpha"] == pytest.approx(8 * 4**0.5)  # rsLoRA's alpha/sqrt(r), as llama.cpp's alpha/r


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--outtype", "q4"], r"unknown --outtype 'q4'; valid: f32, f16, bf16, q8_0"),
        (["--gguf", "x.bin"], "the file name must end in .gguf"),
    ],
)
def test_merge_gguf_bad_input(run, tmp_path, extra, msg):
    folder = run[0]
    args = ["merge", "--adapter", str(folder / "adapter"), "--gguf", str(tmp_path / "m.gguf"), *extra]
    if "--gguf" in extra:
        args = ["merge", "--adapter", str(folder / "adapter"), *extra]
    with pytest.raises(SystemExit, match=msg):
        main(args)


def test_an_existing_gguf_is_never_overwritten_without_the_flag(run, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"mine")
    for command in (["merge", "--model", "tiny-shakespeare"], ["export", "--adapter", str(run[0] / "adapter")]):
        with pytest.raises(SystemExit, match="exists: choose a new name, or pass --overwrite"):
            main([*command, "--gguf", str(target)])
        assert target.read_bytes() == b"mine"
    main(["export", "--adapter", str(run[0] / "adapter"), "--gguf", str(target), "--overwrite"])
    assert target.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("kind", ["dora", "prefix"])
def test_adapters_llama_cpp_cannot_express_say_to_merge(tmp_path, kind):
    from minipeft import PrefixTuningConfig

    torch.manual_seed(0)
    config = LoraConfig(r=2, use_dora=True) if kind == "dora" else PrefixTuningConfig(num_virtual_tokens=2)
    config.base_model_name_or_path = "tiny-shakespeare"
    get_peft_model(load_pretrained("tiny-shakespeare")[0], config).save_pretrained(tmp_path / "a")
    with pytest.raises(SystemExit, match=r"llama.cpp's adapters are plain LoRA.*merge it into its base instead"):
        main(["export", "--adapter", str(tmp_path / "a"), "--gguf", str(tmp_path / "a.gguf")])
    assert not (tmp_path / "a.gguf").exists()


def test_smollm2_to_gguf_reads_back_in_ours_and_in_transformers(smollm2_gguf, tmp_path):
    """SmolLM2-135M (its Q4_1 GGUF, dequantized) written as f16 GGUF: our loader and transformers' agree with the
    model within f16's rounding, and both tokenizers read back encode digits, spaces and the chat markers alike."""
    import transformers

    model, tok = load_pretrained(smollm2_gguf)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?  Twice:  42"}], add_generation_prompt=True
    )
    ids = torch.tensor([tok.encode(text)])
    expected = model(ids).logits
    main(["merge", "--model", str(smollm2_gguf), "--gguf", str(tmp_path / "s.gguf"), "--outtype", "f16"])
    ours, ours_tok = load_pretrained(tmp_path / "s.gguf")
    assert rel(ours(ids).logits, expected) <= 1e-2
    assert ours_tok.encode(text) == tok.encode(text) and ours_tok.chat_template == tok.chat_template
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32).eval()
    assert rel(hf(ids).logits, expected) <= 1e-2
