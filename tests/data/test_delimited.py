""".tsv csv-quoted by older csaligner versions: reported when read verbatim, readable and rewritable on request."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

from csaligner.data import CsvQuotedTsvWarning, ImageTextManifest, read_manifest, unquote_tsv
from csaligner.data.delimited import looks_csv_quoted, read_tsv_rows
from csaligner.data.manifest import manifest_rows

COLUMNS = ["image", "caption", "group", "caption_id", "label"]


def _manifest() -> ImageTextManifest:
    ids = ("a.jpg", 'we"ird.jpg', "c.jpg")
    return ImageTextManifest(
        image_ids=ids,
        image_paths=tuple(f"/imgs/{i}" for i in ids),
        captions=('He said "hi"', '"Stop" sign', "plain", 'a "quoted" word', "ok"),
        text_to_image=(0, 1, 2, 0, 2),
        caption_ids=("c0", "c1", "c2", "c3", "c4"),
        name="old",
    )


def _write_like_the_old_writer(m: ImageTextManifest, path: Path) -> Path:
    """write_manifest for .tsv before commit 32501a7: csv.DictWriter with a tab delimiter, default quoting."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t")
        w.writeheader()
        w.writerows(manifest_rows(m))
    return path


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ('"He said ""hi"""', True),
        ('"""Stop"" sign"', True),
        ('""""', True),  # a lone quote, quoted
        ('"a\rb"', True),  # the old writer quoted carriage returns too
        ('"Stop" sign', False),  # ordinary captions that hold quotes
        ('"x"', False),  # the old writer never quoted a field without a quote or CR inside
        ('a sign that says " active . "', False),
        ('"a "quoted" word"', False),  # inner quotes not doubled
        ('"odd ""run"""" here"', True),
        ('"odd """run"" here"', False),  # a run of three inner quotes is not csv escaping
        ('"', False),
        ("", False),
    ],
)
def test_looks_csv_quoted(value: str, quoted: bool) -> None:
    assert looks_csv_quoted(value) is quoted


def test_old_writer_output_read_verbatim_warns_with_count_lines_and_fix(tmp_path: Path) -> None:
    path = _write_like_the_old_writer(_manifest(), tmp_path / "m.tsv")
    match = (
        r"m\.tsv: 5 fields on 3 lines look csv-quoted \(lines 2, 3, 5\), "
        r"e\.g\. line 2 caption '\"He said \"\"hi\"\"\"'.*read verbatim, quotes included"
        r".*unquote_tsv\('.*m\.tsv', '.*m\.unquoted\.tsv'\).*tsv_quoting='csv'"
    )
    with pytest.warns(CsvQuotedTsvWarning, match=match):
        m = read_manifest(path)
    # Nothing is changed behind the user's back: the fields are still verbatim.
    assert m.captions[:2] == ('"He said ""hi"""', '"""Stop"" sign"') and m.captions[3] == '"a ""quoted"" word"'
    assert m.image_ids[1] == '"we""ird.jpg"'


