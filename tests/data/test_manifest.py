"""Manifest files, the shared data-set readers and the --data spec syntax."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from csaligner.data import (
    ImageTextManifest,
    data_root,
    read_class_folders,
    read_coco_captions,
    read_flickr8k,
    read_manifest,
    resolve_dataset,
    write_manifest,
)
from csaligner.data.datasets import round_robin_head
from csaligner.data.unpaired import concat_manifests, image_pool, text_pool

from .conftest import write_jpegs


def _mixed(m: ImageTextManifest, tmp_path: Path) -> ImageTextManifest:
    """Paired items + one caption-less image + the fixture's unpaired caption."""
    extra = write_jpegs(tmp_path / "extra", 1, seed=5)
    return concat_manifests(m, image_pool(extra, ids=["lonely.jpg"]), name="mixed")


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_round_trip(tiny_manifest: ImageTextManifest, tmp_path: Path, suffix: str) -> None:
    m = _mixed(tiny_manifest, tmp_path)
    back = read_manifest(write_manifest(m, tmp_path / f"m{suffix}"))
    assert back == m  # every field but the name
    assert back.content_hash() == m.content_hash()
    assert back.num_images == 8 and back.text_to_image.count(-1) == 1 and 7 not in back.text_to_image


def test_class_folders_say_what_they_leave_out(class_root: Path) -> None:
    (class_root / "daisy" / "notes.txt").write_text("not an image")
    (class_root / "roses" / "more").mkdir()
    (class_root / "roses" / ".DS_Store").write_text("")
    with pytest.warns(UserWarning, match=r"left out 2 entries .*\(daisy/notes\.txt, roses/more/\)"):
        m = read_class_folders(class_root)
    assert m.num_images == 9 and m.class_names == ("daisy", "roses", "tulips")
    (class_root / "lilies").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['lilies'\] hold no images"):
        read_class_folders(class_root)


def test_round_trip_with_labels(class_root: Path, tmp_path: Path) -> None:
    m = read_class_folders(class_root)
    back = read_manifest(write_manifest(m, tmp_path / "classes.jsonl"))
    assert back == m and back.class_names == ("daisy", "roses", "tulips")


