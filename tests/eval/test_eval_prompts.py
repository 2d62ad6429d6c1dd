"""Zero-shot prompt choice: template presets and files, class renames, and `csalign eval --templates/--class-names`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.eval.tiny_runs import TinyCaches, class_caches, make_run

import csaligner.eval.evaluate as evaluate_module
from csaligner.cli import main
from csaligner.eval.class_names import escape_class_rename, parse_class_renames, prompt_class_names, read_class_renames
from csaligner.eval.classification import (
    CLIP_IMAGENET_TEMPLATES,
    DEFAULT_TEMPLATES,
    FLOWERS102_TEMPLATES,
    load_templates,
)

CLASSES = ["daisy", "roses", "tulips"]  # the tiny class caches' folders
EQ_CLASSES = ["daisy=white", "roses", "roses=red"]  # folders holding "=": roses=red=x could rename two of them


@pytest.fixture(scope="module")
def run(caches: TinyCaches, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tok", caches.text_tokens)


def evaluate(caches: TinyCaches, classes: tuple[Path, Path], run: Path, out: Path, *extra: str) -> int:
    args = ["eval", "--image-cache", str(caches.image), "--text-cache", str(caches.text_tokens), "--run", str(run)]
    cls = ["--class-train-cache", str(classes[0]), "--class-test-cache", str(classes[1]), "--shots", "1"]
    return main([*args, *cls, "--out", str(out), *extra])


def test_template_presets() -> None:
    assert load_templates("clip-imagenet-7") == CLIP_IMAGENET_TEMPLATES == DEFAULT_TEMPLATES
    assert len(CLIP_IMAGENET_TEMPLATES) == 7
    assert load_templates("flowers102") == FLOWERS102_TEMPLATES == ("a photo of a {}, a type of flower.",)


def test_template_file_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("# flower prompts\n\n  a photo of a {}.  \nart of the {}, a flower.\n")
    assert load_templates(path) == ("a photo of a {}.", "art of the {}, a flower.")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "a photo of a {}.\n\n# note\na photo.\n",
            r't\.txt line 4: .a photo\.. has 0 "\{\}"; each template needs exactly one',
        ),
        ("a {} and a {}.\n", r'line 1: .a \{\} and a \{\}\.. has 2 "\{\}"'),
        ("# only a comment\n\n", "holds no template"),
    ],
)
def test_template_file_errors_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_templates(path)


def test_template_and_class_name_files_saved_on_windows(tmp_path: Path) -> None:
    """Notepad and PowerShell 5 write UTF-8 with a byte-order mark and CRLF: the mark is no part of the first line."""
    templates, names = tmp_path / "t.txt", tmp_path / "names.txt"
    templates.write_bytes("\ufeff# flower prompts\r\na photo of a {}.\r\n".encode())
    names.write_bytes("\ufeffroses=rose\r\ntulips=tulip\r\n".encode())
    assert load_templates(templates) == ("a photo of a {}.",)
    assert parse_class_renames(names) == {"roses": "rose", "tulips": "tulip"}
    templates.write_bytes("\ufeffa photo of a {}.\r\n".encode())
    assert load_templates(templates) == ("a photo of a {}.",)


def test_unknown_template_preset_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'flowers' are neither a preset \(clip-imagenet-7, flowers102\) nor a file"):
        load_templates("flowers")


def test_class_renames_from_pairs_and_file(tmp_path: Path) -> None:
    assert parse_class_renames("roses=rose, tulips = tulip") == {"roses": "rose", "tulips": "tulip"}
    path = tmp_path / "names.txt"
    path.write_text("# folder=prompt name\nroses = rose\n\ntulips=tulip, a spring flower\n")
    assert parse_class_renames(path) == {"roses": "rose", "tulips": "tulip, a spring flower"}  # a file keeps commas
    assert prompt_class_names(CLASSES, {"roses": "rose"}) == ["daisy", "rose", "tulips"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("roses=rose,tulips", r"--class-names item 2: 'tulips' is not FOLDER=NAME"),
        ("roses=rose, red,tulips=tulip", r"item 2: 'red' is not FOLDER=NAME.*a name holding a comma needs a file"),
        ("roses=rose,=tulip", r"item 2: '=tulip' is not FOLDER=NAME"),
        ("roses=", r"item 1: 'roses=' is not FOLDER=NAME"),
        ("roses=rose,roses=red rose", r"class 'roses' is renamed twice \('rose' and 'red rose'\)"),
        ("names.txt", r"'names.txt' is neither a file nor FOLDER=NAME pairs"),
    ],
)
def test_class_renames_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_class_renames(spec)


def test_class_rename_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("roses=rose\n\ntulips tulip\n")
    with pytest.raises(ValueError, match=r"names\.txt line 3: 'tulips tulip' is not FOLDER=NAME"):
        parse_class_renames(path)


def test_prompt_names_refuse_unknown_classes_and_duplicates() -> None:
    with pytest.raises(ValueError, match=r"\['lilies'\] are not classes.*\['daisy', 'roses', 'tulips'\]"):
        prompt_class_names(CLASSES, {"roses": "rose", "lilies": "lily"})
    with pytest.raises(ValueError, match=r"'roses' and 'tulips' would both be prompted as 'flower'"):
        prompt_class_names(CLASSES, {"roses": "flower", "tulips": "flower"})
    with pytest.raises(ValueError, match=r"'daisy' and 'roses' would both be prompted as 'daisy'"):
        prompt_class_names(CLASSES, {"roses": "daisy"})  # a rename may not collide with a folder name kept


def test_class_renames_split_at_the_known_folder(tmp_path: Path) -> None:
    """An item is split at the "=" after a class folder's name, so a folder (or a name) may hold "="."""
    assert parse_class_renames("daisy=white=daisy, roses=rose", EQ_CLASSES) == {"daisy=white": "daisy", "roses": "rose"}
    assert parse_class_renames("roses=red=white", CLASSES) == {"roses": "red=white"}  # no folder roses=red here
    path = tmp_path / "names.txt"
    path.write_text("daisy=white = white daisy\nroses=rose, a garden flower\n")
    assert parse_class_renames(path, EQ_CLASSES) == {"daisy=white": "white daisy", "roses": "rose, a garden flower"}
    assert prompt_class_names(EQ_CLASSES, {"daisy=white": "daisy"}) == ["daisy", "roses", "roses=red"]
    # without the folders an item splits at its first "=", as before
    assert parse_class_renames("daisy=white=daisy") == {"daisy": "white=daisy"}


