"""retrieve_topk on hand-made embeddings; render_preview and `csalign preview` on tiny images in tmp_path."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csaligner.cli import main
from csaligner.decode import render_preview, retrieve_topk

Image = pytest.importorskip("PIL.Image")
safetensors_torch = pytest.importorskip("safetensors.torch")


def test_retrieve_topk_by_cosine() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[10.0, 0.0], [0.0, 0.5]])  # norms differ: only direction counts
    scores, indices = retrieve_topk(texts, images, k=2)
    assert indices.tolist() == [[0, 2], [1, 2]]
    torch.testing.assert_close(scores, torch.tensor([[1.0, 0.5**0.5], [1.0, 0.5**0.5]]))
    assert indices.dtype == torch.int64
    with pytest.raises(ValueError, match=r"k must lie in \[1, 4\]"):
        retrieve_topk(texts, images, k=5)
    with pytest.raises(ValueError, match="feature dims differ"):
        retrieve_topk(torch.randn(2, 3), images, k=1)


def test_retrieve_topk_matches_a_plain_loop() -> None:
    texts, images = torch.randn(5, 8), torch.randn(30, 8)
    scores, indices = retrieve_topk(texts, images, k=4)
    for p in range(5):
        sims = [float(texts[p] @ images[i] / (texts[p].norm() * images[i].norm())) for i in range(30)]
        assert indices[p].tolist() == sorted(range(30), key=lambda i: -sims[i])[:4]
        np.testing.assert_allclose(scores[p].numpy(), sorted(sims, reverse=True)[:4], rtol=1e-5)


def border_colour(png: Any, x: int, y: int) -> tuple[int, int, int]:
    return png.getpixel((x, y))[:3]


def test_render_preview_marks_ground_truth(tmp_path: Path, write_images: Any) -> None:
    paths = write_images(tmp_path / "imgs", 6, seed=0, size=40)
    prompts = ["a <b>bold</b> & odd prompt", "second"]
    settings = {"InfoNCE only": torch.tensor([[0, 1], [2, 3]]), "CS-Aligner": torch.tensor([[4, 0], [3, 5]])}
    scores = {"CS-Aligner": torch.tensor([[0.9, 0.8], [0.7, 0.6]])}
    png_path, html_path = render_preview(
        prompts, settings, paths, tmp_path / "out", scores=scores, ground_truth={0: {4}, 1: {3}}, thumb_size=32
    )
    page = html_path.read_text()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; odd prompt" in page and "<b>bold" not in page  # escaped
    assert "InfoNCE only (hit@2: 1/2)" in page and "CS-Aligner (hit@2: 2/2)" in page
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 8  # self-contained: every thumbnail inlined
    thumb = Image.open(__import__("io").BytesIO(base64.b64decode(uris[0])))
    assert thumb.size == (32, 32)
    assert len(re.findall(r'<img class="hit"', page)) == 3  # image 4 for prompt 0; image 3 twice for prompt 1
    assert "0.900" in page
    png = Image.open(png_path).convert("RGB")
    # layout: GAP=24 left margin, header line 14, prompt text lines, then the cells (32 px + 4 px borders)
    cell = 32 + 2 * 4 + 2
    y0 = 24 + 14 + 14  # first prompt fits one text line
    x_cs = 24 + 2 * cell + 24  # first thumbnail of the second setting
    assert border_colour(png, x_cs + 1, y0 + 1) == (20, 160, 60)  # CS-Aligner top-1 for prompt 0 is image 4: hit
    assert border_colour(png, 24 + 1, y0 + 1) == (215, 215, 215)  # InfoNCE top-1 is image 0: miss


def test_render_preview_rejects_bad_indices(tmp_path: Path, write_images: Any) -> None:
    paths = write_images(tmp_path / "imgs", 3, seed=0)
    with pytest.raises(ValueError, match=r"indices outside \[0, 2\]"):
        render_preview(["p"], {"a": torch.tensor([[0, 3]])}, paths, tmp_path / "out")
    with pytest.raises(ValueError, match=r"must be \(1, k\) integer indices"):
        render_preview(["p"], {"a": torch.tensor([[0.0, 1.0]])}, paths, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="image 1 of the image list does not exist"):
        render_preview(["p"], {"a": torch.tensor([[1]])}, [paths[0], tmp_path / "gone.png"], tmp_path / "out")


def test_cli_preview_two_settings(tmp_path: Path, write_images: Any, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_images(tmp_path / "imgs", 8, seed=1)
    (tmp_path / "images.txt").write_text("\n".join(f"imgs/{p.name}" for p in paths) + "\n")
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond prompt\nthird prompt\n")
    images = torch.randn(8, 16)
    safetensors_torch.save_file({"image_embeds": images}, tmp_path / "img.safetensors")
    # "good" text embeddings point at images 2, 5, 7; "noisy" ones are random
    safetensors_torch.save_file({"text_embeds": images[[2, 5, 7]] * 3}, tmp_path / "good.safetensors")
    safetensors_torch.save_file({"text_embeds": torch.randn(3, 16)}, tmp_path / "noisy.safetensors")
    (tmp_path / "gt.json").write_text(json.dumps({"0": [2], "1": ["imgs/img_005.png"], "2": [7]}))
    out = tmp_path / "out"
    args = [
        "preview",
        "--image-embeds",
        str(tmp_path / "img.safetensors"),
        "--image-list",
        str(tmp_path / "images.txt"),
    ]
    args += ["--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "-k", "3", "--thumb-size", "24"]
    args += ["--ground-truth", str(tmp_path / "gt.json"), "--text-embeds"]
    args += [f"InfoNCE only={tmp_path / 'noisy.safetensors'}", f"CS-Aligner={tmp_path / 'good.safetensors'}"]
    assert main(args) == 0
    assert "preview.html" in capsys.readouterr().out
    record = json.loads((out / "preview.json").read_text())
    assert list(record["settings"]) == ["InfoNCE only", "CS-Aligner"]
    assert [row[0] for row in record["settings"]["CS-Aligner"]["indices"]] == [2, 5, 7]
    np.testing.assert_allclose([row[0] for row in record["settings"]["CS-Aligner"]["scores"]], 1.0, rtol=1e-5)
    assert "CS-Aligner (hit@3: 3/3)" in (out / "preview.html").read_text()
    assert Image.open(out / "preview.png").size[0] > 2 * 3 * 24


def test_cli_preview_errors(tmp_path: Path, write_images: Any, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_images(tmp_path / "imgs", 2, seed=1)
    (tmp_path / "images.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    (tmp_path / "prompts.txt").write_text("one\n")
    safetensors_torch.save_file({"text_embeds": torch.randn(1, 4)}, tmp_path / "t.safetensors")
    base = ["preview", "--image-list", str(tmp_path / "images.txt"), "--prompts", str(tmp_path / "prompts.txt")]
    base += ["--out", str(tmp_path / "out"), "-k", "1", "--text-embeds"]
    assert main([*base, f"A={tmp_path / 't.safetensors'}"]) == 1
    assert "no --image-embeds was given" in capsys.readouterr().err
    assert main([*base, "no-equals-sign"]) == 1
    assert "takes NAME=FILE" in capsys.readouterr().err
    # embeddings of two spaces: said in the preview's terms, not the loss's ("before computing the loss")
    safetensors_torch.save_file({"image_embeds": torch.randn(2, 6)}, tmp_path / "i6.safetensors")
    assert main([*base, f"A={tmp_path / 't.safetensors'}", "--image-embeds", str(tmp_path / "i6.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "setting 'A': " in err and "text_embeds have D=4 but the image_embeds of --image-embeds" in err
    assert "have D=6; both must be embeddings in one aligned space" in err and "loss" not in err


@pytest.mark.parametrize(
    ("gt", "extra", "expected"),
    [
        ("not json", (), "could not be read as JSON"),
        ("[0, 1]", (), "holds a JSON list"),
        ('{"3": [0]}', (), "key '3' is not a prompt index in [0, 0]"),
        ('{"x": [0]}', (), "key 'x' is not a prompt index"),
        ('{"0": 1}', (), "prompt 0 maps to 1; write a list"),
        ('{"0": [2]}', (), "prompt 0 names image index 2, outside [0, 1]"),
        (None, ("--thumb-size", "0"), "--thumb-size must be >= 1, got 0"),
        (None, ("-k", "0"), "-k must be >= 1, got 0"),
    ],
)
def test_cli_preview_refuses_ground_truth_it_would_ignore_and_bad_sizes(
    tmp_path: Path,
    write_images: Any,
    capsys: pytest.CaptureFixture[str],
    gt: str | None,
    extra: tuple[str, ...],
    expected: str,
) -> None:
    paths = write_images(tmp_path / "imgs", 2, seed=1)
    (tmp_path / "images.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    (tmp_path / "prompts.txt").write_text("one\n")
    safetensors_torch.save_file({"text_embeds": torch.randn(1, 4), "image_embeds": torch.randn(2, 4)}, tmp_path / "t")
    args = ["preview", "--image-list", str(tmp_path / "images.txt"), "--prompts", str(tmp_path / "prompts.txt")]
    args += ["--out", str(tmp_path / "out"), "-k", "1", *extra]
    if gt is not None:
        (tmp_path / "gt.json").write_text(gt)
        args += ["--ground-truth", str(tmp_path / "gt.json")]
    assert main([*args, "--text-embeds", f"A={tmp_path / 't'}"]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prompt_files_are_utf8_with_or_without_a_byte_order_mark(tmp_path: Path) -> None:
    from csaligner.decode._io import read_lines

    (tmp_path / "bom.txt").write_bytes("\ufeffa café\nthe dog\n".encode())
    assert read_lines(tmp_path / "bom.txt", "prompt") == ["a café", "the dog"]  # no BOM in the first prompt
    (tmp_path / "latin.txt").write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8 text .*save it as UTF-8"):
        read_lines(tmp_path / "latin.txt", "prompt")
    (tmp_path / "gaps.txt").write_text("a\n\nb\n\n")
    with pytest.raises(ValueError, match=r"blank lines \(lines \[2, 4\]\)"):
        read_lines(tmp_path / "gaps.txt", "prompt")
