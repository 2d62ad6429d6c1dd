"""Delimited manifest files: .tsv read verbatim, .csv with standard quoting read strictly.

TSV is plain: one row per line, fields split on every tab, quotes kept as written (a caption may
start with `"`), so it cannot hold tabs or line breaks. CSV uses standard quoting, read strictly:
a malformed quote, a field spanning lines (a runaway quote) or a wrong field count is an error
naming the file and line.

csaligner before the verbatim reader wrote .tsv with the csv module (tab delimiter, minimal
quoting), so a field holding a quote was written quoted with its quotes doubled: the caption
`a "Stop" sign` became `"a ""Stop"" sign"`. Read verbatim, such a field keeps those quotes; the reader
warns (`CsvQuotedTsvWarning`) when it finds fields of that shape, `tsv_quoting="csv"` reads a file
the old way, and `unquote_tsv` rewrites one as a verbatim .tsv. That writer also quoted a field holding
a carriage return, which a verbatim .tsv cannot hold: such a file converts to .jsonl instead. Read the
old way, a .tsv row still ends at a line feed only, so a bare CR outside quotes is named as what it is:
the mark of a verbatim file, which was never csv-quoted.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TextIO

TsvQuoting = Literal["verbatim", "csv"]
TSV_QUOTINGS: tuple[str, ...] = ("verbatim", "csv")


class CsvQuotedTsvWarning(UserWarning):
    """A .tsv read verbatim holds fields that look csv-quoted by the .tsv writer of older csaligner versions."""


# A quote at the start of a CSV field opens a quoted field; shown in errors as the way to write one.
_QUOTE_FIX = 'quote the whole field and double the quotes inside it ("""Stop"" sign" reads as "Stop" sign)'
_CSV_QUOTING_HINT = f"{_QUOTE_FIX}, or use .tsv, which is read verbatim"
_TSV_CSV_QUOTING_HINT = f"{_QUOTE_FIX}, or read the file verbatim (tsv_quoting='verbatim', the default)"
# What a verbatim .tsv field cannot hold (fields split on tabs, rows are lines; write_manifest refuses both).
_UNHELD = {"\t": "a tab", "\r": "a carriage return"}


def _fields_error(path: Path, bad: list[tuple[int, int, str]], header: list[str], sep: str) -> ValueError:
    """The error for rows whose field count differs from the header's: the first one in full, then the count.

    Args:
        path: the file.
        bad: (line, fields found, the row as read) for every such row, in file order.
        header: the column names.
        sep: "tab" or "comma".
    """
    line, got, row = bad[0]
    fields = "field" if got == 1 else "fields"
    msg = f"{path}:{line}: {got} {sep}-separated {fields}, expected {len(header)} ({', '.join(header)})"
    if got < len(header):
        empty = "'a.jpg\\t'" if sep == "tab" else "'a.jpg,'"
        msg += (
            f": {', '.join(header[got:])} missing in {row[:80]!r}; every column needs its {sep} even when empty "
            f"(an image-only row under image, caption is {empty})"
            + (", and an editor that strips trailing whitespace deletes such tabs" if sep == "tab" else "")
            + f": add the missing {sep}s or fill the fields"
        )
    elif sep == "tab":
        msg += (
            f" in {row[:80]!r}; every tab separates a field, so a caption cannot hold a tab in .tsv: "
            "write .csv or .jsonl for those"
        )
    else:
        msg += f" in {row[:80]!r}; quote fields that contain commas"
    if len(bad) > 1:
        lines = ", ".join(str(n) for n, _, _ in bad[:10]) + (", ..." if len(bad) > 10 else "")
        msg += f"; {len(bad)} rows of {path.name} have the wrong number of fields, at lines {lines}"
    return ValueError(msg)


def looks_csv_quoted(value: str) -> bool:
    """Whether `value` has the shape the old csv-module .tsv writer gave a field holding a quote or a CR.

    That writer quoted only fields holding a quote, tab, CR or LF: the whole field in quotes, each quote
    inside doubled. A verbatim .tsv field holds no tab or LF, so the shape is: quotes at both ends, every
    quote inside in a doubled pair, and at least one such pair (or a CR) inside. '"Stop" sign' and '"x"'
    do not have it; '"a ""Stop"" sign"' does.
    """
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return False
    inner = value[1:-1]
    return '"' not in inner.replace('""', "") and ('""' in inner or "\r" in inner)


