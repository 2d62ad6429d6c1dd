"""Zero-shot class names: the FOLDER=NAME renames of `csalign eval --class-names` and the name each
class folder is prompted with.

An item is split at an "=" after a class folder's name, so folders and names may hold "="; a backslash
escapes ("\\\\" is a backslash, "\\=" an "=" of a folder or a name) where the split would be ambiguous
or a folder ends in a backslash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from csaligner.eval._common import text_file_entries


class RenameItem(NamedTuple):
    """One FOLDER=NAME item of `--class-names`, before it is matched with the class folders."""

    at: str
    """Where it was written, for errors: "--class-names item 2" or "names.txt line 3"."""
    text: str
    readings: tuple[tuple[str, str], ...]
    """Every (folder, name) it can mean, escapes read: one per "=" (not one written "\\=") with text on
    both sides."""


LITERAL_BACKSLASH, LITERAL_EQUALS = "\\\\", "\\="
"""How a FOLDER=NAME item writes a backslash, and an "=" that belongs to the folder or the name rather
than separating them. A backslash before anything else, or at the end, is an error."""


def _escape(text: str) -> str:
    return text.replace("\\", LITERAL_BACKSLASH).replace("=", LITERAL_EQUALS)


def escape_class_rename(folder: str, name: str) -> str:
    """The FOLDER=NAME item that renames exactly `folder` to `name` (each backslash of either written
    "\\\\", each "=" written "\\=")."""
    return f"{_escape(folder)}={_escape(name)}"


def _shown(text: str) -> str:
    """An item in an error as it was written: in quotes, its backslashes not doubled as repr() would."""
    return f"'{text}'"


def _unescape(at: str, text: str) -> list[tuple[str, bool]]:
    """The characters of an item, each with whether a backslash escaped it ("\\\\" -> "\\", "\\=" -> "=").

    Raises:
        ValueError: a backslash before any other character or at the end, with the item as it should read.
    """
    chars: list[tuple[str, bool]] = []
    i = 0
    while i < len(text):
        if text[i] != "\\":
            chars.append((text[i], False))
            i += 1
        elif text[i + 1 : i + 2] in ("\\", "="):
            chars.append((text[i + 1], True))
            i += 2
        else:
            raise _bad_escape(at, text, i)
    return chars


def _bad_escape(at: str, text: str, i: int) -> ValueError:
    """The error for the lone backslash at text[i], with the item each lone backslash doubled."""
    fixed, j = "", 0
    while j < len(text):
        pair = text[j : j + 2]
        step = 2 if pair in (LITERAL_BACKSLASH, LITERAL_EQUALS) else 1
        fixed += LITERAL_BACKSLASH if pair[:1] == "\\" and step == 1 else text[j : j + step]
        j += step
    what = "ends in a lone backslash" if i == len(text) - 1 else f"has a backslash before {text[i + 1]!r}"
    comma = " (a name holding a comma needs a file)" if at.startswith("--") and i == len(text) - 1 else ""
    return ValueError(
        f'{at}: {_shown(text)} {what}{comma}; a backslash escapes only a backslash or an "=": write one that is '
        f'part of a folder or a name as {LITERAL_BACKSLASH} (here {_shown(fixed)}) and such an "=" as {LITERAL_EQUALS}'
    )


def _readings(at: str, text: str) -> tuple[tuple[str, str], ...]:
    """(folder, name) for each "=" of `text` not written "\\=" whose two sides are not blank (escapes read,
    sides stripped)."""
    chars = _unescape(at, text)
    out = []
    for i, (char, escaped) in enumerate(chars):
        if char == "=" and not escaped:
            folder, name = ("".join(c for c, _ in side).strip() for side in (chars[:i], chars[i + 1 :]))
            if folder and name:
                out.append((folder, name))
    return tuple(out)


def _not_a_pair(at: str, text: str) -> ValueError:
    """The error for an item with no "=" between two non-blank sides; when its "=" is escaped, how to
    write a folder or name that ends in a backslash instead."""
    hint, i = "", 0
    while i < len(text) - 2 and text[i : i + 2] != LITERAL_EQUALS:  # the first escaped "=" with text after it
        i += 2 if text[i] == "\\" else 1  # every backslash starts a two-character escape (checked before)
    if text[i : i + 2] == LITERAL_EQUALS and i < len(text) - 2:
        written = text[:i] + LITERAL_BACKSLASH + "=" + text[i + 2 :]
        hint = (
            f' (its "=" is written {LITERAL_EQUALS}, an "=" inside a folder or a name; for a folder or name ending '
            f"in a backslash write {LITERAL_BACKSLASH}: {_shown(written)})"
        )
    return ValueError(
        f"{at}: {_shown(text)} is not FOLDER=NAME{hint}; write pairs like roses=rose (in a file one a line, "
        "on the command line comma-separated: roses=rose,tulips=tulip; a name holding a comma needs a file)"
    )


def read_class_renames(spec: str | Path) -> list[RenameItem]:
    """The FOLDER=NAME items of a file (one a line) or a comma-separated string, checked as text only.

    An item may read several ways when a folder or a name holds "=" (a=b=c: folder "a" or "a=b");
    `parse_class_renames` picks the reading that names a class folder.

    Raises:
        ValueError: an item with no "=" between two non-blank sides or with a backslash that escapes
            nothing, an item that can only rename a folder an earlier one renames, or no item at all.
    """
    path = Path(spec)
    if path.is_file():
        items = [(f"{path} line {n}", text) for n, text in text_file_entries(path)]
    elif "=" not in str(spec):
        raise ValueError(
            f"--class-names {_shown(str(spec))} is neither a file nor FOLDER=NAME pairs; pass e.g. "
            "roses=rose,tulips=tulip or a file with one roses=rose pair a line"
        )
    else:
        items = [(f"--class-names item {i}", text.strip()) for i, text in enumerate(str(spec).split(","), 1)]
    out: list[RenameItem] = []
    certain: dict[str, str] = {}  # {folder: name} of the items that can be read one way only
    for at, text in items:
        readings = _readings(at, text)
        if not readings:
            raise _not_a_pair(at, text)
        if len(readings) == 1:  # an item that can mean two folders is checked once they are known
            folder, name = readings[0]
            if folder in certain:
                raise ValueError(f"{at}: class {folder!r} is renamed twice ({certain[folder]!r} and {name!r})")
            certain[folder] = name
        out.append(RenameItem(at, text, readings))
    if not out:  # only a file can be empty: every comma-separated item is checked above
        raise ValueError(f"{path} names no class; write FOLDER=NAME pairs such as roses=rose")
    return out


def parse_class_renames(spec: str | Path, classes: Sequence[str] | None = None) -> dict[str, str]:
    """`folder=prompt name` pairs from a file (one a line) or a comma-separated string -> {folder: name}.

    A file's blank lines and "#" lines are skipped. A folder or a name may hold "=": an item is split
    at the "=" whose left side is one of `classes` (so a=b=c renames folder "a=b" to "c" when there is
    no folder "a"). Where several splits name a class folder, write each "=" that belongs to a folder
    or a name as "\\=" (a\\=b=c renames "a=b"; a=b\\=c renames "a" to "b=c"). Without `classes`, an
    item is split at its first such "=". A backslash escapes: "\\=" is an "=" and "\\\\" a backslash of
    the folder or the name (a\\\\=b renames folder "a\\" to "b"); `escape_class_rename` writes any pair.

    Raises:
        ValueError: a pair without "=", with an empty side, a backslash before anything but a backslash
            or "=" (or at the end), a folder named twice, a folder that is not among `classes`, or an
            item that could rename two of `classes`.
    """
    renames: dict[str, str] = {}
    for item in read_class_renames(spec):
        known = item.readings if classes is None else tuple(r for r in item.readings if r[0] in classes)
        if len(known) > 1 and classes is not None:
            raise _ambiguous_rename(item, known)
        folder, name = known[0] if known else item.readings[0]  # none known: reported below as not a class
        if folder in renames:
            raise ValueError(f"{item.at}: class {folder!r} is renamed twice ({renames[folder]!r} and {name!r})")
        renames[folder] = name
    if classes is not None:
        _check_known(renames, classes)
    return renames


def _ambiguous_rename(item: RenameItem, readings: Sequence[tuple[str, str]]) -> ValueError:
    """The error for an item that could rename several class folders, with the unambiguous way to write each."""
    options = " or ".join(f"{folder!r} (as {name!r})" for folder, name in readings)
    written = [escape_class_rename(folder, name) for folder, name in readings]
    which = ", ".join(f"{text} for {folder!r}" for text, (folder, _) in zip(written, readings, strict=True))
    shell = f" (in single quotes for the shell: --class-names '{written[0]}')" if item.at.startswith("--") else ""
    return ValueError(
        f'{item.at}: {_shown(item.text)} could rename class {options}; write each "=" that is part of a folder or '
        f'a name as "{LITERAL_EQUALS}" to say which: {which}{shell}'
    )


def _check_known(renames: Mapping[str, str], class_names: Sequence[str]) -> None:
    unknown = [k for k in renames if k not in class_names]
    if unknown:
        raise ValueError(f"class names {unknown} are not classes of this data; the classes are {list(class_names)}")


def prompt_class_names(class_names: Sequence[str], renames: Mapping[str, str]) -> list[str]:
    """The name each class is prompted with: `renames[folder]`, or the folder name when not renamed.

    Raises:
        ValueError: a renamed class is not among `class_names`, or two classes would get the same name
            (their prompts would be identical and zero-shot could not tell them apart).
    """
    _check_known(renames, class_names)
    names = [renames.get(c, c) for c in class_names]
    seen: dict[str, str] = {}
    for folder, name in zip(class_names, names, strict=True):
        if name in seen:
            raise ValueError(
                f"classes {seen[name]!r} and {folder!r} would both be prompted as {name!r}; zero-shot could not "
                "tell them apart, so give them distinct names"
            )
        seen[name] = folder
    return names
