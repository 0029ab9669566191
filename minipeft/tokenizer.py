r"""A thin wrapper over the `tokenizers` library: text <-> token ids, the special tokens, and the chat format.

    tok = Tokenizer.from_file("model_dir")          # tokenizer.json (+ tokenizer_config.json etc. beside it)
    ids = tok.encode("Hello world", add_bos=False)  # list[int]
    tok.decode(ids)                                 # "Hello world"

The heavy lifting (byte-level BPE, added tokens) is the Rust `tokenizers.Tokenizer`. This file only adds what
a model needs to know about its tokenizer: which ids are bos / eos / pad, and how a chat is written down.

Special tokens come, in this order of precedence, from tokenizer_config.json, special_tokens_map.json and
config.json (bos_token_id / eos_token_id) found next to tokenizer.json. `pad_token_id` falls back to eos.

A GGUF file carries no tokenizer.json: `Tokenizer.from_gguf_metadata` rebuilds one from llama.cpp's
metadata (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, ...). Only the byte-level BPE kind ("gpt2")
is supported. The pre-tokenizer (how text is cut before BPE) is not in the file, only its llama.cpp name
`tokenizer.ggml.pre`; we follow llama.cpp: "smollm" splits every digit off first, then applies GPT-2's
regex. transformers' GGUF loader does not know "smollm" and uses plain GPT-2 splitting; the two agree on all
text except a run of 2+ spaces before a digit ("a  1": llama.cpp and SmolLM's own tokenizer.json give
"ĠĠ", transformers "Ġ","Ġ"). SmolLM2's merges contain no digit pairs, so digits never merge in either.

Chat: `apply_chat_template` renders SmolLM2's ChatML template in plain Python (no jinja). Any other
template is refused with a clear error instead of being rendered wrongly.

Long text: `tokenizers` needs about 180 bytes of memory a character to encode one string (a 50 MB line peaked
at 7.7 GB). `encode_long` encodes the text in pieces of about 64 Ki characters, cut where the pre-tokenizer cuts
anyway, so the ids are those of the whole text; it returns them as int32 numpy (4 bytes a token, not the 8 of a
list slot plus a Python int). GPT-2's regex is `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
\s+(?!\S)|\s+` and the cuts are

    "a b"  -> "a" | " b"        before a single space between two non-spaces: no match holds a non-space and
                                the space after it, and " ?" makes that space start the next match
    "a\nb" -> "a" "\n" | "b"    after a newline between two non-spaces: "\n" is a match of its own either way

The regex looks only ahead, so the text after a cut is matched as in the whole text; splitting off digits
("smollm") cuts at the same places either way. This holds for tokenizers with no normalizer, a byte-level
pre-tokenizer using the regex, and no added token that eats spaces (`cuts_are_exact`); any other tokenizer
encodes the text whole.
"""

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer

from .files import read_json

