"""data.py against hand-computed references: packing, splits, loss masks, errors, batch order, padding, the
files it reads (or refuses), what it warns about, the chat format (against SmolLM2's), and memory on a long line."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft
from minipeft.data import (
    Dataset,
    batch_stream,
    batches,
    collate,
    epoch_order,
    load_dataset,
    load_text_dataset,
)
from minipeft.instructions import load_jsonl_dataset
from minipeft.tokenizer import PIECE_CHARS

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?'\n:0123456789"


class CharTokenizer:
    """Ids 0 pad, 1 bos, 2 eos, then one id per character. encode adds no special tokens."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self):
        self.stoi = {c: i + 3 for i, c in enumerate(ALPHABET)}
        self.itos = {i: c for c, i in self.stoi.items()}

    def encode(self, text):
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos.get(i, "") for i in ids)


class BosTokenizer(CharTokenizer):
    """Like a Llama tokenizer: encode() puts bos first."""

    def encode(self, text):
        return [self.bos_token_id] + super().encode(text)


TOK = CharTokenizer()


def corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(ALPHABET), n))


# ------------------------------------------------------------------------------------------- plain text


def test_text_packing_and_split_are_exact_contiguous_and_disjoint(tmp_path):
    text = corpus(1000)
    (tmp_path / "c.txt").write_text(text)
    train, val = load_text_dataset(tmp_path / "c.txt", TOK, seq_len=16, val_fraction=0.1)
    stream = torch.tensor(TOK.encode(text))
    # 1000 tokens: the last 100 are validation; 900 // 16 = 56 training blocks, 100 // 16 = 6 validation blocks
    assert (len(train), len(val)) == (56, 6)
    for i, block in enumerate(train.input_ids):  # block i is stream[16 i : 16 i + 16], all of it before 900
        assert torch.equal(block, stream[16 * i : 16 * i + 16])
        assert torch.equal(train.labels[i], block)  # every token is a target (the shift is in the model)
    for j, block in enumerate(val.input_ids):  # validation starts at token 900, never earlier
        assert torch.equal(block, stream[900 + 16 * j : 900 + 16 * j + 16])
    assert 16 * len(train) <= 900
    assert train.pad_token_id == TOK.pad_token_id


