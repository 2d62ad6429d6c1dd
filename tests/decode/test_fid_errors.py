"""`csalign fid` on folders holding files that do not decode: a list of them, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from csaligner.cli import main
from csaligner.decode import compute_fid
from csaligner.decode.fid_features import FEATURE_EXTRACTORS


class MeanColour:
    """A 3-d toy extractor (per-channel means) that counts the images it is given."""

    name = "mean-colour"
    label = "FID-mean-colour (toy)"

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images: list[Any]) -> Tensor:
        self.seen += len(images)
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean(dim=(0, 1)) for im in images])


def _folders(tmp_path: Path, write_images: Any) -> tuple[Path, Path]:
    """generated/ with 4 good PNGs; reference/ with 4 good PNGs, a non-image and a truncated PNG."""
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    write_images(gen, 4, seed=0)
    good = write_images(ref, 4, seed=1)
    (ref / "0_not_an_image.jpg").write_text("this is text")
    (ref / "0_truncated.png").write_bytes(good[0].read_bytes()[:100])
    return gen, ref


def test_compute_fid_lists_every_unreadable_image(tmp_path: Path, write_images: Any) -> None:
    gen, ref = _folders(tmp_path, write_images)
    extractor = MeanColour()
    with pytest.raises(ValueError, match="2 of 6 images could not be read") as info:
        compute_fid(gen, ref, extractor, batch_size=2)
    message = str(info.value)
    assert f"in the reference folder {ref}" in message
    assert f"{ref / '0_not_an_image.jpg'}: UnidentifiedImageError" in message
    assert f"{ref / '0_truncated.png'}: " in message
    assert "replace or remove these files" in message
    assert "img_" not in message  # the good files are not listed
    # the bad files sort first, so no reference batch reaches the extractor once one is found
    assert extractor.seen == 4


def test_cli_reports_unreadable_reference_without_traceback(
    tmp_path: Path, write_images: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen, ref = _folders(tmp_path, write_images)
    monkeypatch.setitem(FEATURE_EXTRACTORS, "mean-colour", lambda device, weights_path: MeanColour())
    args = ["fid", "--generated", str(gen), "--reference", str(ref), "--features", "mean-colour", "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"csalign fid: error: in the reference folder {ref}, 2 of 6 images could not be read:")
    assert "Traceback" not in err and "0_not_an_image.jpg" in err and "0_truncated.png" in err
    (ref / "0_not_an_image.jpg").unlink()
    (ref / "0_truncated.png").unlink()
    assert main([*args, "--out", str(tmp_path / "fid.json")]) == 0  # the fix the message names works
    assert (tmp_path / "fid.json").is_file()


def test_a_folder_of_one_image_is_named(tmp_path: Path, write_images: Any) -> None:
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    write_images(gen, 1, seed=0)
    write_images(ref, 3, seed=1)
    with pytest.raises(
        ValueError, match=rf"--generated {gen} holds 1 image\(s\); FID fits a covariance and needs >= 2"
    ):
        compute_fid(gen, ref, MeanColour())
