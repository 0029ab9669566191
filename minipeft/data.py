"""Datasets for fine-tuning: plain text packed into blocks, instruction pairs with loss masks, and batches.

Which loader (`load_dataset`): a .jsonl or .json file (in any case: .JSONL too) is instruction data; any other
file, and any directory whatever its name, is plain text. Data must be UTF-8 regular files: a FIFO, a device or
bytes that are not UTF-8 are refused with an error naming the file (and the offset of the first bad byte).

Plain text (`load_text_dataset`). The whole corpus becomes one stream of token ids (files of a directory in
sorted order, joined by eos). The LAST `val_fraction` of the stream is held out for validation, so the two
splits never overlap and validation is text that comes after everything trained on. Each split is cut into
contiguous blocks of `seq_len` tokens; the tail that does not fill a block is dropped. There is no "+1": the
model shifts labels inside (position t predicts token t + 1), so a block of seq_len tokens gives seq_len - 1
predictions. All blocks are full, so their batches need no padding. A minipeft Tokenizer encodes each file in
bounded pieces into int32 numpy (`Tokenizer.encode_long`: the ids of the whole text, without `tokenizers`'
~180 bytes a character on one long line; byte-level BPE tokenizers only, others encode whole), and the blocks
are views of one tensor.

    stream:  [ t0 t1 ... | ... t(n - n_val - 1) ][ t(n - n_val) ... t(n - 1) ]     n_val = round(n * val_fraction)
               train blocks of seq_len            val blocks of seq_len

Instruction data ({"prompt": ..., "response": ...} pairs with the loss on the response, the chat format) is in
instructions.py: `load_dataset` reads a .jsonl or .json file with its `load_jsonl_dataset`.

Batches (`batches`, `batch_stream`) are a pure function of (seed, epoch): epoch e visits the examples in the
order `numpy.random.default_rng([seed, e]).permutation(n)`. Nothing reads a global RNG or remembers how many
batches were drawn, so a run resumed at step k sees exactly the batches an uninterrupted run sees.

Padding. Training pads on the RIGHT to the longest row of the batch (pad id, label -100, attention_mask 0): with
causal attention no real token ever looks right, so the padding changes nothing the loss sees. Batched
generation pads on the LEFT instead (`collate(..., padding_side="left")`), so every row ends in a real token
that the next token follows. A batch without padding gets attention_mask None: attention's fast causal path.

Not done here: on-the-fly tokenization, streaming of corpora larger than memory, multi-turn conversations.
"""

import stat
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


# ------------------------------------------------------------------------------------------------- files


def regular_file(path):
    """path -> Path, if it names a regular file (or a link to one); else a clear error saying what it is."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file (load_dataset reads a directory as its .txt files)")
    mode = path.stat().st_mode
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    kind = next((name for is_kind, name in kinds if is_kind(mode)), "a socket or other special file")
    raise ValueError(f"{path} is not a regular file (it is {kind}); give a .txt, .jsonl or .json file or a directory")


def decode_utf8(data, where, offset=0):
    """bytes -> str, or a ValueError naming `where` and the file offset of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {offset + e.start}: {e.reason}); "
            f"save it as UTF-8"
        ) from None


# ---------------------------------------------------------------------------------------------- plain text


def text_files(path_or_text_files):
    """One file, a directory (its *.txt, any case, sorted by name) or a list of files -> (name, [files])."""
    if isinstance(path_or_text_files, (str, Path)):
        path = Path(path_or_text_files)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() == ".txt")
            if not files:
                raise FileNotFoundError(f"no .txt files in directory {path}")
        else:
            files = [path]
        name = str(path)
    else:
        files = [Path(f) for f in path_or_text_files]
        name = ", ".join(map(str, files))
    return name, [regular_file(f) for f in files]


def encode_text(tokenizer, text):
    """text -> its ids as int32 numpy. A minipeft Tokenizer encodes in bounded pieces (`Tokenizer.encode_long`:
    the same ids, without `tokenizers`' ~180 bytes a character on one string); another tokenizer encodes whole."""
    encode_long = getattr(tokenizer, "encode_long", None)
    return encode_long(text) if encode_long else np.asarray(tokenizer.encode(text), dtype=np.int32)


def min_tokens_for_split(seq_len, val_fraction):
    """The fewest tokens n for which both splits hold one block: round(n * f) >= L and n - round(n * f) >= L."""
    n = max(2 * seq_len, int((seq_len - 1) / val_fraction), int((seq_len - 1) / (1 - val_fraction)))  # lower bounds
    while not (round(n * val_fraction) >= seq_len and n - round(n * val_fraction) >= seq_len):
        n += 1
    return n


def pack(ids, seq_len, pad_token_id):
    """Contiguous, non-overlapping blocks of seq_len tokens (views of one tensor); the tail that does not fill
    one is dropped. ids: a 1-D numpy array."""
    n_blocks = len(ids) // seq_len
    blocks = list(torch.from_numpy(ids[: n_blocks * seq_len]).long().view(n_blocks, seq_len))
    return Dataset(input_ids=blocks, labels=blocks, pad_token_id=pad_token_id)  # every token is a target


def load_text_dataset(path_or_text_files, tokenizer, seq_len, val_fraction=0.1):
    """-> (train, val): the token stream split at its last val_fraction, each packed into seq_len blocks."""
    check_split_args(seq_len, val_fraction)
    name, files = text_files(path_or_text_files)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # a document boundary the model sees
    parts = []
    for i, file in enumerate(files):  # one file in memory at a time, as text
        if i:
            parts.append(np.array(eos, dtype=np.int32))
        parts.append(encode_text(tokenizer, decode_utf8(file.read_bytes(), file)))
    ids = np.concatenate(parts)
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


# -------------------------------------------------------------------------------------------- which loader


def load_dataset(path, tokenizer, seq_len, val_fraction=0.1, chat=None):
    """A .jsonl or .json file (any case) is instruction data (`load_jsonl_dataset`, which takes `chat`);
    anything else, and any directory whatever its name, is plain text (`load_text_dataset`)."""
    if not Path(path).is_dir() and Path(path).suffix.lower() in (".jsonl", ".json"):
        from .instructions import load_jsonl_dataset  # here: instructions.py imports this file

        return load_jsonl_dataset(path, tokenizer, seq_len, val_fraction, chat)
    return load_text_dataset(path, tokenizer, seq_len, val_fraction)


# instructions.py's names, still importable from here (`from minipeft.data import chat_prompt`): looked up there
# when first asked for (PEP 562), since instructions.py imports this file and an import here would be a cycle.
INSTRUCTION_NAMES = (
    "FORMAT_HINT", "parse_record", "starts_with_bracket", "read_examples", "use_chat", "chat_prompt", "adds_bos",
    "chat_turn_end", "encode_example", "load_jsonl_dataset",
)  # fmt: skip


def __getattr__(name):
    if name in INSTRUCTION_NAMES:
        from . import instructions

        return getattr(instructions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
