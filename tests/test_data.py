"""data.py against hand-computed references: packing, splits, loss masks, errors, batch order, padding."""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.data import (
    Dataset,
    batch_stream,
    batches,
    collate,
    epoch_order,
    load_dataset,
    load_jsonl_dataset,
    load_text_dataset,
)

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
    with pytest.warns(UserWarning, match=r"dropped 1 example.*\[2\]"):
        train, val = load_jsonl_dataset(path, TOK, seq_len=6, val_fraction=0.5)
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