def _jsonl_fix(path: Path) -> str:
    """The call that converts a csv-quoted .tsv to .jsonl, for values a verbatim .tsv cannot hold."""
    return f"write_manifest(read_manifest({str(path)!r}, tsv_quoting='csv'), {str(path.with_suffix('.jsonl'))!r})"


def _warn_csv_quoted(path: Path, found: list[tuple[int, str, str]]) -> None:
    """One warning for the csv-quoted-looking fields `found` ((line, column, value), in file order)."""
    line, column, value = found[0]
    lines = sorted({n for n, _, _ in found})
    shown = ", ".join(str(n) for n in lines[:10]) + (", ..." if len(lines) > 10 else "")
    cr = next(((n, c) for n, c, v in found if "\r" in v), None)
    if cr is None:
        fixed = path.with_name(f"{path.stem}.unquoted{path.suffix}")
        fix = (
            "rewrite it as a verbatim .tsv: "
            f'python -c "from csaligner.data import unquote_tsv; print(unquote_tsv({str(path)!r}, {str(fixed)!r}))"'
        )
    else:  # unquote_tsv refuses a CR: a verbatim .tsv row is one line, as write_manifest writes it
        fix = (
            f"convert it to .jsonl, since line {cr[0]} {cr[1]} holds a carriage return, which a verbatim .tsv "
            f'cannot: python -c "from csaligner.data import read_manifest, write_manifest; {_jsonl_fix(path)}"'
        )
    warnings.warn(
        f"{path}: {len(found)} fields on {len(lines)} lines look csv-quoted (lines {shown}), "
        f"e.g. line {line} {column} {value[:80]!r}: whole field in quotes, quotes inside doubled, as older "
        "csaligner versions wrote .tsv fields holding a quote or a carriage return. They are read verbatim, "
        f"quotes included. If csaligner wrote this file, {fix} "
        "(or read it with read_manifest(..., tsv_quoting='csv')); if the quotes are meant, ignore this warning",
        CsvQuotedTsvWarning,
        stacklevel=3,
    )


def read_tsv_rows(path: Path, quoting: TsvQuoting = "verbatim") -> list[tuple[str, dict[str, str]]]:
    """(where, row) pairs of a tab-separated file; blank lines are skipped.

    Args:
        path: the .tsv file; its first line names the columns.
        quoting: "verbatim" (no quoting, one row per line; warns with `CsvQuotedTsvWarning` when fields
            look csv-quoted by an older csaligner) or "csv" (csv quoting with a tab delimiter, strictly,
            as older csaligner versions wrote .tsv).
    """
    if quoting not in TSV_QUOTINGS:
        raise ValueError(f"tsv quoting must be one of {TSV_QUOTINGS}, got {quoting!r}")
    if quoting == "csv":
        return read_csv_rows(path, delimiter="\t")
    rows: list[tuple[str, dict[str, str]]] = []
    bad: list[tuple[int, int, str]] = []  # rows with a wrong field count: all reported, the first in full
    quoted: list[tuple[int, str, str]] = []  # fields that look csv-quoted: reported, not changed
    with open(path, newline="\n", encoding="utf-8-sig") as f:  # only \n ends a line; -sig drops a BOM
        lines = (line.removesuffix("\n").removesuffix("\r") for line in f)
        header = next(lines, "").split("\t")
        for n, line in enumerate(lines, 2):
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                bad.append((n, len(fields), line))
                continue
            quoted += [(n, c, v) for c, v in zip(header, fields, strict=True) if looks_csv_quoted(v)]
            rows.append((f"{path}:{n}", dict(zip(header, fields, strict=True))))
    if bad:
        raise _fields_error(path, bad, header, "tab")
    if quoted:
        _warn_csv_quoted(path, quoted)
    return rows


def _bare_cr_error(path: Path, n: int, line: str, header: list[str]) -> ValueError | None:
    """The error for .tsv line `n` when it holds a CR outside quotes (None when it does not).

    The old csv-quoting .tsv writer quoted every field holding a CR, so such a line was not written by it:
    the file is a verbatim .tsv, whose reader keeps the CR as part of the field.
    """
    fields = line.removesuffix("\n").removesuffix("\r").split("\t")
    at = next(
        ((c, v) for c, v in zip(header, fields, strict=False) if "\r" in v and not (v[:1] == v[-1:] == '"')), None
    )
    if at is None:
        return None
    return ValueError(
        f"{path}:{n}: {at[0]} {at[1][:80]!r} holds a carriage return (\\r) outside quotes, which csv quoting "
        "reads as the end of a row; older csaligner versions quoted every field holding one, so this file is "
        "not csv-quoted: read it verbatim (tsv_quoting='verbatim', the default), which keeps the \\r in the "
        "field, and do not unquote_tsv it"
    )


