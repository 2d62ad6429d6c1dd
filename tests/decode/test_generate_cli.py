"""`csalign generate` end to end on tiny decoders saved as local folders: files written and their contents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csaligner.cli import main
from csaligner.decode import generate
from tests.decode.conftest import EMBED_DIM

pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
Image = pytest.importorskip("PIL.Image")

PROMPTS = ["a red bus", "two dogs on grass", "a bowl of fruit"]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    emb = torch.randn(len(PROMPTS), 32)
    safetensors_torch.save_file({"image_embeds": emb}, tmp_path / "emb.safetensors")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path / "emb.safetensors", tmp_path / "prompts.txt", emb


def cli(decoder: str, path: Path, emb: Path, prompts: Path, out: Path, *extra: str) -> int:
    base = ["generate", "--decoder", decoder, "--decoder-path", str(path), "--embeddings", str(emb)]
    base += ["--prompts", str(prompts), "--out", str(out), "--steps", "2", "--device", "cpu", "--batch-size", "2"]
    return main([*base, *extra])


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_writes_pngs_and_manifest(
    tmp_path: Path, inputs: Any, kandinsky_dir: Path, kandinsky_pipe: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    emb_file, prompts, emb = inputs
    out = tmp_path / "out"
    assert (
        cli("kandinsky22", kandinsky_dir, emb_file, prompts, out, "--height", "32", "--width", "32", "--seed", "7") == 0
    )
    assert "zero vector" in capsys.readouterr().err  # says the negative is not the zero-image embedding
    manifest = json.loads((out / "manifest.json").read_text())
    assert [im["prompt"] for im in manifest["images"]] == PROMPTS
    assert [im["seed"] for im in manifest["images"]] == [7, 8, 9]
    assert manifest["negative"] == "zeros" and manifest["steps"] == 2 and manifest["guidance"] == 7.5
    files = [out / im["file"] for im in manifest["images"]]
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    direct = generate(kandinsky_pipe, emb, seed=7, num_inference_steps=2, height=32, width=32)
    for path, image in zip(files, direct, strict=True):
        assert Image.open(path).size == (32, 32)
        assert np.abs(read(path) - np.asarray(image, dtype=np.int16)).mean() < 0.05


def test_generate_draws_no_loading_bars(
    tmp_path: Path, inputs: Any, kandinsky_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """diffusers drew "Loading pipeline components" in the middle of the output; it is off for the command only."""
    from diffusers.utils import logging as diffusers_logging

    emb_file, prompts, _ = inputs
    assert (
        cli("kandinsky22", kandinsky_dir, emb_file, prompts, tmp_path / "out", "--height", "32", "--width", "32") == 0
    )
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "it/s" not in err, err
    assert diffusers_logging.is_progress_bar_enabled()


def test_generate_resumes_with_skip_existing(tmp_path: Path, inputs: Any, kandinsky_dir: Path) -> None:
    emb_file, prompts, _ = inputs
    out = tmp_path / "out"
    size = ("--height", "32", "--width", "32")
    assert cli("kandinsky22", kandinsky_dir, emb_file, prompts, out, *size) == 0
    first = read(out / "000001.png")
    (out / "000001.png").unlink()
    stamp = (out / "000000.png").stat().st_mtime_ns
    assert cli("kandinsky22", kandinsky_dir, emb_file, prompts, out, *size, "--skip-existing") == 0
    assert (out / "000000.png").stat().st_mtime_ns == stamp  # kept, not redrawn
    assert np.abs(read(out / "000001.png") - first).mean() < 0.05  # redrawn alone, same seed, same image


def test_generate_zero_image_negative_and_embed_norm(
    tmp_path: Path, inputs: Any, kandinsky_dir: Path, karlo_pipe: Any
) -> None:
    emb_file, prompts, _ = inputs
    karlo_pipe.image_encoder.save_pretrained(tmp_path / "image_encoder")  # a tiny 32-d CLIP image encoder
    safetensors_torch.save_file({"image_embeds": 5 * torch.randn(4, 32)}, tmp_path / "real.safetensors")
    out = tmp_path / "out"
    extra = ("--height", "32", "--width", "32", "--image-encoder-path", str(tmp_path / "image_encoder"))
    extra += ("--embed-norm-from", str(tmp_path / "real.safetensors"))
    assert cli("kandinsky22", kandinsky_dir, emb_file, prompts, out, *extra) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["negative"].startswith("zero-image:")
    real = safetensors_torch.load_file(tmp_path / "real.safetensors")["image_embeds"]
    assert manifest["embed_norm"] == pytest.approx(float(real.norm(dim=-1).mean()))


def test_generate_karlo(tmp_path: Path, inputs: Any, karlo_dir: Path) -> None:
    emb_file, prompts, _ = inputs
    out = tmp_path / "out"
    assert cli("karlo", karlo_dir, emb_file, prompts, out, "--super-res-steps", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["super_res_steps"] == 2 and manifest["negative"] is None
    assert [Image.open(out / im["file"]).size for im in manifest["images"]] == [(64, 64)] * 3


def test_generate_errors_are_for_people(
    tmp_path: Path, inputs: Any, kandinsky_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb_file, prompts, _ = inputs
    out = tmp_path / "out"
    assert cli("kandinsky22", tmp_path / "nowhere", emb_file, prompts, out) == 1
    assert "kandinsky-community/kandinsky-2-2-decoder" in capsys.readouterr().err
    (tmp_path / "two.txt").write_text("a\nb\n")
    assert cli("kandinsky22", kandinsky_dir, emb_file, tmp_path / "two.txt", out) == 1
    assert "has 2 prompts but" in capsys.readouterr().err
    args = ["generate", "--decoder", "kandinsky22", "--decoder-path", str(kandinsky_dir), "--run", str(tmp_path)]
    assert main([*args, "--prompts", str(prompts), "--out", str(out)]) == 1
    assert "no image_adapter.safetensors" in capsys.readouterr().err
    safetensors_torch.save_file({"text_embeds": torch.zeros(3, 32)}, tmp_path / "wrong.safetensors")
    assert cli("kandinsky22", kandinsky_dir, tmp_path / "wrong.safetensors", prompts, out) == 1
    assert "no tensor named 'image_embeds' (it holds ['text_embeds'])" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.png"))


def test_generate_from_a_trained_run(tmp_path: Path, inputs: Any, kandinsky_dir: Path, monkeypatch: Any) -> None:
    """--run: prompts -> the run's text encoder -> its text adapter -> image_embeds for the decoder."""
    import yaml

    import csaligner.decode.preview_runs as preview_runs
    from csaligner.adapters import AdapterConfig, build_adapter, save_adapter
    from csaligner.encoders import EncoderOutput

    _, prompts, _ = inputs
    run = tmp_path / "run"
    run.mkdir()
    dim = EMBED_DIM
    for side, cfg in (("image", AdapterConfig("identity", dim, dim)), ("text", AdapterConfig("linear", 16, dim))):
        save_adapter(build_adapter(cfg), cfg, run / f"{side}_adapter.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"text_cache": "unused"}}))
    seen: list[list[str]] = []

    def fake_encode(texts: list[str], encoder: str, *, tokens: bool = False, expect_id: object = None) -> EncoderOutput:
        assert not tokens  # a linear text adapter reads no tokens
        seen.append(list(texts))
        return EncoderOutput(torch.randn(len(texts), 16, generator=torch.Generator().manual_seed(len(seen))))

    monkeypatch.setattr(preview_runs, "encode_prompts", fake_encode)
    monkeypatch.setattr(preview_runs, "run_text_encoder", lambda run_dir: "tiny-text")
    out = tmp_path / "out"
    args = ["generate", "--decoder", "kandinsky22", "--decoder-path", str(kandinsky_dir), "--run", str(run)]
    extra = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    assert main([*args, "--prompts", str(prompts), "--out", str(out), *extra]) == 0
    assert seen and len(list(out.glob("*.png"))) == len(seen[0])


def test_generate_checks_the_decoder_folder_before_loading_a_text_encoder(
    tmp_path: Path, inputs: Any, monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """--run with a missing or wrong --decoder-path fails at once, naming the folder, before any model loads."""
    import csaligner.decode.preview_runs as preview_runs
    from csaligner.adapters import AdapterConfig, build_adapter, save_adapter

    _, prompts, _ = inputs
    run = tmp_path / "run"
    run.mkdir()
    for side, cfg in (("image", AdapterConfig("identity", 32, 32)), ("text", AdapterConfig("linear", 16, 32))):
        save_adapter(build_adapter(cfg), cfg, run / f"{side}_adapter.safetensors")
    loaded: list[str] = []

    def no_encoder(*args: Any, **kwargs: Any) -> Any:
        loaded.append("text encoder")
        raise AssertionError("the text encoder was loaded before the decoder folder was checked")

    monkeypatch.setattr(preview_runs, "encode_prompts", no_encoder)
    monkeypatch.setattr(preview_runs, "run_text_encoder", lambda run_dir: "tiny-text")
    empty, wrong = tmp_path / "empty", tmp_path / "wrong"
    empty.mkdir()
    wrong.mkdir()
    (wrong / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for folder, message in (
        (tmp_path / "nowhere", "no kandinsky22 decoder weights at"),
        (empty, "no kandinsky22 decoder weights at"),
        (wrong, "holds a StableDiffusionPipeline pipeline, but decoder 'kandinsky22' needs a KandinskyV22Pipeline"),
    ):
        args = ["generate", "--decoder", "kandinsky22", "--decoder-path", str(folder), "--run", str(run)]
        assert main([*args, "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert message in err and str(folder) in err and "--decoder-path" in err
    assert loaded == [] and not (tmp_path / "out").exists()