def test_directory_reads_sorted_txt_files_joined_by_eos(tmp_path):
    (tmp_path / "b.txt").write_text("bbbb" * 20)
    (tmp_path / "a.txt").write_text("aaaa" * 20)
    (tmp_path / "z.md").write_text("ignored")
    train, val = load_text_dataset(tmp_path, TOK, seq_len=8, val_fraction=0.25)
    stream = TOK.encode("aaaa" * 20) + [TOK.eos_token_id] + TOK.encode("bbbb" * 20)  # 161 tokens, 40 held out
    got = torch.cat(train.input_ids).tolist() + torch.cat(val.input_ids).tolist()
    assert got == stream[: 121 // 8 * 8] + stream[121 : 121 + 40 // 8 * 8]
    # a list of files works the same
    train2, _ = load_text_dataset([tmp_path / "a.txt", tmp_path / "b.txt"], TOK, seq_len=8, val_fraction=0.25)
    assert all(torch.equal(x, y) for x, y in zip(train.input_ids, train2.input_ids))


def test_too_short_names_file_counts_and_the_exact_minimum(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(corpus(30))
    with pytest.raises(ValueError, match=r"tiny\.txt.*30 tokens.*seq_len=16") as e:
        load_text_dataset(path, TOK, seq_len=16, val_fraction=0.1)
    needed = int(re.search(r"needs at least (\d+) tokens", str(e.value)).group(1))
    fits = [n for n in range(32, 400) if round(n * 0.1) >= 16 and n - round(n * 0.1) >= 16]
    assert needed == fits[0]  # brute force: the smallest n whose split holds one block on each side
    path.write_text(corpus(needed))
    train, val = load_text_dataset(path, TOK, seq_len=16, val_fraction=0.1)
    assert len(val) == 1 and len(train) >= 1
    path.write_text(corpus(needed - 1))
    with pytest.raises(ValueError, match="too short"):
        load_text_dataset(path, TOK, seq_len=16, val_fraction=0.1)


def test_missing_path_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_text_dataset(tmp_path / "nope", TOK, seq_len=8)
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text_dataset(tmp_path, TOK, seq_len=8)
    (tmp_path / "a.txt").write_text(corpus(500))
    with pytest.raises(ValueError, match="val_fraction"):
        load_text_dataset(tmp_path / "a.txt", TOK, seq_len=8, val_fraction=0.0)
    with pytest.raises(ValueError, match="seq_len"):
        load_text_dataset(tmp_path / "a.txt", TOK, seq_len=1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(40, 400), seq_len=st.integers(2, 20), frac=st.floats(0.05, 0.5))
def test_packing_invariants(tmp_path_factory, n, seq_len, frac):
    path = tmp_path_factory.mktemp("p") / "t.txt"
    path.write_text(corpus(n, seed=n))
    n_val = round(n * frac)
    if min(n - n_val, n_val) < seq_len:
        with pytest.raises(ValueError, match="too short"):
            load_text_dataset(path, TOK, seq_len, frac)
        return
    train, val = load_text_dataset(path, TOK, seq_len, frac)
    assert (len(train), len(val)) == ((n - n_val) // seq_len, n_val // seq_len)
    stream = TOK.encode(path.read_text())
    assert torch.cat(train.input_ids).tolist() == stream[: len(train) * seq_len]
    assert torch.cat(val.input_ids).tolist() == stream[n - n_val : n - n_val + len(val) * seq_len]


# ------------------------------------------------------------------------------------- instruction data


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_labels_mask_the_prompt_and_end_with_eos(tmp_path):
    records = [{"prompt": "q: hi", "response": " hello"}, {"text": "just text"}, {"prompt": "ab", "response": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", records * 3)  # 9 examples: 8 train, 1 val
    train, val = load_jsonl_dataset(path, TOK, seq_len=32, val_fraction=0.1)
    assert (len(train), len(val)) == (8, 1)
    eos = TOK.eos_token_id
    p, r = TOK.encode("q: hi"), TOK.encode(" hello")
    assert train.input_ids[0].tolist() == p + r + [eos]
    assert train.labels[0].tolist() == [-100] * len(p) + r + [eos]
    t = TOK.encode("just text")
    assert train.input_ids[1].tolist() == t + [eos] and train.labels[1].tolist() == t + [eos]
    assert val.input_ids[0].tolist() == TOK.encode("abc") + [eos]  # the last example is the held-out one
    assert val.labels[0].tolist() == [-100, -100] + TOK.encode("c") + [eos]


def test_jsonl_truncates_to_seq_len_and_drops_examples_with_nothing_to_learn(tmp_path):
    records = [{"prompt": "abc", "response": "defghij"}, {"prompt": "abcdefgh", "response": "x"}, {"text": "xyz"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.warns(UserWarning) as caught:
        train, val = load_jsonl_dataset(path, TOK, seq_len=6, val_fraction=0.5)
    dropped, cut = (str(w.message) for w in caught)
    assert re.search(r"dropped 1 example.* at line\(s\) \[2\]", dropped)
    assert "1 of 2 examples are longer than seq_len=6 (the longest has 11 tokens)" in cut
    assert train.input_ids[0].tolist() == TOK.encode("abcdef")  # truncated: eos cut off too
    assert train.labels[0].tolist() == [-100] * 3 + TOK.encode("def")
    assert val.input_ids[0].tolist() == TOK.encode("xyz") + [TOK.eos_token_id]


def test_jsonl_with_an_encode_that_adds_bos_keeps_one_bos(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": "cd"}] * 2)
    train, _ = load_jsonl_dataset(path, BosTokenizer(), seq_len=16)
    assert train.input_ids[0].tolist() == [1] + TOK.encode("abcd") + [2]
    assert train.labels[0].tolist() == [-100, -100, -100] + TOK.encode("cd") + [2]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('"a string"', "expected a JSON object, got a str"),
        ('{"prompt": "a"}', r"missing key\(s\) \['response'\]"),
        ('{"response": "a"}', r"missing key\(s\) \['prompt'\]"),
        ('{"prompt": 1, "response": "b"}', "'prompt' must be a string, got int"),
        ('{"prompt": "a", "response": null}', "'response' must be a string, got NoneType"),
        ('{"text": ["a"]}', "'text' must be a string, got list"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", bad, {"text": "fine too"}])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):  # 1-based; the blank line counts
        load_jsonl_dataset(path, TOK, seq_len=16)


def test_jsonl_split_needs_an_example_on_each_side(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "only"}])
    with pytest.raises(ValueError, match=r"one\.jsonl: 1 usable example"):
        load_jsonl_dataset(path, TOK, seq_len=16)
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "first"}, {"text": "second"}])
    train, val = load_jsonl_dataset(path, TOK, seq_len=16, val_fraction=0.01)  # rounds to 0: at least one
    assert (len(train), len(val)) == (1, 1)
    assert load_dataset(path, TOK, 16)[1].input_ids[0].tolist() == TOK.encode("second") + [2]


# ------------------------------------------------------------------------------------- padding, batches


def test_collate_right_pads_for_training_and_left_pads_for_generation():
    rows = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    labels = [torch.tensor([-100, 6, 7]), torch.tensor([8])]
    b = collate(rows, labels, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    g = collate(rows, pad_token_id=0, padding_side="left")
    assert g["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and g["labels"] is None
    assert g["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    same = collate([torch.tensor([1, 2]), torch.tensor([3, 4])], [torch.tensor([1, 2]), torch.tensor([3, 4])])
    assert same["attention_mask"] is None and same["input_ids"].tolist() == [[1, 2], [3, 4]]  # the fast path


def toy_dataset(n=10):
    rows = [torch.arange(i, i + 1 + i % 3) for i in range(n)]  # lengths 1, 2, 3, 1, ...
    return Dataset(rows, rows, pad_token_id=0)


def first_ids(batch_list):
    return [b["input_ids"][:, 0].tolist() for b in batch_list]  # row i starts with its example's index


def test_batches_are_a_pure_function_of_seed_and_epoch():
    data = toy_dataset()
    a = first_ids(batches(data, 3, seed=7, epoch=2))
    torch.manual_seed(123)  # global RNG state plays no part
    np.random.seed(321)
    assert first_ids(batches(data, 3, seed=7, epoch=2)) == a
    assert sum(a, []) == epoch_order(10, 7, 2)[:9].tolist()  # drop_last: 3 batches of 3
    assert first_ids(batches(data, 3, seed=7, epoch=3)) != a  # another epoch, another order
    assert first_ids(batches(data, 3, seed=8, epoch=2)) != a
    for epoch in range(5):  # each epoch is a permutation
        assert sorted(epoch_order(10, 7, epoch).tolist()) == list(range(10))
    assert sum(first_ids(batches(data, 4, shuffle=False, drop_last=False)), []) == list(range(10))


def test_batch_stream_resumed_at_k_equals_the_uninterrupted_stream():
    data = toy_dataset()
    stream = batch_stream(data, 3, seed=1)
    full = [next(stream) for _ in range(10)]  # 3 batches an epoch: crosses three epoch boundaries
    assert first_ids(full[:3]) == first_ids(batches(data, 3, seed=1, epoch=0))
    assert first_ids(full[3:6]) == first_ids(batches(data, 3, seed=1, epoch=1))
    for k in (1, 3, 5, 7):
        resumed = batch_stream(data, 3, seed=1, start=k)
        for want in full[k:]:
            got = next(resumed)
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    with pytest.raises(ValueError, match="larger than the dataset"):
        next(batch_stream(data, 11, seed=0))


# ------------------------------------------------------------------------ which loader, and what it may read


def masked(dataset):
    """The examples as (prompt ids, target ids): the -100 positions, then the rest."""
    return [(x[y == -100].tolist(), x[y != -100].tolist()) for x, y in zip(dataset.input_ids, dataset.labels)]


PAIRS = [{"prompt": "q: hi", "response": " hello"}, {"text": "just text"}, {"prompt": "ab", "response": "c"}] * 2


def test_jsonl_in_any_case_and_json_arrays_or_lines_are_instruction_data(tmp_path):
    want = masked(load_jsonl_dataset(write_jsonl(tmp_path / "d.jsonl", PAIRS), TOK, 32, 0.2)[0])
    assert want[0] == (TOK.encode("q: hi"), TOK.encode(" hello") + [2])  # the prompt is masked
    array = json.dumps(PAIRS, indent=2)  # HF datasets' to_json(lines=False): one JSON array, pretty-printed here
    (tmp_path / "array.json").write_text(array)
    (tmp_path / "ARRAY.JSON").write_text(array)
    lines = [write_jsonl(tmp_path / "upper.JSONL", PAIRS), write_jsonl(tmp_path / "lines.json", PAIRS)]
    for path in lines + [tmp_path / "array.json", tmp_path / "ARRAY.JSON"]:
        assert masked(load_dataset(path, TOK, 32, 0.2)[0]) == want, path.name


@pytest.mark.parametrize(
    "content, message",
    [
        ('{\n  "prompt": "a",\n  "response": "b"\n}', r"one\.json:1: not valid JSON .*a JSON array"),  # pretty-printed
        ("42", r"one\.json:1: expected a JSON object, got a int"),
        ('[{"text": "a"}, {"prompt": "b"}]', r"one\.json\[1\]: missing key\(s\) \['response'\]"),
        ('[{"text": "a"},\n  {"text": "b"]', r"one\.json: not valid JSON .* line 2 column"),
        ('[{"text": "a"}, "b"]', r"one\.json\[1\]: expected a JSON object, got a str"),
    ],
)
def test_json_that_is_neither_an_array_of_examples_nor_json_lines_names_the_file(tmp_path, content, message):
    (tmp_path / "one.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset(tmp_path / "one.json", TOK, 16)


def test_non_regular_files_say_what_they_are_and_a_directory_is_always_text(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)  # a named pipe: opening it to read would wait for a writer forever
    with pytest.raises(ValueError, match=r"pipe\.txt is not a regular file \(it is a FIFO\)"):
        load_dataset(fifo, TOK, 8)
    for load in (load_dataset, load_jsonl_dataset):
        with pytest.raises(ValueError, match=r"/dev/null is not a regular file \(it is a character device\)"):
            load("/dev/null", TOK, 8)
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: .*nope\.jsonl"):
        load_dataset(tmp_path / "nope.jsonl", TOK, 8)
    folder = tmp_path / "x.jsonl"  # a directory, whatever its name, is a folder of .txt files
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.txt files in directory .*x\.jsonl"):
        load_dataset(folder, TOK, 8)
    (folder / "a.TXT").write_text(corpus(400))
    train, val = load_dataset(folder, TOK, 8)
    assert torch.cat(train.input_ids).tolist() == TOK.encode(corpus(400))[: len(train) * 8]
    with pytest.raises(ValueError, match=r"x\.jsonl is a directory, not a file"):
        load_jsonl_dataset(folder, TOK, 8)


def test_bytes_that_are_not_utf8_name_the_file_and_the_offset(tmp_path):
    good = corpus(300).encode()
    (tmp_path / "bad.txt").write_bytes(good[:123] + b"\xff" + good[123:])
    with pytest.raises(ValueError, match=r"^\S*bad\.txt: not UTF-8 text \(byte 0xff at byte offset 123: .*\)"):
        load_dataset(tmp_path / "bad.txt", TOK, 8)
    first = json.dumps({"text": "fine"}).encode() + b"\n"  # 17 bytes; the bad byte is the 6th of line 2
    (tmp_path / "bad.jsonl").write_bytes(first + b'{"te\xe9xt": "latin-1"}\n' + first)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset 21: "):
        load_dataset(tmp_path / "bad.jsonl", TOK, 8)
    (tmp_path / "bad.json").write_bytes(b'[{"text": "\xc3"}]')  # a 2-byte sequence cut short
    with pytest.raises(ValueError, match=r"bad\.json: not UTF-8 text \(byte 0xc3 at byte offset 11: "):
        load_dataset(tmp_path / "bad.json", TOK, 8)


# ------------------------------------------------------------------------------------ what training loses


def test_examples_cut_at_seq_len_warn_once_that_they_lose_their_eos(tmp_path):
    records = [{"prompt": "ab", "response": "cdefghij"}] * 3 + [{"prompt": "ab", "response": "c"}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.warns(UserWarning) as caught:
        train, _ = load_jsonl_dataset(path, TOK, seq_len=8, val_fraction=0.25)
    assert len(caught) == 1
    assert re.search(
        r"long\.jsonl: 3 of 4 examples are longer than seq_len=8 \(the longest has 11 tokens\) and were cut: "
        r"they lose their eos, so the model will not learn to stop",
        str(caught[0].message),
    )
    assert train.input_ids[0].tolist() == TOK.encode("abcdefgh")  # cut: no eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at seq_len 11 everything fits: no warning at all
        load_jsonl_dataset(path, TOK, seq_len=11, val_fraction=0.25)


def test_empty_responses_warn_and_all_empty_is_refused(tmp_path):
    some = write_jsonl(
        tmp_path / "some.jsonl", [{"prompt": "ab", "response": ""}, {"prompt": "a", "response": "b"}] * 2
    )
    with pytest.warns(UserWarning, match=r"some\.jsonl: 2 of 4 responses are empty: those examples teach only eos"):
        train, _ = load_jsonl_dataset(some, TOK, seq_len=8, val_fraction=0.25)
    assert train.labels[0].tolist() == [-100, -100, 2]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "ab", "response": ""}] * 4)
    with pytest.raises(
        ValueError, match=r"empty\.jsonl: all 4 responses are empty, so all there is to learn is to stop at once"
    ):
        load_jsonl_dataset(empty, TOK, seq_len=8)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "ab", "response": ""}] * 3 + [{"text": "abc"}])
    with pytest.warns(UserWarning, match="3 of 4 responses are empty"):  # the text line has something to learn
        load_jsonl_dataset(mixed, TOK, seq_len=8, val_fraction=0.25)


# ---------------------------------------------------------------------------------- memory on one long line

MEMORY_CHECK = """
import importlib, os, resource, sys, types
package = types.ModuleType("minipeft")  # the package without its __init__: tokenizer.py and files.py, no torch
package.__path__ = [os.path.dirname(sys.argv[1])]
sys.modules["minipeft"] = package
module = importlib.import_module("minipeft.tokenizer")
tok = module.Tokenizer.from_file(sys.argv[2])
text = open(sys.argv[3], encoding="utf-8").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak so far, in KiB on Linux
ids = tok.encode_long(text)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, len(ids))
"""


class LongestSeen:
    """Stands in for a `tokenizers.Tokenizer` and remembers the longest string it was asked to encode."""

    def __init__(self, rust):
        self.rust, self.longest = rust, 0

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.rust.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.rust, name)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux (bytes on macOS)")
def test_a_long_single_line_is_tokenized_in_bounded_memory(tmp_path):
    assets = Path(minipeft.__file__).parent / "assets"
    line = (assets / "data" / "sonnets.txt").read_text().replace("\n", " ")
    path = tmp_path / "line.txt"
    path.write_text((line * 23)[: 2 << 20])  # 2 MiB on one line: ~610 K tokens of the bundled tokenizer
    tokenizer_py = Path(minipeft.__file__).parent / "tokenizer.py"
    argv = [sys.executable, "-c", MEMORY_CHECK, str(tokenizer_py), str(assets / "tiny-shakespeare"), str(path)]
    grown_mib, n_tokens = map(float, subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split())
    assert n_tokens > 500_000
    # Encoded whole, `tokenizers` takes ~180 bytes a character: ~370 MiB here, 7.7 GB for the 50 MB line.
    # In pieces of 64 Ki characters it holds ~12 MiB at a time, and keeps the int32 ids (2.4 MiB) and the ids of
    # the pieces until they are joined (2.4 MiB more). 48 MiB leaves room for the allocator's slack and is still
    # 7x below the cost of the whole text.
    assert grown_mib < 48, f"tokenizing 2 MiB on one line grew the peak memory by {grown_mib:.0f} MiB"
    # load_text_dataset goes through those pieces, and gets the ids of the whole line
    tok = minipeft.Tokenizer.from_file(assets / "tiny-shakespeare")
    path.write_text(line * 2)  # 190 K characters: three pieces
    tok.tokenizer = spy = LongestSeen(tok.tokenizer)
    train, val = load_text_dataset(path, tok, seq_len=64, val_fraction=0.5)
    assert 0 < spy.longest <= PIECE_CHARS + 100  # a cut comes a word after the piece length at most
    ids = torch.cat(train.input_ids + val.input_ids).tolist()
    whole = spy.rust.encode(line * 2, add_special_tokens=False).ids
    assert ids == whole[: len(train) * 64] + whole[len(whole) - round(len(whole) * 0.5) :][: len(val) * 64]


# ------------------------------------------------------------------------------ the chat format (issue 14)


class ChatCharTokenizer(CharTokenizer):
    """A toy chat model whose turn ends with "!" (not eos), as Gemma's ends with <end_of_turn>."""

    chat_template = "u: ...!\\n a: ...!\\n"

    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"{m['role'][0]}: {m['content']}!\n" for m in messages)
        return text + ("a: " if add_generation_prompt else "")


def test_chat_format_with_a_turn_end_that_is_not_eos(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "response": "yo"}, {"text": "raw text"}] * 2)
    tok = ChatCharTokenizer()
    for chat in (None, "auto", True):
        train, _ = load_jsonl_dataset(path, tok, seq_len=32, val_fraction=0.25, chat=chat)
        # the prompt as generate would feed it, then the response, the template's turn end "!", and eos
        assert masked(train)[0] == (TOK.encode("u: hi!\na: "), TOK.encode("yo!") + [2])
        assert masked(train)[1] == ([], TOK.encode("raw text") + [2])  # {"text"} stays raw
    train, _ = load_jsonl_dataset(path, tok, seq_len=32, val_fraction=0.25, chat=False)
    assert masked(train)[0] == (TOK.encode("hi"), TOK.encode("yo") + [2])
    with pytest.raises(ValueError, match="chat=True but the tokenizer has no chat template"):
        load_jsonl_dataset(path, TOK, seq_len=32, chat=True)
    assert masked(load_jsonl_dataset(path, TOK, seq_len=32, chat="auto")[0])[0] == (
        TOK.encode("hi"),
        TOK.encode("yo") + [2],
    )
    with pytest.raises(ValueError, match=r"chat must be None, 'auto', True or False, got 'yes'"):
        load_dataset(path, tok, seq_len=32, chat="yes")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return minipeft.load_pretrained(smollm2_gguf)[1]  # what `minipeft generate` loads (~10 s: once here)