def test_class_renames_escaped_equals_say_which_folder(tmp_path: Path) -> None:
    assert parse_class_renames(r"roses\=red=crimson rose", EQ_CLASSES) == {"roses=red": "crimson rose"}
    assert parse_class_renames(r"roses=red\=ish", EQ_CLASSES) == {"roses": "red=ish"}
    path = tmp_path / "names.txt"
    path.write_text("roses\\=red=crimson rose\nroses=red\\=ish\n")
    assert parse_class_renames(path, EQ_CLASSES) == {"roses=red": "crimson rose", "roses": "red=ish"}
    for folder, name in (("roses=red", "crimson rose"), ("roses", "red=ish"), ("a=b", "c=d=e")):
        written = escape_class_rename(folder, name)
        assert parse_class_renames(written, ["a", "a=b", "a=b=c", *EQ_CLASSES]) == {folder: name}


BACKSLASH_CLASSES = ["roses\\", "roses", "a\\=b", "a", "a=b", "\\", "c\\\\d"]  # "roses\", "a\=b", "\", "c\\d"


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("roses\\", "rose"),  # ends in a backslash: "\=" used to swallow it
        ("a\\=b", "c"),  # holds a backslash before an "="
        ("a=b", "c=d"),
        ("roses", "rose\\"),  # a name ending in a backslash
        ("\\", "="),
        ("c\\\\d", "e\\f"),
    ],
)
def test_class_renames_round_trip_any_folder_and_name(tmp_path: Path, folder: str, name: str) -> None:
    """escape_class_rename writes a pair that reads back as exactly that folder and name, on the command
    line, in a file, and with or without the class folders known."""
    written = escape_class_rename(folder, name)
    assert parse_class_renames(written, BACKSLASH_CLASSES) == {folder: name}
    assert parse_class_renames(written) == {folder: name}  # one unescaped "=": no folder needed to split it
    path = tmp_path / "names.txt"
    path.write_text(f"# renames\n{written}\n")
    assert parse_class_renames(path, BACKSLASH_CLASSES) == {folder: name}


