"""Datasets for fine-tuning: plain text packed into blocks, instruction pairs with loss masks, and batches.

Plain text (`load_text_dataset`). The whole corpus becomes one stream of token ids (files of a directory in
sorted order, joined by eos). The LAST `val_fraction` of the stream is held out for validation, so the two
splits never overlap and validation is text that comes after everything trained on. Each split is cut into
contiguous blocks of `seq_len` tokens; the tail that does not fill a block is dropped. There is no "+1": the
model shifts labels inside (position t predicts token t + 1), so a block of seq_len tokens gives seq_len - 1
predictions. All blocks are full, so their batches need no padding.

    stream:  [ t0 t1 ... | ... t(n - n_val - 1) ][ t(n - n_val) ... t(n - 1) ]     n_val = round(n * val_fraction)
               train blocks of seq_len            val blocks of seq_len

Instruction data (`load_jsonl_dataset`). One JSON object a line, either {"prompt": ..., "response": ...} or
{"text": ...}:

    input_ids = encode(prompt) + encode(response) + [eos]      (truncated to seq_len)
    labels    = [-100] * len(encode(prompt)) + encode(response) + [eos]

so the loss is on the response and its eos (which teaches the model to stop) only; {"text": ...} has no prompt
and takes the loss on everything. Prompt and response are encoded separately so that the mask is exact and the
model trains on the very tokens it will see when prompted with the prompt alone. The last val_fraction of the
examples is held out (at least one example in each split).

Batches (`batches`, `batch_stream`) are a pure function of (seed, epoch): epoch e visits the examples in the
order `numpy.random.default_rng([seed, e]).permutation(n)`. Nothing reads a global RNG or remembers how many
batches were drawn, so a run resumed at step k sees exactly the batches an uninterrupted run sees.

Padding. Training pads on the RIGHT to the longest row of the batch (pad id, label -100, attention_mask 0): with
causal attention no real token ever looks right, so the padding changes nothing the loss sees. Batched
generation pads on the LEFT instead (`collate(..., padding_side="left")`), so every row ends in a real token
that the next token follows. A batch without padding gets attention_mask None: attention's fast causal path.

Not done here: on-the-fly tokenization, streaming of corpora larger than memory, chat templates.
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100  # labels equal to this take no part in the loss (torch's cross_entropy default)


@dataclass
class Dataset:
    """Examples as 1-D LongTensors; labels[i] has input_ids[i]'s length and is -100 where no loss is taken."""

    input_ids: list
    labels: list
    pad_token_id: int = 0

    def __len__(self):
        return len(self.input_ids)

    def num_tokens(self):
        return sum(len(x) for x in self.input_ids)


