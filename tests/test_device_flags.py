"""`--device` of encode, fid and generate: a device this machine lacks is an error naming the flag, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csaligner._validation import check_device
from csaligner.cli import main


def test_check_device_names_the_flag_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    check_device("--device", "cpu")
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a device torch knows; use cpu, cuda or cuda:N"):
        check_device("--device", "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device 'cuda' but CUDA is not available here; use --device cpu"):
        check_device("--device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("--device", "cuda:1")
    with pytest.raises(ValueError, match=r"--device 'cuda:2' but only 2 CUDA device\(s\) are visible"):
        check_device("--device", "cuda:2")


@pytest.mark.parametrize(
    "command",
    [
        ["encode", "--encoder", "tiny-text", "--data", "x.tsv", "--out", "OUT"],
        ["fid", "--generated", "g", "--reference", "r", "--features", "efficientnet-lite0", "--out", "OUT/f.json"],
        [
            "generate",
            "--decoder",
            "karlo",
            "--decoder-path",
            "d",
            "--embeddings",
            "e",
            "--prompts",
            "p",
            "--out",
            "OUT",
        ],
    ],
)
def test_commands_refuse_an_unknown_device_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    args = [str(tmp_path / a.replace("OUT", "out")) if "OUT" in a else a for a in command]
    assert main([*args, "--device", "gpu"]) == 1
    assert "--device 'gpu' is not a device torch knows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
