"""CSV (and TSV, semicolon- or pipe-separated) files, read as a stream in constant memory.

Python's csv module does the parsing: unlike bulk readers it tells the exact line each record
starts on, and lets one broken row (a stray quote, too many fields, an undecodable line) be
rejected while the rest of the file is read. Each line is decoded on its own, so a file that
mixes encodings loses only the lines that are not in the file's encoding.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from kilde.collect.importers.base import ImportFailed, Row, RowBatch, RowError
from kilde.collect.importers.encoding import check_encoding, detect_encoding, read_sample

DELIMITERS = ",;\t|"
_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
csv.field_size_limit(1 << 20)


def delimiter_name(delimiter: str) -> str:
    return _NAMES.get(delimiter, repr(delimiter))


def sniff_delimiter(text: str) -> str:
    """The delimiter of a sample: csv.Sniffer, checked against a count on the first line."""
    lines = [line for line in text.splitlines() if line.strip()][:50]
    if not lines:
        return ","
    try:
        found = csv.Sniffer().sniff("\n".join(lines), delimiters=DELIMITERS).delimiter
    except csv.Error:
        found = ""
    header = lines[0]
    counts = {d: header.count(d) for d in DELIMITERS}
    if found in counts and counts[found] > 0:
        return found
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


class CsvReader:
    format = "csv"

    def __init__(
        self,
        path: Path,
        *,
        encoding: str | None = None,
        delimiter: str | None = None,
        quotechar: str = '"',
    ) -> None:
        self.path = path
        sample = read_sample(path)
        if encoding:
            self.encoding, how = check_encoding(encoding), "given"
        else:
            self.encoding, how = detect_encoding(sample)
        self.delimiter = delimiter or sniff_delimiter(sample.decode(self.encoding, "replace"))
        self.details = {
            "format": "CSV",
            "encoding": f"{self.encoding} ({how})",
            "delimiter": delimiter_name(self.delimiter) + (" (given)" if delimiter else ""),
        }
        self.total: int | None = path.stat().st_size
        self._handle = path.open("rb")
        self._bad_lines: set[int] = set()
        self._line = 0
        self._ended_with_newline = True
        self._byte_wise = codecs_line_safe(self.encoding)
        self._reader = csv.reader(
            self._lines(), delimiter=self.delimiter, quotechar=quotechar, strict=True
        )
        self.columns = self._read_header()
        if len(self.columns) == 1:
            others = [d for d in DELIMITERS if d != self.delimiter and d in self.columns[0]]
            if others:
                shown = others[0].replace("\t", "\\t")
                raise ImportFailed(
                    "the header has one column but contains the "
                    f"{delimiter_name(others[0])}: the file seems separated by "
                    f"{delimiter_name(others[0])}, not {delimiter_name(self.delimiter)}",
                    fix=f"pass --delimiter '{shown}', or leave --delimiter out to detect it",
                )

    # -- lines and header ---------------------------------------------------------------------

    def _lines(self) -> Iterator[str]:
        if not self._byte_wise:
            wrapper = io.TextIOWrapper(self._handle, encoding=self.encoding, newline="")
            try:
                for text in wrapper:
                    self._line += 1
                    self._ended_with_newline = text.endswith("\n")
                    yield text
            except UnicodeDecodeError:
                raise ImportFailed(
                    f"the file is not valid {self.encoding} after line {self._line}",
                    fix="pass the right --encoding, or re-save the file as UTF-8",
                ) from None
            return
        encoding = self.encoding
        for raw in self._handle:
            self._line += 1
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError:
                self._bad_lines.add(self._line)
                text = raw.decode(encoding, "replace")
            self._ended_with_newline = text.endswith("\n")
            yield text

    def _read_header(self) -> list[str]:
        for fields in self._records():
            if isinstance(fields, RowError):
                raise ImportFailed(
                    "the header line cannot be read: " + fields.reason,
                    fix="the first line must name the columns, separated by the delimiter",
                )
            _, _, values = fields
            if not any(v.strip() for v in values):
                continue
            return unique_names(values)
        raise ImportFailed("the file is empty", fix="export the data again, with a header line")

    def _records(self) -> Iterator[tuple[int, int, list[str]] | RowError]:
        reader = self._reader
        while True:
            start = self._line + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _quote_error(start, self._line, str(exc))
                continue
            if values:
                yield start, self._line, values

    # -- rows ---------------------------------------------------------------------------------

    def batches(self, size: int) -> Iterator[RowBatch]:
        columns = self.columns
        width = len(columns)
        batch = RowBatch()
        for item in self._records():
            if isinstance(item, RowError):
                batch.errors.append(item)
            else:
                start, end, values = item
                if self._bad_lines and any(n in self._bad_lines for n in range(start, end + 1)):
                    batch.errors.append(_encoding_error(start, end, self.encoding))
                elif len(values) == width:
                    batch.rows.append(Row(start, dict(zip(columns, values, strict=True))))
                elif len(values) > width and not any(v.strip() for v in values[width:]):
                    batch.rows.append(Row(start, dict(zip(columns, values[:width], strict=True))))
                else:
                    batch.errors.append(self._width_error(start, end, len(values), width))
            if len(batch.rows) + len(batch.errors) >= size:
                batch.position = self._handle.tell() if self._byte_wise else 0
                yield batch
                batch = RowBatch()
        batch.position = self.total or 0
        yield batch

    def _width_error(self, start: int, end: int, found: int, width: int) -> RowError:
        if found < width and not self._ended_with_newline and end == self._line:
            return RowError(
                start,
                None,
                "truncated_row",
                f"the file ends in the middle of this row ({found} of {width} fields)",
                "the file looks cut off: export or copy it again",
                end_line=end if end != start else None,
            )
        others = [delimiter_name(d) for d in DELIMITERS if d != self.delimiter]
        return RowError(
            start,
            None,
            "wrong_field_count",
            f"the row has {found} fields but the header has {width} "
            f"(the delimiter is {delimiter_name(self.delimiter)})",
            "quote values that contain the delimiter; if the file uses another delimiter ("
            + ", ".join(others)
            + "), pass --delimiter",
            end_line=end if end != start else None,
        )

    def resume(self, offset: int, line: int) -> None:
        """Go on reading rows at byte `offset`, the start of file line `line` (after the
        columnar path read the file up to there)."""
        self._handle.seek(offset)
        self._line = line - 1

    def close(self) -> None:
        self._handle.close()


def codecs_line_safe(encoding: str) -> bool:
    """True when a newline is the single byte 0x0A in this encoding (so lines split as bytes)."""
    return not encoding.startswith(("utf-16", "utf-32", "utf_16", "utf_32"))


def unique_names(values: list[str]) -> list[str]:
    names: list[str] = []
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        name = value.strip().lstrip("\ufeff") or f"column_{index + 1}"
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        names.append(name)
    return names


def _quote_error(start: int, end: int, message: str) -> RowError:
    if "end of data" in message:
        reason = "a quoted value is never closed: the file ends inside it (broken quoting or "
        reason += "a truncated file)"
    elif "field larger" in message:
        reason = "a value is longer than 1 MB; probably a quote that is never closed"
    else:
        reason = "broken quoting: a quote inside a value is not doubled"
    return RowError(
        start,
        None,
        "broken_quoting",
        reason,
        'inside a quoted value write a quote as "" ; check that every opening quote is closed',
        end_line=end if end != start else None,
    )


def _encoding_error(start: int, end: int, encoding: str) -> RowError:
    return RowError(
        start,
        None,
        "invalid_encoding",
        f"the row is not valid {encoding}; the file mixes text encodings",
        "re-save the file in one encoding (UTF-8), or pass the right --encoding",
        end_line=end if end != start else None,
    )