def test_tsv_quoting_csv_reads_the_old_writer_output(tmp_path: Path) -> None:
    path = _write_like_the_old_writer(_manifest(), tmp_path / "m.tsv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_manifest(path, image_root="/", tsv_quoting="csv") == _manifest()


def test_tsv_quoting_csv_is_strict_and_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_text('image\tcaption\na.jpg\tx\nb.jpg\t"Stop" sign\n')
    with pytest.raises(ValueError, match=r"m\.tsv:3: malformed CSV .*tsv_quoting='verbatim', the default"):
        read_manifest(tmp_path / "m.tsv", tsv_quoting="csv")
    with pytest.raises(ValueError, match=r"tsv_quoting must be one of \('verbatim', 'csv'\), got 'quoted'"):
        read_manifest(tmp_path / "m.tsv", tsv_quoting="quoted")  # type: ignore[arg-type]


def test_ordinary_captions_with_quotes_do_not_warn(tmp_path: Path) -> None:
    captions = ['"Stop" sign', '"x"', 'says " active . "', 'ends with a quote"', '"Welcome sign', '""']
    body = "".join(f"i{k}.jpg\t{c}\n" for k, c in enumerate(captions))
    (tmp_path / "m.tsv").write_text("image\tcaption\n" + body)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_manifest(tmp_path / "m.tsv").captions == (*captions[:-1], '""')


def test_unquote_tsv_rewrites_an_old_file_verbatim(tmp_path: Path) -> None:
    old = _write_like_the_old_writer(_manifest(), tmp_path / "m.tsv")
    assert unquote_tsv(old, tmp_path / "new.tsv") == 5  # three captions, one image path and its group were quoted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_manifest(tmp_path / "new.tsv", image_root="/") == _manifest()
    assert b"\r" not in (tmp_path / "new.tsv").read_bytes()  # one \n per row, like write_manifest
    assert unquote_tsv(old, old) == 5 and old.read_bytes() == (tmp_path / "new.tsv").read_bytes()  # in place
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["m.tsv", "new.tsv"]  # no temporary left
    # A verbatim file is not csv-quoted: rewriting it again fails by line instead of mangling it.
    with pytest.raises(ValueError, match=r"new\.tsv:3: malformed CSV"):
        unquote_tsv(tmp_path / "new.tsv", tmp_path / "again.tsv")


def test_unquote_tsv_refuses_values_a_verbatim_tsv_cannot_hold(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_text('image\tcaption\na.jpg\t"a\ttab"\n')
    with pytest.raises(ValueError, match=r"m\.tsv:2: caption 'a\\ttab' holds a tab.*\.jsonl"):
        unquote_tsv(tmp_path / "m.tsv", tmp_path / "new.tsv")
    assert not (tmp_path / "new.tsv").exists()


def test_shared_flickr8k_captions_raise_no_quoting_warning(shared_captions_tsv: Path) -> None:
    """The real captions.tsv has 101 captions with quotes, none of them csv-quoted: no false alarm."""
    tsv = shared_captions_tsv
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = read_tsv_rows(tsv)
    assert sum('"' in r["caption"] for _, r in rows) > 0


def test_a_bare_carriage_return_in_a_verbatim_tsv_is_named_when_read_as_csv_quoted(tmp_path: Path) -> None:
    """A CR outside quotes was never written by the old writer (it quoted such fields): say so, by its line."""
    (tmp_path / "m.tsv").write_bytes(b"image\tcaption\na.jpg\tone\rtwo\nb.jpg\tplain\n")
    assert read_manifest(tmp_path / "m.tsv", image_root="/").captions == ("one\rtwo", "plain")  # verbatim: fine
    match = (
        r"m\.tsv:2: caption 'one\\rtwo' holds a carriage return \(\\r\) outside quotes.*"
        r"not csv-quoted.*read it verbatim \(tsv_quoting='verbatim', the default\)"
    )
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / "m.tsv", tsv_quoting="csv")
    with pytest.raises(ValueError, match=match):
        unquote_tsv(tmp_path / "m.tsv", tmp_path / "new.tsv")
    assert not (tmp_path / "new.tsv").exists()


def test_old_writer_carriage_returns_are_read_and_converted_to_jsonl(tmp_path: Path) -> None:
    """The old writer quoted a caption holding a CR; a verbatim .tsv cannot hold one, so the fix is .jsonl."""
    m = ImageTextManifest(
        image_ids=("a.jpg", "b.jpg"),
        image_paths=("/imgs/a.jpg", "/imgs/b.jpg"),
        captions=("one\rtwo", "three"),
        text_to_image=(0, 1),
        caption_ids=("c0", "c1"),
        name="m",
    )
    path = _write_like_the_old_writer(m, tmp_path / "m.tsv")
    assert b'"one\rtwo"' in path.read_bytes()
    fix = r"holds a carriage return.*write_manifest\(read_manifest\('.*m\.tsv', tsv_quoting='csv'\), '.*m\.jsonl'\)"
    with pytest.warns(CsvQuotedTsvWarning, match=r"line 2 caption '\"one\\rtwo\"'.*a carriage return.*" + fix):
        read_manifest(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_manifest(path, image_root="/imgs", tsv_quoting="csv").captions == m.captions
    with pytest.raises(ValueError, match=r"m\.tsv:2: caption 'one\\rtwo' " + fix):
        unquote_tsv(path, tmp_path / "new.tsv")
