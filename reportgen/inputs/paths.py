r"""File names as every results file and the page record them: whatever bytes the file system allows, written as
valid UTF-8 text that decodes back to the exact bytes.

Linux allows any bytes but `/` and NUL in a name, and Python hands bytes that are not UTF-8 over as lone surrogates
(surrogateescape), which no UTF-8 writer accepts. The rule (`escape_name`): take the name's bytes (`os.fsencode`),
read them as UTF-8, and write as `\xNN` (two lowercase hex digits), one per byte, every byte that is not part of
valid UTF-8, every control character (newline, tab, escape ...: Unicode category Cc), the bidirectional-text
controls that would reorder the name on screen, and the backslash itself; keep everything else. So
`cats/caf\xe9.jpg` is a Latin-1 `é`, `a\x0ab.png` holds a newline, `C:\x5cphotos.png` a backslash, and ordinary or
non-ASCII names (`Ünïcödé 猫.png`) read as they are. Since every backslash of an escaped name starts an escape,
`unescape_name` is exact: `unescape_name(escape_name(name)) == os.fsencode(name)`.
"""
from __future__ import annotations

import os
import re

# what is written as \xNN: bytes that are not UTF-8 (decoded to U+DC80..U+DCFF by surrogateescape), C0 controls,
# DEL, C1 controls, the backslash, and the bidi marks, embeddings, overrides and isolates
_ESCAPED = re.compile("[\udc80-\udcff\x00-\x1f\x7f-\x9f\\\\\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2}))?")


def escape_name(name: str) -> str:
    """The name (a str from os.walk, os.listdir, sys.argv ...) as printable UTF-8 text, by the rule above."""
    text = os.fsencode(name).decode("utf-8", "surrogateescape")
    return _ESCAPED.sub(_escape_char, text)


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if "\udc80" <= char <= "\udcff":
        return f"\\x{ord(char) - 0xDC00:02x}"  # the undecodable byte itself
    return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8"))


def unescape_name(text: str) -> bytes:
    """The exact bytes of the name `text` was escaped from; ValueError for a backslash that starts no `\\xNN`."""
    out = bytearray()
    position = 0
    for match in _ESCAPE.finditer(text):
        if match.group(1) is None:
            raise ValueError(f"{text!r} is not an escaped name: a backslash at {match.start()} starts no \\xNN")
        out += text[position:match.start()].encode("utf-8")
        out.append(int(match.group(1), 16))
        position = match.end()
    out += text[position:].encode("utf-8")
    return bytes(out)


def os_name(text: str) -> str:
    """The escaped name `text` as the str that opens the file (`os.fsdecode` of its exact bytes)."""
    return os.fsdecode(unescape_name(text))
