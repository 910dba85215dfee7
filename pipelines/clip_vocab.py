"""A byte-level BPE vocabulary for CLIP built in code, so the tiny text encoder needs no download."""

from __future__ import annotations

# Whole-word tokens: the procedural-clip vocabulary (colours, shapes, motion) plus common English words.
WORDS = """
a an the and of on in over with to from at by for is are this that it its
red green blue yellow orange purple pink white black gray grey brown cyan magenta
circle square triangle ball box star shape dot disc ring
moving moves move left right up down slowly quickly fast slow across toward towards
background plain textured striped dark light bright small big large tiny
video clip frame photo scene of view camera cat dog car tree sky sea water fire
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-symbol table: printable bytes map to themselves, the rest to unused code points."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte symbol (alone and word-final), then each word built by left-to-right merges."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = parts[0]
        for part in parts[1:]:
            if (prefix, part) not in merges:
                merges.append((prefix, part))
            prefix += part
            vocab.setdefault(prefix, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return vocab, merges