def test_class_renames_backslash_escapes_as_written() -> None:
    """\\\\ is a backslash and \\= an "=" of a folder or name; an unescaped "=" after an escaped backslash
    separates."""
    assert parse_class_renames(r"roses\\=rose", BACKSLASH_CLASSES) == {"roses\\": "rose"}
    assert parse_class_renames(r"a\\\=b=c", BACKSLASH_CLASSES) == {"a\\=b": "c"}
    assert parse_class_renames(r"roses=a \\ b\=c", BACKSLASH_CLASSES) == {"roses": "a \\ b=c"}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (r"a\b=c", r"^--class-names item 1: 'a\\b=c' has a backslash before 'b'; .* as \\\\ \(here 'a\\\\b=c'\)"),
        (r"x=y,roses\,red=z", r"item 2: 'roses\\' ends in a lone backslash \(a name holding a comma needs a file\)"),
        (r"roses=rose\\\ ", r"item 1: 'roses=rose\\\\\\' ends in a lone backslash.* \(here 'roses=rose\\\\\\\\'\)"),
        (r"C:\data=x", r"'C:\\data=x' has a backslash before 'd'.*\(here 'C:\\\\data=x'\)"),
        (
            r"roses\=rose",
            r"'roses\\=rose' is not FOLDER=NAME \(its \"=\" is written \\=, an \"=\" inside a folder or a name; "
            r"for a folder or name ending in a backslash write \\\\: 'roses\\\\=rose'\)",
        ),
    ],
)
def test_class_renames_refuse_malformed_escapes(spec: str, match: str) -> None:
    """A backslash before anything but a backslash or "=", or at the end, is refused, showing the item as
    written (not repr-doubled) and as it should read; an item whose only "=" is escaped says how to write
    a folder ending in a backslash."""
    with pytest.raises(ValueError, match=match):
        parse_class_renames(spec, BACKSLASH_CLASSES)


def test_class_rename_file_with_a_lone_backslash_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_text("roses=rose\ntulips=tulip, a flower\\\n")
    with pytest.raises(
        ValueError, match=r"names\.txt line 2: 'tulips=tulip, a flower\\' ends in a lone backslash;"
    ) as err:
        parse_class_renames(path)
    assert "comma" not in str(err.value)  # in a file a comma is part of the name


def test_class_rename_that_could_name_two_folders_is_an_error(tmp_path: Path) -> None:
    """roses=red=crimson could rename "roses" (to "red=crimson") or "roses=red": the error names both and
    how to write each; from a file it names the line and gives no shell advice."""
    match = (
        r"^--class-names item 2: 'roses=red=crimson' could rename class 'roses' \(as 'red=crimson'\) or "
        r"'roses=red' \(as 'crimson'\); write each \"=\" that is part of a folder or a name as \"\\=\" to say "
        r"which: roses=red\\=crimson for 'roses', roses\\=red=crimson for 'roses=red' \(in single quotes for the "
        r"shell: --class-names 'roses=red\\=crimson'\)$"
    )
    with pytest.raises(ValueError, match=match):
        parse_class_renames("daisy=white=daisy,roses=red=crimson", EQ_CLASSES)
    path = tmp_path / "names.txt"
    path.write_text("# renames\nroses=red=crimson\n")
    match = r"names\.txt line 2: 'roses=red=crimson' could rename class 'roses'.*'roses=red'"
    with pytest.raises(ValueError, match=match) as err:
        parse_class_renames(path, EQ_CLASSES)
    assert "shell" not in str(err.value)


