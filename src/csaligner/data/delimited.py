"""Delimited manifest files: .tsv read verbatim, .csv with standard quoting read strictly.

TSV is plain: one row per line, fields split on every tab, quotes kept as written (a caption may
start with `"`), so it cannot hold tabs or line breaks. CSV uses standard quoting, read strictly:
a malformed quote, a field spanning lines (a runaway quote) or a wrong field count is an error
naming the file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

# A quote at the start of a CSV field opens a quoted field; shown in errors as the way to write one.
_CSV_QUOTING_HINT = (
    'quote the whole field and double the quotes inside it ("""Stop"" sign" reads as "Stop" sign), '
    "or use .tsv, which is read verbatim"
)


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


def read_tsv_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Tab-separated, read verbatim: no quoting, one row per line; blank lines are skipped."""
    rows: list[tuple[str, dict[str, str]]] = []
    bad: list[tuple[int, int, str]] = []  # rows with a wrong field count: all reported, the first in full
    with open(path, newline="\n", encoding="utf-8-sig") as f:  # only \n ends a line; -sig drops a BOM
        lines = (line.removesuffix("\n").removesuffix("\r") for line in f)
        header = next(lines, "").split("\t")
        for n, line in enumerate(lines, 2):
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                bad.append((n, len(fields), line))
            else:
                rows.append((f"{path}:{n}", dict(zip(header, fields, strict=True))))
    if bad:
        raise _fields_error(path, bad, header, "tab")
    return rows


def read_csv_rows(path: Path) -> list[tuple[str, dict[str, str]]]:
    """Comma-separated with standard (RFC 4180) quoting, strictly: a malformed or runaway quote is an error."""
    rows: list[tuple[str, dict[str, str]]] = []
    bad: list[tuple[int, int, str]] = []  # rows with a wrong field count: all reported, the first in full
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        header: list[str] | None = None
        start = 1  # file line the current record starts on
        try:
            for fields in reader:
                where, end = f"{path}:{start}", reader.line_num
                if header is None:
                    header = fields
                elif fields:  # [] is a blank line
                    broken = next((v for v in fields if "\n" in v or "\r" in v), None)
                    if broken is not None:
                        raise ValueError(
                            f"{where}: a quoted field spans lines {start}-{end} ({broken[:80]!r}), so a quote was "
                            f"probably left open and the rows after it were swallowed; {_CSV_QUOTING_HINT}"
                        )
                    if len(fields) != len(header):
                        bad.append((start, len(fields), ",".join(fields)))
                    else:
                        rows.append((where, dict(zip(header, fields, strict=True))))
                start = end + 1
        except csv.Error as err:
            raise ValueError(f"{path}:{start}: malformed CSV ({err}); {_CSV_QUOTING_HINT}") from err
    if bad and header is not None:
        raise _fields_error(path, bad, header, "comma")
    return rows