def _csv_records(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (line, fields) records of a csv-quoted file, read strictly (errors name the line).

    A .tsv row ends at a \\n only, as in the verbatim reader, so a quoted CR (which the old .tsv writer wrote)
    stays in its field and a bare CR is an error naming it; a .csv row ends at any line break.
    """
    tsv = delimiter == "\t"
    sep, hint = ("tab", _TSV_CSV_QUOTING_HINT) if tsv else ("comma", _CSV_QUOTING_HINT)
    records: list[tuple[int, list[str]]] = []
    bad: list[tuple[int, int, str]] = []  # rows with a wrong field count: all reported, the first in full
    header: list[str] | None = None
    last = [""]  # the physical line the reader read last, for the bare-CR diagnosis

    def lines(f: TextIO) -> Iterator[str]:
        for line in f:
            last[0] = line
            yield line

    with open(path, newline="\n" if tsv else "", encoding="utf-8-sig") as f:
        reader = csv.reader(lines(f), delimiter=delimiter, strict=True)
        start = 1  # file line the current record starts on
        try:
            for fields in reader:
                end = reader.line_num
                if header is None:
                    header = fields
                elif fields:  # [] is a blank line
                    broken = next((v for v in fields if "\n" in v or (not tsv and "\r" in v)), None)
                    if broken is not None:
                        raise ValueError(
                            f"{path}:{start}: a quoted field spans lines {start}-{end} ({broken[:80]!r}), so a "
                            f"quote was probably left open and the rows after it were swallowed; {hint}"
                        )
                    if len(fields) != len(header):
                        bad.append((start, len(fields), delimiter.join(fields)))
                    else:
                        records.append((start, fields))
                start = end + 1
        except csv.Error as err:
            n = reader.line_num
            cr = _bare_cr_error(path, n, last[0], header or last[0].split("\t")) if tsv else None
            raise (cr or ValueError(f"{path}:{start}: malformed CSV ({err}); {hint}")) from err
    if bad and header is not None:
        raise _fields_error(path, bad, header, sep)
    return header or [], records


def read_csv_rows(path: Path, delimiter: str = ",") -> list[tuple[str, dict[str, str]]]:
    """(where, row) pairs of a file with standard (RFC 4180) quoting, read strictly: a malformed or runaway
    quote, a field spanning lines or a wrong field count is an error naming the line."""
    header, records = _csv_records(path, delimiter)
    return [(f"{path}:{n}", dict(zip(header, fields, strict=True))) for n, fields in records]


def unquote_tsv(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Rewrite a .tsv written with csv quoting (older csaligner versions) as the verbatim .tsv read now.

    Args:
        src: the csv-quoted .tsv; read strictly, so a file that is not valid csv quoting fails by line.
        dest: where to write (may be `src`: the file is written to a temporary name and renamed).

    Returns:
        How many fields changed (were quoted in `src`); 0 means the file was already verbatim-safe.

    Raises:
        ValueError: `src` is malformed (a CR outside quotes, for one, means it is already verbatim), or a value
            holds a tab or a carriage return, which a verbatim .tsv cannot hold (write_manifest refuses them too).
    """
    src, dest = Path(src), Path(dest)
    header, records = _csv_records(src, "\t")
    with open(src, encoding="utf-8-sig", newline="") as f:  # rows end at \n; a quoted CR stays in its line
        raw = f.read().split("\n")  # records are single lines: _csv_records refuses quoted line feeds
    changed = 0
    for n, fields in [(1, header), *records]:
        held = next(
            ((c, v, w) for c, v in zip(header, fields, strict=True) for ch, w in _UNHELD.items() if ch in v), None
        )
        if held is not None:
            column, value, what = held
            raise ValueError(
                f"{src}:{n}: {column} {value[:80]!r} holds {what}, "
                f"which a verbatim .tsv cannot; convert the file to .jsonl instead: {_jsonl_fix(src)}"
            )
        changed += sum(a != b for a, b in zip(raw[n - 1].removesuffix("\r").split("\t"), fields, strict=True))
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.writelines("\t".join(fields) + "\n" for fields in [header, *(r for _, r in records)])
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return changed