def test_class_renames_checked_once_the_folders_are_known() -> None:
    """Read as text, two items that may name different folders are fine; matched with the folders, an item
    naming a folder another renames, or no folder, is an error."""
    folders = ["roses=pink", "roses=red"]
    assert len(read_class_renames("roses=red=x,roses=pink=y")) == 2  # both could rename "roses" as text
    assert parse_class_renames("roses=red=x,roses=pink=y", folders) == {"roses=red": "x", "roses=pink": "y"}
    with pytest.raises(ValueError, match=r"item 2: class 'roses=red' is renamed twice \('x' and 'y'\)"):
        parse_class_renames(r"roses=red=x,roses\=red=y", ["roses=red"])
    with pytest.raises(ValueError, match=r"item 2: class 'roses' is renamed twice"):
        read_class_renames("roses=x,roses=y")  # each item reads one way only: refused before any folder is known
    with pytest.raises(ValueError, match=r"\['lilies'\] are not classes.*\['daisy=white', 'roses', 'roses=red'\]"):
        parse_class_renames("lilies=lily=x", EQ_CLASSES)  # no split names a folder: the first is reported
    with pytest.raises(ValueError, match=r"item 1: 'roses\\=red' is not FOLDER=NAME"):
        read_class_renames(r"roses\=red")  # the only "=" is escaped


