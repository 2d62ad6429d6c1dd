"""`csalign` itself: errors about the paths a user gave are one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from csaligner.cli import main


def _caption_manifest(tmp_path: Path) -> Path:
    # A text encoder never opens the images, so the paths need not exist.
    path = tmp_path / "m.tsv"
    path.write_text("image\tcaption\na.jpg\ta dog runs\nb.jpg\ta cat sleeps\n")
    return path


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_output_folder_taken_by_a_file_is_an_error_not_a_traceback(
    out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    args = ["encode", "--quiet", "--encoder", "tiny-text", "--data", str(_caption_manifest(tmp_path))]
    assert main([*args, "--out", str(tmp_path / out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("csalign encode: error: ") and "taken by a file" in err
    assert (tmp_path / "file").read_text() == "not a folder"
    assert main([*args, "--out", str(tmp_path / "cache")]) == 0


def test_demo_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for shown in ("(default flickr)", "(default runs/demo)", "(default cache)", "(default 30)", "(default 2000)"):
        assert shown in text


def test_every_subcommand_option_with_a_default_says_it_in_its_help() -> None:
    """A default the help does not name reads as "required" or "unset"; None/False/suppressed need no mention."""
    import argparse

    from csaligner.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"csalign {name} {'/'.join(action.option_strings) or action.dest} (default {action.default!r})"
        for name, parser in sub.choices.items()
        for action in parser._actions
        if action.default not in (None, False, argparse.SUPPRESS)
        and action.help != argparse.SUPPRESS
        and "default" not in (action.help or "")
    ]
    assert not silent


def test_our_warnings_print_as_one_line_without_the_source_line(tmp_path: Path) -> None:
    """Python's default shows the code line that warned (`sampler = BatchSampler(...)`): noise for a user."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from csaligner.cli import main\n"
        "from csaligner.data.features import PairedFeatures\n"
        "import csaligner.train.loop as loop\n"
        "g = torch.Generator().manual_seed(0)\n"
        "f = PairedFeatures(torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g), torch.arange(6),\n"
        "                   [f'i{i}' for i in range(6)])\n"
        "loop.load_features = lambda config: f\n"
        f"raise SystemExit(main(['train', '--train.out_dir={tmp_path / 'run'}', '--train.steps=1',\n"
        "                        '--train.batch_size=64', '--train.progress=false', '--train.tensorboard=false']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "csalign train: warning: train.batch_size=64 is more than the 6 paired images" in done.stderr
    assert "BatchSampler(" not in done.stderr and "UserWarning" not in done.stderr


def test_other_libraries_warnings_keep_their_format() -> None:
    import warnings

    from csaligner.cli import _PACKAGE_DIR, _warning_formatter

    fmt = _warning_formatter("eval", warnings.formatwarning)
    assert fmt("m", UserWarning, f"{_PACKAGE_DIR}/eval/cli.py", 3) == "csalign eval: warning: m\n"
    assert fmt("m", DeprecationWarning, "/lib/other.py", 3, "x = 1").startswith(
        "/lib/other.py:3: DeprecationWarning: m"
    )


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["train", "--loss.lamda=1"], "'--loss.lamda=1' (did you mean --loss.lam?)"),
        (["train", "--lr", "3"], "'--lr' (did you mean --train.lr?);"),
        (["train", "--print-config", "foo"], "'foo';"),  # a stray positional, caught after parsing
        # before argparse's "the following arguments are required: --out / --image-cache"
        (["encode", "--encoder", "tiny-text", "--data", "m.tsv", "--output", "o"], "'--output' (did you mean --out?)"),
        (
            ["eval", "--run", "r", "--image_cache", "i", "--text-cache", "t"],
            "'--image_cache' (did you mean --image-cache?)",
        ),
        (
            ["encode", "--encoder", "tiny-text", "--data", "m.tsv", "--out", "o", "--quite"],
            "'--quite' (did you mean --quiet?)",
        ),
    ],
)
def test_a_misspelt_option_is_refused_by_its_subcommand_with_the_nearest_flag(
    argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's own message came from the top-level parser ("usage: csalign [-h] COMMAND ...") with no fix."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"csalign {argv[0]}: error: unrecognized arguments: {suggestion}" in err
    assert f"`csalign {argv[0]} --help` lists the options it takes" in err
    assert "COMMAND ..." not in err


def test_an_unknown_top_level_option_names_csalign_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--foo"])
    err = capsys.readouterr().err
    assert "csalign: error: unrecognized arguments: '--foo'; `csalign --help`" in err and "None" not in err


def test_train_usage_line_is_short_not_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """The usage line precedes every argparse error; listing ~70 --section.key flags buried the error."""
    with pytest.raises(SystemExit):
        main(["train", "--loss.lam"])  # a flag without its value
    err = capsys.readouterr().err
    assert err.startswith("usage: csalign train [-h] [--config CONFIG] [--print-config] [--SECTION.KEY=VALUE ...]\n")
    assert len(err.splitlines()) == 2 and "expected one argument" in err


def test_every_subcommand_has_a_description_and_every_option_a_help() -> None:
    """`csalign eval --help` opened on a bare option list, `preview --out` and `fid --generated` said nothing."""
    import argparse

    from csaligner.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undescribed = [name for name, parser in sub.choices.items() if not parser.description]
    unhelped = [
        f"csalign {name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in sub.choices.items()
        for action in parser._actions
        if not action.help
    ]
    assert not undescribed and not unhelped


def test_eval_usage_lists_the_required_flags_on_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A "[NAME=]DIR" metavar made argparse break the usage line inside "--run [NAME=]DIR"."""
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "--run DIR|NAME=DIR --image-cache IMAGE_CACHE" in usage


@pytest.mark.parametrize(
    ("command", "module", "hint"),
    [
        ("train", "csaligner.train.cli", "--train.resume=auto"),
        ("encode", "csaligner.data.encode", "run the same command again to resume"),
        ("eval", "csaligner.eval.cli", None),
    ],
)
def test_ctrl_c_is_one_line_saying_how_to_resume(
    command: str, module: str, hint: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C printed a traceback into torch's internals; encode and train runs resume, so say how."""
    import importlib

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    parse_only = {"train": ["--print-config"], "encode": ["--encoder", "x", "--data", "y", "--out", "z"]}
    parse_only["eval"] = ["--run", "r", "--image-cache", "i", "--text-cache", "t"]
    monkeypatch.setattr(importlib.import_module(module), "run", interrupted)
    assert main([command, *parse_only[command]]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"csalign {command}: interrupted") and "Traceback" not in err
    assert len(err.splitlines()) == 1 and (hint is None or hint in err)


def test_an_abbreviated_flag_is_still_taken(tmp_path: Path) -> None:
    """argparse takes a unique prefix (`--enc` for `--encoder`): the check for misspelt flags must too."""
    args = ["encode", "--quiet", "--enc", "tiny-text", "--data", str(_caption_manifest(tmp_path))]
    assert main([*args, "--out", str(tmp_path / "cache")]) == 0
