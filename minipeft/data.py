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

Instruction data (`load_jsonl_dataset`). {"prompt": ..., "response": ...} or {"text": ...} objects: one a line
(JSON lines, in a .jsonl or a .json file), or a JSON array of them in a .json file (what HF datasets export):

    input_ids = encode(prompt) + encode(response) + end      (truncated to seq_len)
    labels    = [-100] * len(encode(prompt)) + encode(response) + end

so the loss is on the response and its end only, which teaches the model to stop; {"text": ...} has no prompt
and takes the loss on everything. Prompt and response are encoded separately so that the mask is exact and the
model trains on the very tokens it will see when prompted with the prompt alone. The last val_fraction of the
examples is held out (at least one example in each split).

Chat format (`chat`; None, the default, means "auto"). `minipeft generate --chat auto` wraps a prompt in the
model's chat template as a user message with the assistant's turn opened; training does the same, so the model
learns to answer the very tokens it will be given. Then `prompt` above is that templated text, and `end` is what
the template closes an assistant turn with (`chat_turn_end`: for SmolLM2 <|im_end|>, which is its eos; a turn end
that is not eos gets eos after it, where generation stops). Without a template, or with chat=False, the prompt
is raw and end = [eos]. {"text": ...} lines are always raw.

Honest about what is lost: an example longer than seq_len loses its end (its eos), so the model does not learn
to stop after it: a warning counts them. Empty responses teach only the end: warned about, and refused when every
response is empty.

Batches (`batches`, `batch_stream`) are a pure function of (seed, epoch): epoch e visits the examples in the
order `numpy.random.default_rng([seed, e]).permutation(n)`. Nothing reads a global RNG or remembers how many
batches were drawn, so a run resumed at step k sees exactly the batches an uninterrupted run sees.

Padding. Training pads on the RIGHT to the longest row of the batch (pad id, label -100, attention_mask 0): with
causal attention no real token ever looks right, so the padding changes nothing the loss sees. Batched
generation pads on the LEFT instead (`collate(..., padding_side="left")`), so every row ends in a real token
that the next token follows. A batch without padding gets attention_mask None: attention's fast causal path.

