"""A CLIP byte-level BPE tokenizer built offline for the Shapes caption vocabulary.

It has CLIP's layout (every byte as a token, with and without the ``</w>``
end-of-word marker, then merges, then the two special tokens), so
``CLIPTokenizer.from_pretrained`` loads it like SD1.5's. Merges are added until
every word of the caption grammar is one token; any other text still tokenizes,
byte by byte.
"""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path

from hypersd.shapes.spec import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    PLACE_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
)

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def grammar_words() -> list[str]:
    """Every word that a Shapes caption can contain, in a stable order."""
    phrases = [
        "a on background",
        *PLACE_PHRASES.values(),
        *RELATIONS,
        *SIZES,
        *OBJECT_COLORS,
        *SHAPES,
        *BACKGROUND_COLORS,
    ]
    words: list[str] = []
    for phrase in phrases:
        words.extend(w for w in phrase.split() if w not in words)
    return words


def _symbols(word: str) -> list[str]:
    chars = [bytes_to_unicode()[b] for b in word.encode()]
    return [*chars[:-1], chars[-1] + END_OF_WORD]


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: merge the lowest-ranked adjacent pair until none applies."""
    symbols = _symbols(word)
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(symbols))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into one token (left-to-right chains, repaired until they do)."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            pieces = _apply_bpe(word, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    return merges


def write_tokenizer(folder: str | Path, max_length: int) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json that CLIPTokenizer loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = build_merges(grammar_words())
    base = list(bytes_to_unicode().values())
    tokens = base + [t + END_OF_WORD for t in base] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