# SmolLM2-Instruct's template, exactly as it ships in tokenizer_config.json and in the GGUF metadata.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types: CONTROL (<|im_end|>), USER_DEFINED (<think>)
GGUF_PRE_TOKENIZERS = ("gpt2", "smollm")  # llama.cpp's names for how text is split before BPE
# Where GPT-2's regex cuts anyway (module docstring). Python's \s holds every character Rust's \s does (and a few
# more, U+001C-U+001F), so a neighbour that is \S here is a non-space there too.
SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
PIECE_CHARS = 1 << 16  # encode_long's piece: ~12 MB of `tokenizers` memory, and calls few enough to cost nothing


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: byte-level BPE tokens are spelled in these characters
    (a space is "Ġ", a newline "Ċ"), so that every one of the 256 bytes is a visible, non-space character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _token_content(value):  # tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(
        self, tokenizer, *, bos_token=None, eos_token=None, pad_token=None, chat_template=None, add_bos_token=False
    ):
        self.tokenizer = tokenizer  # the tokenizers.Tokenizer doing the work
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token  # what the model was trained with; encode(add_bos=...) decides
        for name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")

    # ---- loading and saving ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path):
        """path: a tokenizer.json, or a directory holding one. Special tokens and the chat template are read
        from tokenizer_config.json, special_tokens_map.json and config.json beside it, when present."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        try:
            rust = _RustTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        found = {}
        config = _read_json(file.parent / "config.json")
        for key in ("bos", "eos"):  # lowest precedence: the model's ids
            token_id = config.get(f"{key}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
            if isinstance(token_id, int) and rust.id_to_token(token_id) is not None:
                found[f"{key}_token"] = rust.id_to_token(token_id)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            cfg = _read_json(file.parent / name)
            found.update({k: _token_content(cfg[k]) for k in ("bos_token", "eos_token", "pad_token") if cfg.get(k)})
            for k in ("chat_template", "add_bos_token"):
                if k in cfg:
                    found[k] = cfg[k]
        template_file = file.parent / "chat_template.jinja"  # where transformers >= 4.50 puts it
        if "chat_template" not in found and template_file.is_file():
            found["chat_template"] = template_file.read_text(encoding="utf-8")
        if not isinstance(found.get("chat_template"), (str, type(None))):
            found.pop("chat_template")  # a list of named templates: not something we render
        return cls(rust, **found)

    def gguf_metadata(self):
        """This tokenizer as llama.cpp's GGUF metadata, {key: (value, gguf.GGUFValueType)}: from_gguf_metadata's
        inverse. Only byte-level BPE with GPT-2's pre-tokenizer ("gpt2"), optionally splitting digits first
        ("smollm"), can be written: llama.cpp knows a pre-tokenizer by name only."""
        import gguf

        spec = json.loads(self.tokenizer.to_str())
        pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
        name = {(("ByteLevel", None),): "gpt2", (("Digits", True), ("ByteLevel", None)): "smollm"}.get(tuple(kinds))
        if model.get("type") != "BPE" or name is None or not parts[-1].get("use_regex", True):
            raise ValueError(f"cannot write this tokenizer to GGUF: {model.get('type')} with pre-tokenizer {kinds} "
                             "(llama.cpp reads byte-level BPE with GPT-2's regex, optionally splitting digits)")  # fmt: skip
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("cannot write this tokenizer to GGUF: its ids are not 0 .. n-1 without gaps")
        added = {t.content: t.special for t in self.tokenizer.get_added_tokens_decoder().values()}
        types = [GGUF_CONTROL if added.get(t) else GGUF_USER_DEFINED if t in added else 1 for t in tokens]  # 1: normal
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        V = gguf.GGUFValueType
        md = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": (name, V.STRING),
              "tokenizer.ggml.tokens": (tokens, V.ARRAY), "tokenizer.ggml.token_type": (types, V.ARRAY),
              "tokenizer.ggml.merges": (merges, V.ARRAY), "tokenizer.ggml.add_bos_token": (self.add_bos_token, V.BOOL)}  # fmt: skip
        for key, tid in (("bos", self.bos_token_id), ("eos", self.eos_token_id), ("padding", self.pad_token_id)):
            if tid is not None:
                md[f"tokenizer.ggml.{key}_token_id"] = (tid, V.UINT32)
        if self.chat_template:
            md["tokenizer.chat_template"] = (self.chat_template, V.STRING)
        return md

    def save(self, path):
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) that `from_file` and
        transformers' AutoTokenizer read. path: a directory, or a file name ending in .json."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(file))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (file.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_gguf_metadata(cls, metadata):
        """Rebuild the tokenizer a GGUF file describes. metadata: {key: value} of the file's tokenizer.* keys."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
        pre = metadata.get("tokenizer.ggml.pre")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {GGUF_PRE_TOKENIZERS}")
        tokens, types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type") or []
        # Tokens are stored in GPT-2's byte alphabet; one that is not (a rare llama.cpp quirk) gets respelled.
        alphabet = bytes_to_unicode()
        spell = set(alphabet.values())
        vocab = {t if set(t) <= spell else "".join(alphabet[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        rust = _RustTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex, then bytes
        if pre == "smollm":  # llama.cpp: "\p{N}" first (each digit alone), then GPT-2's regex
            byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        rust.pre_tokenizer = byte_level
        rust.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) are matched whole in the text before BPE, and skipped by decode;
        # user-defined ones are matched whole too but are ordinary text. Only tokens in the byte alphabet:
        # a control token spelled otherwise is a llama.cpp mislabel (as transformers also assumes).
        control = [t for t, k in zip(tokens, types) if k == GGUF_CONTROL and set(t) <= spell]
        user_defined = [t for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED and t in vocab]
        rust.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        rust.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])

        def token(key):
            i = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(
            rust,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        )

    # ---- the tokenizer itself ----------------------------------------------------------------------------
    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self):
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self):  # a causal LM needs no pad of its own: eos is the usual stand-in
        return self.eos_token_id if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    def encode(self, text, add_bos=False):
        """text -> ids. Special tokens written in the text (<|im_start|>) become their single ids. No bos is
        added unless add_bos=True: the tokenizer.json post-processor is bypassed so that it is always explicit."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            ids = [self.bos_token_id] + ids
        return ids

    def encode_long(self, text, piece_chars=PIECE_CHARS):
        """text -> encode(text) as an int32 numpy array, encoded in pieces of about piece_chars characters cut
        where the pre-tokenizer cuts anyway (see the module docstring), so memory stays bounded. A tokenizer for
        which such cuts are not exact encodes the text whole."""
        if not self.cuts_are_exact:
            return np.asarray(self.encode(text), dtype=np.int32)
        pieces, start = [], 0
        while start < len(text):
            cut = SAFE_CUT.search(text, start + piece_chars) if start + piece_chars < len(text) else None
            end = cut.start() if cut else len(text)  # no cut point left: the rest is one piece
            pieces.append(np.array(self.tokenizer.encode(text[start:end], add_special_tokens=False).ids, np.int32))
            start = end
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

    @cached_property
    def cuts_are_exact(self):
        """Whether cutting text at SAFE_CUT leaves its ids unchanged: no normalizer; a pre-tokenizer of byte-level
        BPE with GPT-2's regex and no prefix space, and at most digit splitting besides; no added token that
        strips the spaces around it or holds a space (added tokens are matched in the raw text first)."""
        pre = self.tokenizer.pre_tokenizer
        pre = json.loads(pre.__getstate__()) if pre is not None else {}
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        steps_ok = (
            len(byte_level) == 1
            and byte_level[0].get("use_regex", True)
            and not byte_level[0].get("add_prefix_space", False)
            and all(s.get("type") in ("ByteLevel", "Digits") for s in steps)
        )
        added_ok = all(
            not (t.lstrip or t.rstrip or t.single_word or any(c.isspace() for c in t.content))
            for t in self.tokenizer.get_added_tokens_decoder().values()
        )
        return self.tokenizer.normalizer is None and steps_ok and added_ok

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    def apply_chat_template(self, messages, add_generation_prompt=False):
        """messages [{"role": "user", "content": "Hi"}, ...] -> the prompt string, for SmolLM2's ChatML:

            <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n

        A default system message is inserted when the first message is not one; the last line is added by
        add_generation_prompt=True (as in transformers). Other templates would need a jinja engine."""
        if self.chat_template != SMOLLM2_CHAT_TEMPLATE:
            raise ValueError(
                "apply_chat_template renders only SmolLM2's ChatML template without jinja; this tokenizer's "
                f"template is {'missing' if self.chat_template is None else 'a different one'} "
                "(render it with jinja2 or transformers instead)"
            )
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
            if i == 0 and m["role"] != "system":
                out.append(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n")
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def _read_json(path):  # the optional files beside tokenizer.json: {} when absent (errors as files.read_json)
    return read_json(path, expect=dict) if path.is_file() else {}