Not done here: on-the-fly tokenization, streaming of corpora larger than memory, multi-turn conversations.
"""

import json
import stat
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


# ---------------------------------------------------------------------------------------- instruction data

FORMAT_HINT = '{"prompt": ..., "response": ...} or {"text": ...}'


def parse_record(record, where):
    """One JSON value -> (prompt, response); {"text": t} is (None, t). Anything else is a ValueError at `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}")
    keys = ("text",) if "text" in record else ("prompt", "response")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; each example needs {FORMAT_HINT}")
    for k in keys:
        if not isinstance(record[k], str):
            raise ValueError(f"{where}: {k!r} must be a string, got {type(record[k]).__name__}")
    return (None, record["text"]) if keys == ("text",) else (record["prompt"], record["response"])


def starts_with_bracket(f):
    """Whether a binary file's first non-whitespace byte is "[" (a JSON array); rewinds the file."""
    first = b""
    while not first and (chunk := f.read(1 << 16)):
        first = chunk.lstrip()[:1]
    f.seek(0)
    return first == b"["


def read_examples(path):
    """-> (unit, [(number, prompt, response)]): unit "line" and line numbers for JSON lines (blank lines skipped),
    "item" and indices for a .json file holding a JSON array (HF datasets' to_json writes either). Errors name
    the file and the line or item."""
    is_json = path.suffix.lower() == ".json"
    with open(path, "rb") as f:
        if is_json and starts_with_bracket(f):
            try:
                items = json.loads(decode_utf8(f.read(), path))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
            return "item", [(i, *parse_record(r, f"{path}[{i}]")) for i, r in enumerate(items)]
        hint = f" (a .json file holds a JSON array of {FORMAT_HINT} objects, or one a line)" if is_json else ""
        examples, offset = [], 0
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line, offset = decode_utf8(raw, where, offset), offset + len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
            examples.append((lineno, *parse_record(record, where)))
        return "line", examples


def use_chat(tokenizer, chat):
    """chat None or "auto": whether the tokenizer has a chat template; True: it must have one; False: never."""
    if not (chat is None or chat == "auto" or isinstance(chat, bool)):
        raise ValueError(f"chat must be None, 'auto', True or False, got {chat!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template; use chat=False to train on raw prompts")
    return has_template if chat in (None, "auto") else chat


def chat_prompt(tokenizer, prompt):
    """The text `minipeft generate` feeds a chat model for `prompt`: a user message, then the assistant's turn
    opened (add_generation_prompt=True), so that training and generation see the very same tokens."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


def adds_bos(tokenizer):
    """Whether tokenizer.encode() puts bos first by itself (Llama-style HF tokenizers do; minipeft's never does)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("")[:1] == [bos]


def chat_turn_end(tokenizer):
    """The ids that end a response in chat format: what the template writes right after an assistant message's
    content (less trailing whitespace, which only leads to the next turn), then eos unless that already ends in
    eos. SmolLM2 writes "<|im_end|>\n" and <|im_end|> is its eos: [eos]. A template whose turn ends with another
    token (Gemma's <end_of_turn>) gets [that token, eos]: the model learns the turn end its template writes, and
    then eos, where generation stops (it stops at eos only)."""
    marker = "RESPONSE_MARKER_5EED"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
    if marker not in text:
        raise ValueError("the chat template does not write an assistant message's content; cannot train on it")
    after = text[text.rindex(marker) + len(marker) :].rstrip()
    end = tokenizer.encode(after) if after else []
    if end and adds_bos(tokenizer):
        end = end[1:]
    eos = tokenizer.eos_token_id
    return end if end[-1:] == [eos] else end + [eos]


def encode_example(tokenizer, prompt, response, end):
    """-> (input_ids, labels) lists, not yet truncated: the prompt's ids labelled -100, then the response's ids
    and `end` ([eos], or the chat format's turn end) as targets. prompt "" or None: no prompt."""
    p = tokenizer.encode(prompt) if prompt else []
    r = tokenizer.encode(response)
    if p and adds_bos(tokenizer):  # bos once, at the start
        r = r[1:]
    return p + r + end, [IGNORE_INDEX] * len(p) + r + end


def load_jsonl_dataset(path, tokenizer, seq_len, val_fraction=0.1, chat=None):
    """-> (train, val) from instruction data: a .jsonl file, or a .json file (see `read_examples`).

    chat None or "auto": prompts go through the tokenizer's chat template when it has one, as `minipeft generate
    --chat auto` does; True: they must; False: raw prompts. {"text": ...} examples are raw either way.
    Warns about examples cut at seq_len (they lose their eos) and about empty responses.
    """
    check_split_args(seq_len, val_fraction)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; instruction data needs one to end each response")
    path = regular_file(path)
    chat, eos = use_chat(tokenizer, chat), tokenizer.eos_token_id
    end = chat_turn_end(tokenizer) if chat else [eos]  # what closes a response; {"text"} lines end in eos
    unit, records = read_examples(path)
    examples, dropped, cut, empty, longest = [], [], 0, 0, 0
    for number, prompt, response in records:
        if chat and prompt is not None:
            prompt = chat_prompt(tokenizer, prompt)
        ids, labels = encode_example(tokenizer, prompt, response, end if prompt is not None else [eos])
        if all(y == IGNORE_INDEX for y in labels[1:seq_len]):  # position 0 is never a target (the shift)
            dropped.append(number)
            continue
        cut, longest = cut + (len(ids) > seq_len), max(longest, len(ids))
        empty += prompt is not None and response == ""
        examples.append((torch.tensor(ids[:seq_len]), torch.tensor(labels[:seq_len])))
    n = len(examples)
    if n and empty == n:
        # Refused, not warned: every target would be the turn end, so the model would learn to answer every
        # prompt with nothing. No one wants that; it is an export that lost its responses (a wrong field name).
        raise ValueError(
            f"{path}: all {n} responses are empty, so all there is to learn is to stop at once; fill them in"
        )
    if dropped:
        warnings.warn(
            f"{path}: dropped {len(dropped)} example(s) with nothing to learn within seq_len={seq_len} (the "
            f"prompt fills it), at {unit}(s) {dropped[:10]}",
            stacklevel=2,
        )
    if cut:
        warnings.warn(
            f"{path}: {cut} of {n} examples are longer than seq_len={seq_len} (the longest has {longest} tokens) "
            f"and were cut: they lose their eos, so the model will not learn to stop after them",
            stacklevel=2,
        )
    if empty:
        warnings.warn(f"{path}: {empty} of {n} responses are empty: those examples teach only eos", stacklevel=2)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{path}: {n} usable example(s); need at least 2 (one for training, one for validation)")
    pad = pad_id(tokenizer)

    def dataset(part):
        return Dataset([x for x, _ in part], [y for _, y in part], pad)

    return dataset(examples[: n - n_val]), dataset(examples[n - n_val :])


def load_dataset(path, tokenizer, seq_len, val_fraction=0.1, chat=None):
    """A .jsonl or .json file (any case) is instruction data (`load_jsonl_dataset`, which takes `chat`);
    anything else, and any directory whatever its name, is plain text (`load_text_dataset`)."""
    if not Path(path).is_dir() and Path(path).suffix.lower() in (".jsonl", ".json"):
        return load_jsonl_dataset(path, tokenizer, seq_len, val_fraction, chat)
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