def test_eval_uses_and_records_templates_and_class_names(
    caches: TinyCaches, classes: tuple[Path, Path], run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompts encoded are the chosen templates filled with the renamed classes; metrics.json and the
    report say which, and the accuracy is the library's for those prompts."""
    seen: list[tuple[list[str], tuple[str, ...]]] = []
    real = evaluate_module.class_prompts

    def spy(names: list[str], templates: tuple[str, ...]) -> list[list[str]]:
        seen.append((list(names), tuple(templates)))
        return real(names, templates)

    monkeypatch.setattr(evaluate_module, "class_prompts", spy)
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\nart of the {}.\n")
    extra = ("--templates", str(path), "--class-names", "roses=rose,tulips=tulip")
    assert evaluate(caches, classes, run, tmp_path / "out", *extra) == 0
    assert seen == [(["daisy", "rose", "tulip"], ("a photo of a {}.", "art of the {}."))]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    assert metrics["zero_shot_templates"] == ["a photo of a {}.", "art of the {}."]
    assert metrics["zero_shot_templates_source"] == str(path)
    assert metrics["zero_shot_class_names"] == {"daisy": "daisy", "roses": "rose", "tulips": "tulip"}
    data = evaluate_module.load_classification(*classes, "tiny-text")
    want = evaluate_module.classification_metrics(
        run, data, (1,), templates=("a photo of a {}.", "art of the {}."), class_names=["daisy", "rose", "tulip"]
    )
    assert metrics["zero_shot_top1"] == pytest.approx(want["zero_shot_top1"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]
    assert report["sources"]["zero-shot: prompts"] == {
        "templates": f"{path} (2 templates)",
        "class names": "roses=rose, tulips=tulip",
    }
    assert '"a photo of a {}."; "art of the {}."' in report["text"]


def test_eval_templates_preset_and_class_names_file(
    caches: TinyCaches, classes: tuple[Path, Path], run: Path, tmp_path: Path
) -> None:
    names = tmp_path / "names.txt"
    names.write_text("tulips=tulip\n")
    assert (
        evaluate(caches, classes, run, tmp_path / "out", "--templates", "flowers102", "--class-names", str(names)) == 0
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    assert metrics["zero_shot_templates"] == list(FLOWERS102_TEMPLATES)
    assert metrics["zero_shot_class_names"]["tulips"] == "tulip"
    assert evaluate(caches, classes, run, tmp_path / "default") == 0  # no flags: CLIP's 7, folder names
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())["tok"]
    assert metrics["zero_shot_templates"] == list(CLIP_IMAGENET_TEMPLATES)
    assert metrics["zero_shot_templates_source"] == "clip-imagenet-7"
    assert metrics["zero_shot_class_names"] == {c: c for c in CLASSES}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("--class-names", "roses=rose,lilies=lily"), r"\['lilies'\] are not classes.*\['daisy', 'roses', 'tulips'\]"),
        (("--templates", "flowers"), r"neither a preset \(clip-imagenet-7, flowers102\) nor a file"),
        (("--class-names", "roses"), r"'roses' is neither a file nor FOLDER=NAME pairs"),
    ],
)
def test_eval_refuses_bad_prompts_before_evaluating(
    caches: TinyCaches,
    classes: tuple[Path, Path],
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    match: str,
) -> None:
    assert evaluate(caches, classes, run, tmp_path / "out", *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("csalign eval: error:")
    assert re.search(match, err), err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_refuses_prompt_flags_without_class_caches(
    caches: TinyCaches, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--image-cache", str(caches.image), "--text-cache", str(caches.text_tokens), "--run", str(run)]
    assert main([*args, "--out", str(tmp_path / "out"), "--templates", "flowers102"]) == 1
    assert "--templates shapes the zero-shot prompts; pass --class-test-cache too" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eq_classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny (train, test) class caches whose folders hold "=" (EQ_CLASSES)."""
    return class_caches(tmp_path_factory.mktemp("eq-classes"), names=tuple(EQ_CLASSES))


@pytest.mark.parametrize("form", ["pairs", "file"])
def test_eval_renames_folders_holding_equals(
    caches: TinyCaches,
    eq_classes: tuple[Path, Path],
    run: Path,
    tmp_path: Path,
    zero_shot_prompts: list[object],
    form: str,
) -> None:
    """`--class-names` renames a folder named daisy=white, in both forms, and the report writes it back
    in the form that reads one way."""
    items = ["daisy=white=daisy", r"roses\=red=crimson rose"]
    spec = ",".join(items)
    if form == "file":
        spec = str(tmp_path / "names.txt")
        Path(spec).write_text("\n".join(items) + "\n")
    assert evaluate(caches, eq_classes, run, tmp_path / "out", "--class-names", spec) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    assert metrics["zero_shot_class_names"] == {"daisy=white": "daisy", "roses": "roses", "roses=red": "crimson rose"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]
    assert report["sources"]["zero-shot: prompts"]["class names"] == r"daisy\=white=daisy, roses\=red=crimson rose"
    assert len(zero_shot_prompts) == 1 and zero_shot_prompts[0].shape[0] == 3


def test_eval_refuses_a_rename_that_could_name_two_folders(
    caches: TinyCaches, eq_classes: tuple[Path, Path], run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate(caches, eq_classes, run, tmp_path / "out", "--class-names", "roses=red=crimson") == 1
    err = capsys.readouterr().err
    assert "'roses=red=crimson' could rename class 'roses' (as 'red=crimson') or 'roses=red' (as 'crimson')" in err
    assert r"--class-names 'roses=red\=crimson'" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.fixture(scope="module")
def backslash_classes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny (train, test) class caches with a folder whose name ends in a backslash, beside its plain twin."""
    return class_caches(tmp_path_factory.mktemp("backslash-classes"), names=("daisy", "roses\\", "roses"))


@pytest.mark.parametrize("form", ["pairs", "file"])
def test_eval_renames_a_folder_ending_in_a_backslash(
    caches: TinyCaches, backslash_classes: tuple[Path, Path], run: Path, tmp_path: Path, form: str
) -> None:
    """A folder named roses\\ is renamed by roses\\\\=rose (its "\\" used to escape the "="), and the report
    writes the pair back the same way."""
    spec = r"roses\\=rose,roses=red rose"
    if form == "file":
        spec = str(tmp_path / "names.txt")
        Path(spec).write_text("roses\\\\=rose\nroses=red rose\n")
    assert evaluate(caches, backslash_classes, run, tmp_path / "out", "--class-names", spec) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tok"]
    assert metrics["zero_shot_class_names"] == {"daisy": "daisy", "roses\\": "rose", "roses": "red rose"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())["sections"][0]
    written = report["sources"]["zero-shot: prompts"]["class names"]
    assert written == r"roses=red rose, roses\\=rose"  # in class order
    assert parse_class_renames(written.replace(", ", ","), ["daisy", "roses\\", "roses"]) == {
        "roses\\": "rose",
        "roses": "red rose",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (r"roses\=rose", r"""'roses\=rose' is not FOLDER=NAME (its "=" is written \=, an "=" inside a folder"""),
        (r"roses\rose=rose", r"'roses\rose=rose' has a backslash before 'r'; a backslash escapes only a backslash"),
    ],
)
def test_eval_refuses_a_malformed_escape_before_evaluating(
    caches: TinyCaches,
    backslash_classes: tuple[Path, Path],
    run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spec: str,
    message: str,
) -> None:
    assert evaluate(caches, backslash_classes, run, tmp_path / "out", "--class-names", spec) == 1
    err = capsys.readouterr().err
    assert err.startswith("csalign eval: error: --class-names item 1:") and message in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()
