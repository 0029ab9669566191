"""The tokenizer against transformers: SmolLM2's GGUF tokenizer (ids, special tokens, chat template), the
folders we write (read back by AutoTokenizer), where special tokens come from in HF-style folders, and long
text encoded in pieces against the same text encoded whole."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken

from minipeft.gguf import read_gguf
from minipeft.tokenizer import PIECE_CHARS, SAFE_CUT, Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, emoji 🤗🚀",
    "line one\nline two\n\n\tindented\r\nwindows line  \n   spaces",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "It's 2024: pi = 3.14159, 1,000,000 people; x1y2 and v2.0.1",
    "def f(x):\n    return x ** 2  # square\n",
    "  leading and trailing spaces   ",
    "<|endoftext|>not special<|im_end",
    "I'll we've they're DON'T",
]


@pytest.fixture(scope="session")
def gguf_metadata(smollm2_gguf):
    return read_gguf(smollm2_gguf)[1]


@pytest.fixture(scope="session")
def tok(gguf_metadata):
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="session")
def hf_tok(smollm2_gguf):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_digits_are_split_first_like_llama_cpp(tok, hf_tok):
    # llama.cpp's "smollm" pre-tokenizer cuts every digit off before GPT-2's regex runs on each piece. It differs
    # from transformers' GGUF tokenizer (GPT-2's regex on the whole text) only for 2+ spaces before a digit.
    text = "room  101,  year  2024"
    pieces = [p for p in re.split(r"(\d)", text) if p]
    reference = [i for p in pieces for i in hf_tok(p, add_special_tokens=False)["input_ids"]]
    assert tok.encode(text) == reference
    assert reference != hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_match_transformers(tok, hf_tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]  # control tokens stay whole
    assert tok.encode("hi", add_bos=True) == [1] + tok.encode("hi")
    assert tok.decode([1, 4093, 2]) == "user"  # and are skipped by decode
    assert not tok.add_bos_token  # the GGUF says SmolLM2 wants no bos


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, system, add_generation_prompt):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?\nThanks"},
    ]
    if system:
        messages = [{"role": "system", "content": "Answer in French."}] + messages
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.encode(ours) == hf_tok(ours, add_special_tokens=False)["input_ids"]


def test_save_and_read_back_here_and_in_transformers(tok, tmp_path):
    import transformers

    tok.save(tmp_path)
    back = Tokenizer.from_file(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert (back.bos_token, back.eos_token, back.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert back.chat_template == tok.chat_template == theirs.chat_template
    assert theirs("hi")["input_ids"] == tok.encode("hi")  # no bos added by transformers either


# ---- HF-style folders: where the special tokens come from ------------------------------------------------------
def tiny_folder(path):
    """A small byte-level BPE trained here, saved as tokenizer.json, with <s> </s> <pad> as special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rust.train_from_iterator(["To be, or not to be, that is the question."] * 20, trainer)
    path.mkdir()
    rust.save(str(path / "tokenizer.json"))
    return path


def write(path, obj):
    path.write_text(json.dumps(obj))