def test_parquet_needs_pyarrow(tiny_manifest: ImageTextManifest, tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install pyarrow"):
            write_manifest(tiny_manifest, tmp_path / "m.parquet")
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pip install pyarrow"):
            read_manifest(tmp_path / "x.parquet")
    else:
        assert read_manifest(write_manifest(tiny_manifest, tmp_path / "m.parquet")) == tiny_manifest


def test_groups_relative_paths_and_column_aliases(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "filepath,title,caption_id\nimgs/a.jpg,a dog,0\nimgs/a.jpg,  a brown dog ,1\nimgs/b.jpg,a cat,0\n,just text,\n"
    )
    m = read_manifest(tmp_path / "m.csv")
    assert m.image_ids == ("imgs/a.jpg", "imgs/b.jpg")
    assert m.image_paths == (str(tmp_path / "imgs/a.jpg"), str(tmp_path / "imgs/b.jpg"))
    assert m.captions == ("a dog", "a brown dog", "a cat", "just text")
    assert m.text_to_image == (0, 0, 1, -1)
    other_root = read_manifest(tmp_path / "m.csv", image_root="/data")
    assert other_root.image_paths[0] == "/data/imgs/a.jpg" and other_root.content_hash() == m.content_hash()


def test_flickr_style_captions_file_reads_directly(tmp_path: Path) -> None:
    (tmp_path / "captions.tsv").write_text("image\tcaption_id\tcaption\nx.jpg\t0\tone .\nx.jpg\t1\ttwo .\n")
    m = read_manifest(tmp_path / "captions.tsv", image_root=tmp_path / "images")
    assert m.image_paths == (str(tmp_path / "images/x.jpg"),) and m.caption_ids == ("0", "1")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("picture,caption\na.jpg,x\n", "no image column"),
        ("image,words\na.jpg,x\n", "no caption column"),
        ("image,caption\n,\n", "both image and caption are empty"),
        ("image,caption,label\na.jpg,x,cat\nb.jpg,y,\n", "label column is filled for some images only"),
        ("image,caption\n", "has no rows"),
    ],
)
def test_bad_manifests_say_what_is_wrong(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.tsv")
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unknown manifest format"):
        read_manifest(tmp_path / "m.xml")


def test_manifest_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        ImageTextManifest(image_ids=("a", "a"), image_paths=("a", "a"))
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        ImageTextManifest(image_ids=("a",), image_paths=("a",), captions=("x",), text_to_image=(1,))
    with pytest.raises(ValueError, match="text_to_image entries"):
        ImageTextManifest(image_ids=("a",), image_paths=("a",), captions=("x",))


def test_hash_covers_items_not_paths_or_name(tiny_manifest: ImageTextManifest) -> None:
    h = tiny_manifest.content_hash()
    assert replace(tiny_manifest, name="other").content_hash() == h
    assert replace(tiny_manifest, image_paths=tuple("/x/" + p for p in tiny_manifest.image_ids)).content_hash() == h
    changed = replace(tiny_manifest, captions=("different", *tiny_manifest.captions[1:]))
    assert changed.content_hash() != h


def test_select_and_head(tiny_manifest: ImageTextManifest) -> None:
    sub = tiny_manifest.select_images([3, 1])
    assert sub.image_ids == ("img003.jpg", "img001.jpg")
    assert sub.text_to_image == (1, 1, 0, 0)  # captions keep manifest order, links re-indexed
    assert sub.captions[:2] == tiny_manifest.captions[2:4]
    assert tiny_manifest.head(2).num_texts == 4 and tiny_manifest.head(2).name == "tiny:2"


@pytest.mark.parametrize("rows", [[-1], [True, False], [1.0], [99]])
def test_select_images_refuses_what_is_not_an_image_row(tiny_manifest: ImageTextManifest, rows: list) -> None:
    """[-1] kept the last image and dropped its captions; [True, False] selected rows 1 and 0."""
    with pytest.raises(ValueError, match=r"rows must be integers in \[0, \d+\] \(image rows\)"):
        tiny_manifest.select_images(rows)


def test_coco_captions(tmp_path: Path) -> None:
    obj = {
        "images": [{"id": 9, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 2, "caption": "b two"},
            {"image_id": 3, "id": 7, "caption": " a one "},
            {"image_id": 9, "id": 1, "caption": "b one"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(obj))
    m = read_coco_captions(tmp_path / "c.json", tmp_path / "imgs")
    assert m.image_ids == ("a.jpg", "b.jpg") and m.captions == ("a one", "b one", "b two")
    assert m.text_to_image == (0, 1, 1) and m.image_paths[1] == str(tmp_path / "imgs/b.jpg")
    obj["annotations"].append({"image_id": 5, "id": 8, "caption": "orphan"})
    (tmp_path / "c.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="missing from 'images'"):
        read_coco_captions(tmp_path / "c.json", tmp_path)


def test_class_folders_and_round_robin_limit(class_root: Path) -> None:
    m = read_class_folders(class_root)
    assert m.class_names == ("daisy", "roses", "tulips") and m.labels == (0, 0, 1, 1, 1, 1, 2, 2, 2)
    assert m.image_ids[0] == "daisy/img000.jpg" and not m.captions
    head = round_robin_head(m, 4)
    assert [head.class_names[c] for c in head.labels] == ["daisy", "roses", "tulips", "daisy"]


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    f8k = root / "flickr8k"
    names = [p.name for p in write_jpegs(f8k / "images", 4)]
    (f8k / "splits").mkdir()
    (f8k / "splits" / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (f8k / "splits" / "dev.txt").write_text(names[3] + "\n")
    rows = ["image\tcaption_id\tcaption"] + [f"{n}\t{k}\tcaption {k} of {n}" for n in names for k in (1, 0)]
    (f8k / "captions.tsv").write_text("\n".join(rows) + "\n")
    for split in ("train", "test"):
        write_jpegs(root / "flowers" / split / "daisy", 2)
        write_jpegs(root / "flowers" / split / "roses", 2, seed=1)
    return root


def test_builtin_specs(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    m = resolve_dataset("flickr8k:train", root)
    assert m.num_images == 3 and m.num_texts == 6 and m.name == "flickr8k:train"
    assert m.captions[:2] == ("caption 0 of img000.jpg", "caption 1 of img000.jpg")  # sorted by caption_id
    assert m.caption_ids[1] == "img000.jpg#1"
    two = resolve_dataset("flickr8k:train:2", root)
    assert two.image_ids == m.image_ids[:2] and two.num_texts == 4
    assert resolve_dataset("flickr8k:dev", root).image_ids == ("img003.jpg",)
    fl = resolve_dataset("flowers:test:3", root)
    assert fl.labels == (0, 1, 0) and fl.name == "flowers:test:3"
    assert resolve_dataset(str(root / "flowers" / "train"), root).num_images == 4
    with pytest.raises(ValueError, match=r"splits \('train', 'dev'\)"):
        resolve_dataset("flickr8k:test", root)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_dataset("flickr8k:train:ten", root)
    with pytest.raises(ValueError, match=r"flickr8k:dev has 1 images, fewer than the limit in 'flickr8k:dev:5'"):
        resolve_dataset("flickr8k:dev:5", root)
    with pytest.raises(ValueError, match=r"flowers:test has 4 images.*limit <= 4, or none \(flowers:test\)"):
        resolve_dataset("flowers:test:5", root)
    assert resolve_dataset("flowers:test:4", root).num_images == 4
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_dataset("coco:val", root)


def test_flickr_split_errors(tmp_path: Path) -> None:
    root = _fake_root(tmp_path) / "flickr8k"
    with pytest.raises(FileNotFoundError, match=r"available splits: \['dev', 'train'\]"):
        read_flickr8k(root, "val")
    (root / "splits" / "dev.txt").write_text("ghost.jpg\n")
    with pytest.raises(ValueError, match="no caption"):
        read_flickr8k(root, "dev")


def test_data_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSALIGN_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("CSALIGN_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"CSALIGN_DATA=.*missing' does not exist; point it at the data folder"):
        data_root()


def test_a_missing_data_root_is_named_not_its_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong root said "flickr8k split 'train' not found ...; available splits: []"."""
    nope = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"data root {nope} \(--data-root\) does not exist; pass the folder"):
        resolve_dataset("flickr8k:train", nope)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"data root {empty} \(--data-root\) has no flowers/ folder"):
        resolve_dataset("flowers:test", empty)
    monkeypatch.setenv("CSALIGN_DATA", str(empty))
    with pytest.raises(
        FileNotFoundError, match=r"\(\$CSALIGN_DATA\) has no flickr8k/ folder.*set \$CSALIGN_DATA to it"
    ):
        resolve_dataset("flickr8k:dev")


def test_pools() -> None:
    t = text_pool(["a", "b"])
    assert t.num_images == 0 and t.text_to_image == (-1, -1)
    with pytest.raises(TypeError):
        text_pool("ab")
    i = image_pool(["/x/a.jpg"])
    assert i.image_ids == ("/x/a.jpg",) and i.num_texts == 0


def test_flickr_captions_are_read_verbatim(tmp_path: Path) -> None:
    """A caption opening with a quote is text: csv's quote handling swallowed the rows after it."""
    root = _fake_root(tmp_path) / "flickr8k"
    tsv = root / "captions.tsv"
    lines = tsv.read_text().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + '\t"Welcome sign'  # img000.jpg, caption_id 1
    tsv.write_text("\n".join(lines) + "\n")
    m = read_flickr8k(root, "train")
    assert m.num_texts == 6 and m.captions[1] == '"Welcome sign'
    assert m.captions[2] == "caption 0 of img001.jpg"
    tsv.write_text(tsv.read_text() + "img000.jpg\tfirst\tbad id\n")
    with pytest.raises(ValueError, match=r"captions.tsv:10: expected columns image, caption_id \(an integer\)"):
        read_flickr8k(root, "train")


def test_an_unknown_data_spec_lists_the_suffixes_plainly_and_says_when_nothing_is_there(tmp_path: Path) -> None:
    """The message showed the suffix tuple's repr, "(('.tsv', '.csv', ...))", and not that the path was missing."""
    (tmp_path / "notes.md").write_text("# not a manifest\n")
    with pytest.raises(ValueError) as err:
        resolve_dataset("flickr9k:dev", tmp_path)
    message = str(err.value)
    assert "nor a manifest file (.tsv, .csv, .jsonl" in message and "((" not in message
    assert "(no file or folder 'flickr9k:dev' exists); pass one of these" in message
    with pytest.raises(ValueError) as err:
        resolve_dataset(str(tmp_path / "notes.md"), tmp_path)
    assert "no file or folder" not in str(err.value)
