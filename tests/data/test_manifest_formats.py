"""Delimited manifests: TSV is read and written verbatim, CSV with standard quoting; malformed rows fail by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from csaligner.data import ImageTextManifest, read_flickr8k, read_manifest, write_manifest
from csaligner.data.delimited import read_tsv_rows

# Captions that a quote-parsing TSV reader or a naive CSV writer would mangle.
AWKWARD = (
    '"Stop" sign on a pole',
    '"Welcome sign',
    'a sign that says " active . "',
    'ends with a quote"',
    "commas, in, it",
    "it's a 'single' quote",
)


def _manifest(
    captions: tuple[str, ...],
    image_ids: tuple[str, ...] = ("a.jpg", 'we"ird,name.jpg'),
) -> ImageTextManifest:
    return ImageTextManifest(
        image_ids=image_ids,
        image_paths=tuple(f"/imgs/{i}" for i in image_ids),
        captions=captions,
        text_to_image=tuple(j % len(image_ids) for j in range(len(captions))),
        caption_ids=tuple(f"c{j}" for j in range(len(captions))),
        name="awkward",
    )


def test_tsv_caption_starting_with_a_quote_is_read_verbatim(tmp_path: Path) -> None:
    # The reviewer's repro: a quote-parsing reader swallowed rows c and d into b's caption.
    (tmp_path / "m.tsv").write_text(
        'image\tcaption\na.jpg\ta pole\nb.jpg\t"Welcome sign\nc.jpg\t"Stop" sign on a pole\nd.jpg\ta dog\n'
    )
    m = read_manifest(tmp_path / "m.tsv")
    assert m.image_ids == ("a.jpg", "b.jpg", "c.jpg", "d.jpg")
    assert m.captions == ("a pole", '"Welcome sign', '"Stop" sign on a pole', "a dog")
    assert m.text_to_image == (0, 1, 2, 3)


def test_tsv_crlf_blank_lines_and_text_only_rows(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_bytes(b'image\tcaption\r\na.jpg\t"x"\r\n\r\n\tjust text\r\nb.jpg\t\r\n')
    m = read_manifest(tmp_path / "m.tsv")
    assert m.image_ids == ("a.jpg", "b.jpg") and m.captions == ('"x"', "just text") and m.text_to_image == (0, -1)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("a.jpg\ta dog\nb.jpg\ta cat\textra\n", r"m\.tsv:3: 3 tab-separated fields, expected 2"),
        ("a.jpg\ta dog\nb.jpg\n", r"m\.tsv:3: 1 tab-separated field, expected 2"),
        ("a.jpg\ta dog\n\t\n", r"m\.tsv:3: both image and caption are empty"),
    ],
)
def test_tsv_bad_rows_name_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "m.tsv").write_text("image\tcaption\n" + body)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / "m.tsv")


@pytest.mark.parametrize(
    ("name", "body", "match"),
    [
        # an image-only row whose empty trailing caption lost its tab (an editor stripped trailing whitespace)
        (
            "m.tsv",
            "image\tcaption\na.jpg\ta dog\nb.jpg\nc.jpg\n",
            r"m\.tsv:3: 1 tab-separated field, expected 2 \(image, caption\): caption missing in 'b\.jpg'; "
            r"every column needs its tab even when empty \(an image-only row under image, caption is 'a\.jpg\\t'\)"
            r".*strips trailing whitespace.*add the missing tabs or fill the fields; "
            r"2 rows of m\.tsv have the wrong number of fields, at lines 3, 4$",
        ),
        (
            "m.csv",
            "image,caption\nb.jpg\na.jpg,a dog\n",
            r"m\.csv:2: 1 comma-separated field, expected 2 \(image, caption\): caption missing in 'b\.jpg'; "
            r".*'a\.jpg,'\): add the missing commas or fill the fields$",
        ),
    ],
    ids=["tsv", "csv"],
)
def test_short_rows_name_the_missing_columns_the_fix_and_the_count(
    tmp_path: Path, name: str, body: str, match: str
) -> None:
    (tmp_path / name).write_text(body)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / name)


def test_shared_flickr8k_captions_have_no_short_rows(shared_captions_tsv: Path) -> None:
    """The real captions.tsv (35,000 rows, none with an empty trailing caption) loads under the strict reader."""
    tsv = shared_captions_tsv
    rows = read_tsv_rows(tsv)
    assert len(rows) == 35_000 and all(r["caption"].strip() for _, r in rows)
    assert read_flickr8k(tsv.parent, "dev").num_texts == 5_000


def test_csv_keeps_standard_quoting(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text('image,caption\na.jpg,"""Stop"" sign, on a pole"\nb.jpg,plain\n')
    assert read_manifest(tmp_path / "m.csv").captions == ('"Stop" sign, on a pole', "plain")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        # a runaway quote that closes later: the caption would swallow the next row
        ('a.jpg,x\nb.jpg,"Welcome sign\nc.jpg,a cat"\nd.jpg,a dog\n', r"m\.csv:3: .*spans lines 3-4"),
        # a runaway quote that never closes
        ('a.jpg,x\nb.jpg,"Welcome sign\nc.jpg,a cat\n', r"m\.csv:3: .*unexpected end of data"),
        # quotes inside an unquoted field would be dropped silently by a lenient reader
        ('a.jpg,x\nb.jpg,"Stop" sign on a pole\n', r"m\.csv:3: .*\"\"\"Stop\"\" sign"),
        # an unquoted comma would cut the caption short
        ("a.jpg,a dog, running\n", r"m\.csv:2: 3 comma-separated fields, expected 2"),
        ("a.jpg\n", r"m\.csv:2: 1 comma-separated field, expected 2"),
    ],
)
def test_csv_malformed_rows_name_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "m.csv").write_text("image,caption\n" + body)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_tsv_is_written_verbatim(tmp_path: Path) -> None:
    m = _manifest(AWKWARD)
    lines = write_manifest(m, tmp_path / "m.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "image\tcaption\tgroup\tcaption_id\tlabel"
    assert lines[1] == '/imgs/a.jpg\t"Stop" sign on a pole\ta.jpg\tc0\t'  # no quoting added
    assert lines[2] == '/imgs/we"ird,name.jpg\t"Welcome sign\twe"ird,name.jpg\tc1\t'
    assert len(lines) == 1 + len(AWKWARD)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl", ".parquet"])
def test_awkward_captions_round_trip(tmp_path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    tab = () if suffix == ".tsv" else ("a\ttab inside",)
    m = _manifest(AWKWARD + tab)
    back = read_manifest(write_manifest(m, tmp_path / f"m{suffix}"))
    assert back.captions == m.captions and back == m


@pytest.mark.parametrize(
    ("suffix", "caption", "match"),
    [
        (".tsv", "a\ttab", r"1 caption field contains a tab.*'a\\ttab'.*write \.csv or \.jsonl"),
        (".tsv", "two\nlines", r"1 caption field contains a line break.*write \.jsonl"),
        (".csv", "two\nlines", r"1 caption field contains a line break.*write \.jsonl"),
        (".csv", "carriage\rreturn", r"line break.*write \.jsonl"),
    ],
)
def test_write_rejects_what_the_format_cannot_hold(tmp_path: Path, suffix: str, caption: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_manifest(_manifest(("fine", caption)), tmp_path / f"m{suffix}")
    assert not (tmp_path / f"m{suffix}").exists()  # nothing half-written


def test_tsv_write_checks_image_columns_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image field contains a tab"):
        write_manifest(_manifest(("x",), image_ids=("a\tb.jpg",)), tmp_path / "m.tsv")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n["b.jpg", "y"]\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: expected a JSON object .*got list"):
        read_manifest(tmp_path / "m.jsonl")


def test_jsonl_keeps_quotes_and_newlines_in_captions(tmp_path: Path) -> None:
    m = _manifest(('"Stop" sign', "two\nlines"))
    assert read_manifest(write_manifest(m, tmp_path / "m.jsonl")) == m


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_manifest_that_is_not_utf8_names_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    path.write_bytes("image\tcaption\na.jpg\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=rf"m\{suffix} is not UTF-8 text \(byte b'\\xe9' at offset \d+\); save it as UTF-8"
    ):
        read_manifest(path)