def test_special_tokens_precedence(tmp_path):
    folder = tiny_folder(tmp_path / "t")
    bare = Tokenizer.from_file(folder / "tokenizer.json")
    assert (bare.bos_token_id, bare.eos_token_id, bare.pad_token_id, bare.chat_template) == (None,) * 4
    write(folder / "config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})  # lowest: the model's ids
    t = Tokenizer.from_file(folder)
    assert (t.bos_token, t.eos_token, t.pad_token_id) == ("<s>", "</s>", 2)  # pad falls back to eos
    write(folder / "special_tokens_map.json", {"eos_token": {"content": "<unk>"}, "pad_token": "<pad>"})
    t = Tokenizer.from_file(folder)
    assert (t.bos_token, t.eos_token, t.pad_token) == ("<s>", "<unk>", "<pad>")
    write(folder / "tokenizer_config.json", {"eos_token": "</s>", "chat_template": "{{ x }}", "add_bos_token": True})
    t = Tokenizer.from_file(folder)
    assert (t.bos_token, t.eos_token, t.pad_token, t.chat_template, t.add_bos_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "{{ x }}",
        True,
    )
    assert t.encode("To be", add_bos=True)[0] == 1
    assert t.decode(t.encode("To be, or not")) == "To be, or not"


def test_bad_tokenizers(tmp_path, gguf_metadata):
    with pytest.raises(FileNotFoundError, match="no tokenizer file at .*tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    folder = tiny_folder(tmp_path / "t")
    write(folder / "tokenizer_config.json", {"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="bos_token '<nope>' is not in the vocabulary"):
        Tokenizer.from_file(folder)
    (folder / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_file(folder)
    (folder / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_file(folder)
    with pytest.raises(ValueError, match="add_bos=True but this tokenizer has no bos_token"):
        bare.encode("x", add_bos=True)
    with pytest.raises(ValueError, match="template is missing"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama' is not supported; supported: 'gpt2'"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": "qwen2"})
    other = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.chat_template": "{{ messages }}"})
    with pytest.raises(ValueError, match="only SmolLM2's ChatML template .* a different one"):
        other.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        Tokenizer.from_gguf_metadata(gguf_metadata).apply_chat_template([{"content": "hi"}])


# ---- long text: encode_long equals encode, in bounded pieces ----------------------------------------------------
SONNETS = Path(__file__).parent.parent / "minipeft" / "assets" / "data" / "sonnets.txt"
TRICKY = "It's 2024: x1y2 and v2.0.1 don't  double  spaces,\ttabs\n\nblank lines 日本語 🤗 <|endoftext|> <|im_end|>"


def long_texts():
    text = SONNETS.read_text(encoding="utf-8")  # 95 KB of real verse: apostrophes, punctuation, numbers, newlines
    return [text, text.replace("\n", " "), TRICKY * 200]  # as written, as one single line, and the odd cases


@pytest.mark.parametrize("which", ["tiny-shakespeare", "smollm2"])
def test_encode_long_equals_encode_of_the_whole_text(which, request):
    tok = Tokenizer.from_file(SONNETS.parents[1] / "tiny-shakespeare") if which == "tiny-shakespeare" else None
    tok = tok or request.getfixturevalue("tok")  # SmolLM2's, from the GGUF: digits split first, then GPT-2's regex
    assert tok.cuts_are_exact
    for text in long_texts():
        whole = tok.encode(text)
        assert len(SAFE_CUT.findall(text)) > 1000  # many places to cut: the test cuts at every one of them
        for piece_chars in (1, 97, PIECE_CHARS):
            ids = tok.encode_long(text, piece_chars)
            assert ids.dtype == np.int32 and ids.tolist() == whole
        # The control: cutting anywhere else changes the ids, so the equality above is worth something.
        naive = [i for start in range(0, len(text), 97) for i in tok.encode(text[start : start + 97])]
        assert naive != whole
    assert tok.encode_long("").tolist() == []


def test_encode_long_encodes_whole_where_cuts_would_not_be_exact(tmp_path):
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers as pt

    folder = tiny_folder(tmp_path / "t")
    text = "To be, or not to be, that is the question. " * 30
    for change in (
        lambda r: setattr(r, "normalizer", normalizers.Prepend("▁")),  # every piece would get its own "▁"
        lambda r: setattr(r, "pre_tokenizer", pt.ByteLevel(add_prefix_space=True)),  # and its own space
        lambda r: setattr(r, "pre_tokenizer", pt.Metaspace()),
        lambda r: r.add_tokens([AddedToken("be,", rstrip=True)]),  # eats the space after it
    ):
        tok = Tokenizer.from_file(folder)
        change(tok.tokenizer)
        assert not tok.cuts_are_exact
        assert tok.encode_long(text, piece_chars=5).tolist() == tok.encode(text)
    assert Tokenizer.from_file(folder).cuts_are_exact
