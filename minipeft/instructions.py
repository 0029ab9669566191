"""Instruction data: {"prompt": ..., "response": ...} records read from JSON, encoded with a loss mask on the
response, in the model's chat format when it has one. Part of data.py's datasets (`data.load_dataset` reads a
.jsonl or .json file with `load_jsonl_dataset`), in a file of its own for its length; it builds data.py's Dataset
with data.py's checks, and data.py still answers for its names (`from minipeft.data import chat_prompt`).

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
"""

import json
import warnings

import torch

from .data import IGNORE_INDEX, Dataset, check_split_args, decode_utf8, pad_id, regular_file

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