def test_chat_training_prompt_is_what_generate_feeds_smollm2(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = ["What is the capital of France?", "Write a haiku\nabout rain."]
    records = [{"prompt": p, "response": f"Answer {i}: Paris is lovely."} for i, p in enumerate(prompts)]
    path = write_jsonl(tmp_path / "chat.jsonl", records + [{"text": "plain text"}])
    train, _ = load_dataset(path, tok, seq_len=512, val_fraction=0.3)  # the default is "auto"
    assert tok.eos_token == "<|im_end|>"  # SmolLM2-Instruct ends an assistant turn with its eos
    for (prompt_ids, target_ids), p, r in zip(masked(train), prompts, records):
        # exactly what cli.py's generate feeds with --chat auto
        fed = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        assert prompt_ids == fed
        assert target_ids == tok.encode(r["response"]) + [tok.eos_token_id]
        # and the whole example is the template's own rendering of the exchange, less the "\n" after <|im_end|>
        exchange = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r["response"]}]
        )
        assert prompt_ids + target_ids == tok.encode(exchange.removesuffix("\n"))
    raw, _ = load_dataset(path, tok, seq_len=512, val_fraction=0.3, chat=False)
    assert masked(raw)[0] == (tok.encode(prompts[0]), tok.encode(records[0]["response"]) + [tok.eos_token_id])
