"""Which text encoding a file is in.

UTF-8 is taken when the sample's non-ASCII lines are (mostly) valid UTF-8: a file that mixes
encodings is then read as UTF-8 and its few undecodable lines are rejected one by one, instead
of the whole file being read as mojibake. Otherwise charset-normalizer makes the guess.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from charset_normalizer import from_bytes

SAMPLE_BYTES = 1 << 20


def read_sample(path: Path, size: int = SAMPLE_BYTES) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


_COMMON = ("cp1252",)


def detect_encoding(sample: bytes) -> tuple[str, str]:
    """(Python codec name, how it was chosen) for the sample of a file."""
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", "byte order mark"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", "byte order mark"
    parts = sample.split(b"\n")
    if len(parts) > 1 and len(sample) >= SAMPLE_BYTES:
        parts = parts[:-1]  # the sample may end inside a character
    lines = [line for line in parts if not line.isascii()]
    if not lines:
        return "utf-8", "plain ASCII"
    valid = 0
    for line in lines:
        try:
            line.decode("utf-8")
            valid += 1
        except UnicodeDecodeError:
            pass
    if valid == len(lines):
        return "utf-8", "valid UTF-8"
    if valid * 2 >= len(lines):
        return "utf-8", "mostly UTF-8 (lines in another encoding will be rejected)"
    results = from_bytes(sample)
    best = results.best()
    if best is None:
        return "utf-8", "unknown (read as UTF-8)"
    # On a tie (a short sample often fits several code pages equally well) the most common
    # one wins, not whichever the detector happened to list first.
    for match in results:
        if (
            match.encoding in _COMMON
            and match.chaos <= best.chaos
            and match.coherence >= best.coherence
        ):
            best = match
            break
    return codecs.lookup(best.encoding).name, "detected"


def check_encoding(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        from kilde.collect.importers.base import ImportFailed

        raise ImportFailed(
            f"{name!r} is not a text encoding Python knows",
            fix="use a name like utf-8, cp1252, latin-1 or utf-16",
        ) from None