def pad_id(tokenizer):
    """The id to pad with: pad, else eos, else 0 (padded positions are masked out, so any id works)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def check_split_args(seq_len, val_fraction):
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one prediction needs two tokens), got {seq_len!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


# ---------------------------------------------------------------------------------------------- plain text


def read_texts(path_or_text_files):
    """One .txt file, a directory (its *.txt, sorted by name) or a list of files -> (name, [texts])."""
    if isinstance(path_or_text_files, (str, Path)):
        path = Path(path_or_text_files)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt files in directory {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
        name = str(path)
    else:
        files = [Path(f) for f in path_or_text_files]
        name = ", ".join(map(str, files))
    return name, [f.read_text(encoding="utf-8") for f in files]


def min_tokens_for_split(seq_len, val_fraction):
    """The fewest tokens n for which both splits hold one block: round(n * f) >= L and n - round(n * f) >= L."""
    n = max(2 * seq_len, int((seq_len - 1) / val_fraction), int((seq_len - 1) / (1 - val_fraction)))  # lower bounds
    while not (round(n * val_fraction) >= seq_len and n - round(n * val_fraction) >= seq_len):
        n += 1
    return n


def pack(ids, seq_len, pad_token_id):
    """Contiguous, non-overlapping blocks of seq_len tokens; the tail that does not fill one is dropped."""
    n_blocks = len(ids) // seq_len
    blocks = list(torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len))
    return Dataset(input_ids=blocks, labels=blocks, pad_token_id=pad_token_id)  # every token is a target


def load_text_dataset(path_or_text_files, tokenizer, seq_len, val_fraction=0.1):
    """-> (train, val): the token stream split at its last val_fraction, each packed into seq_len blocks."""
    check_split_args(seq_len, val_fraction)
    name, texts = read_texts(path_or_text_files)
    ids = []
    for i, text in enumerate(texts):
        if i and tokenizer.eos_token_id is not None:  # a document boundary the model can see
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer.encode(text))
    n = len(ids)
    n_val = round(n * val_fraction)
    train_ids, val_ids = ids[: n - n_val], ids[n - n_val :]
    if len(train_ids) < seq_len or len(val_ids) < seq_len:
        raise ValueError(
            f"{name}: too short: {n} tokens split into {len(train_ids)} for training and {len(val_ids)} for "
            f"validation (val_fraction={val_fraction}), but each split needs at least one block of "
            f"seq_len={seq_len}; that needs at least {min_tokens_for_split(seq_len, val_fraction)} tokens. "
            f"Use more text, a smaller seq_len or a different val_fraction."
        )
    pad = pad_id(tokenizer)
    return pack(train_ids, seq_len, pad), pack(val_ids, seq_len, pad)


# ---------------------------------------------------------------------------------------- instruction data


def parse_line(line, where):
    """One JSONL line -> (prompt, response); {"text": t} is ("", t). Anything else is a ValueError at `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}")
    keys = ("text",) if "text" in record else ("prompt", "response")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(
            f'{where}: missing key(s) {missing}; each line needs {{"prompt": ..., "response": ...}} or {{"text": ...}}'
        )
    for k in keys:
        if not isinstance(record[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(record[k]).__name__}")
    return ("", record["text"]) if keys == ("text",) else (record["prompt"], record["response"])


def encode_example(tokenizer, prompt, response, seq_len):
    """-> (input_ids, labels) as lists, prompt positions labelled -100, eos appended, truncated to seq_len."""
    p = tokenizer.encode(prompt) if prompt else []
    r = tokenizer.encode(response)
    bos = tokenizer.bos_token_id
    if p and r and bos is not None and r[0] == bos:  # an encode() that adds bos adds it once, at the start
        r = r[1:]
    ids = p + r + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(p) + r + [tokenizer.eos_token_id]
    return ids[:seq_len], labels[:seq_len]


def load_jsonl_dataset(path, tokenizer, seq_len, val_fraction=0.1):
    """-> (train, val) from a JSONL file of {"prompt", "response"} or {"text"} objects (blank lines skipped)."""
    check_split_args(seq_len, val_fraction)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; instruction data needs one to end each response")
    path = Path(path)
    examples, dropped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            ids, labels = encode_example(tokenizer, *parse_line(line, f"{path}:{lineno}"), seq_len)
            if all(y == IGNORE_INDEX for y in labels[1:]):  # position 0 is never a target (the shift)
                dropped.append(lineno)
            else:
                examples.append((torch.tensor(ids), torch.tensor(labels)))
    if dropped:
        warnings.warn(
            f"{path}: dropped {len(dropped)} example(s) with nothing to learn within seq_len={seq_len} (the "
            f"prompt fills it), at line(s) {dropped[:10]}",
            stacklevel=2,
        )
    n = len(examples)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{path}: {n} usable example(s); need at least 2 (one for training, one for validation)")
    pad = pad_id(tokenizer)

    def dataset(part):
        return Dataset([x for x, _ in part], [y for _, y in part], pad)

    return dataset(examples[: n - n_val]), dataset(examples[n - n_val :])


def load_dataset(path, tokenizer, seq_len, val_fraction=0.1):
    """A .jsonl file is instruction data; anything else (a .txt file, a directory) is plain text."""
    if Path(path).suffix == ".jsonl":
        return load_jsonl_dataset(path, tokenizer, seq_len, val_fraction)
    return load_text_dataset(path, tokenizer, seq_len, val_fraction)


# ------------------------------------------------------------------------------------- batches and padding


def collate(input_ids, labels=None, pad_token_id=0, padding_side="right"):
    """Rows -> {"input_ids" (B, T), "labels" (B, T) or None, "attention_mask" (B, T) or None}, T the longest row.

    Right padding for training, left for batched generation (see the module docstring). attention_mask is None
    when no row needed padding.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    T = max(len(x) for x in input_ids)
    if all(len(x) == T for x in input_ids):
        return {
            "input_ids": torch.stack(list(input_ids)),
            "labels": torch.stack(list(labels)) if labels is not None else None,
            "attention_mask": None,
        }
    B = len(input_ids)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, x in enumerate(input_ids):
        cols = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
        ids[i, cols], mask[i, cols] = torch.as_tensor(x), 1
        if labels is not None:
            lab[i, cols] = torch.as_tensor(labels[i])
    return {"input_ids": ids, "labels": lab if labels is not None else None, "attention_mask": mask}


def epoch_order(n, seed, epoch):
    """The order in which epoch `epoch` visits n examples: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(dataset, batch_size, seed=0, epoch=0, *, shuffle=True, drop_last=True, start=0):
    """Collated batches of one epoch, from batch number `start` on. drop_last drops the incomplete last one."""
    n = len(dataset)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(start * batch_size, stop, batch_size):
        rows = order[i : i + batch_size].tolist()
        yield collate([dataset.input_ids[j] for j in rows], [dataset.labels[j] for j in rows], dataset.pad_token_id)


def batch_stream(dataset, batch_size, seed, start=0):
    """Endless batches number start, start + 1, ... epoch after epoch; batch i is a pure function of (seed, i)."""
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({len(dataset)} examples)")
    epoch, first = divmod(start, per_epoch)
    while True:
        yield from batches(dataset, batch_size, seed, epoch, start=first)
        epoch, first = epoch + 1, 0
