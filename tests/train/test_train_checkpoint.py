from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import csaligner.train.checkpoint as ckpt_mod
from csaligner.data.features import PairedFeatures
from csaligner.train import latest_checkpoint, load_checkpoint, load_config, save_checkpoint, train
from csaligner.train.checkpoint import (
    atomic_write_bytes,
    flatten_optimizer,
    rng_state,
    set_rng_state,
    unflatten_optimizer,
)
from tests.train.helpers import fast_overrides

# Dropout, EMA, a learnable temperature, unpaired draws and random captions: every kind of state a
# resumed run must restore to continue the same trajectory.
STATEFUL = [
    "train.steps=20",
    "train.ema=0.9",
    "loss.learn_temperature=true",
    "model.text={kind: prior, dropout: 0.2, num_layers: 1, num_heads: 2, head_dim: 8}",
    "data.paired_fraction=0.7",
    "data.unpaired_batch_size=6",
    "data.captions_per_image_in_cs=all",
]


def test_resume_continues_the_exact_loss_trajectory(tmp_path: Path, features: PairedFeatures) -> None:
    straight = train(load_config(None, fast_overrides(tmp_path / "a", *STATEFUL)), features)
    stopped_cfg = load_config(None, fast_overrides(tmp_path / "b", *STATEFUL, "train.checkpoint_every=5"))
    first = train(stopped_cfg, features, until_step=10)
    assert not first.finished and first.step == 10 and first.image_adapter is None
    assert latest_checkpoint(tmp_path / "b" / "checkpoints") == first.checkpoint
    torch.manual_seed(1234)  # a different global RNG state before resuming must not matter
    resumed = train(load_config(None, fast_overrides(tmp_path / "b", *STATEFUL, "train.resume=auto")), features)
    assert resumed.finished and [r["step"] for r in resumed.history] == list(range(11, 21))
    losses_a = [r["loss"] for r in straight.history]
    losses_b = [r["loss"] for r in first.history + resumed.history]
    assert losses_b == pytest.approx(losses_a, abs=1e-6, rel=0)
    assert len(set(losses_a)) == 20  # the trajectory is not trivially constant
    for side in ("image", "text"):
        a = load_file(str(tmp_path / "a" / f"{side}_adapter.safetensors"))
        b = load_file(str(tmp_path / "b" / f"{side}_adapter.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 21  # header + 20 steps, no duplicates across the restart


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path: Path, features: PairedFeatures) -> None:
    cfg = fast_overrides(tmp_path, "train.steps=12", "train.checkpoint_every=4")
    train(load_config(None, cfg), features, until_step=6)  # steps 5-6 logged, checkpoint at 4 (and at 6 on stop)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000004")  # as if killed before the step-6 save
    resumed = train(load_config(None, [*cfg, "train.resume=auto"]), features)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13)) and resumed.history[0]["step"] == 5


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path: Path, features: PairedFeatures) -> None:
    result = train(load_config(None, fast_overrides(tmp_path, "train.steps=3", "train.resume=auto")), features)
    assert result.finished and result.history[0]["step"] == 1


def test_checkpoint_holds_no_pickle_and_loads_without_unpickling(
    tmp_path: Path, features: PairedFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = train(load_config(None, fast_overrides(tmp_path, "train.steps=3", "train.ema=0.5")), features)
    assert result.checkpoint is not None
    names = sorted(p.name for p in Path(result.checkpoint).iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "state.json"]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.state["step"] == 3 and loaded.state["config"]["train"]["steps"] == 3
    assert any(k.startswith("ema.") for k in loaded.model) and any(k.startswith("model.") for k in loaded.model)
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(loaded.optimizer["state"][0])


def test_optimizer_state_round_trips_through_flat_tensors() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # through JSON, as on disk
    restored = unflatten_optimizer(tensors, meta)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)
    for a, b in zip(opt.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_rng_state_round_trips_through_json() -> None:
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def _save(root: Path, step: int) -> str:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root, step, dict(model.state_dict()), opt.state_dict(), {"step": step}, keep=0)


def test_failed_checkpoint_write_leaves_nothing_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _save(tmp_path, 1)
    real = ckpt_mod._safetensors_bytes
    calls = []

    def fail_on_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
        calls.append(1)
        if len(calls) == 2:  # model.safetensors is written, then the optimizer file fails
            raise OSError("disk full")
        return real(tensors, metadata)

    monkeypatch.setattr(ckpt_mod, "_safetensors_bytes", fail_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # no temp dir, no step-2
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(good).state["step"] == 1


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("crash before rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="crash before rename"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temp file is gone


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        model = torch.nn.Linear(2, 2)
        save_checkpoint(
            tmp_path,
            step,
            dict(model.state_dict()),
            torch.optim.AdamW(model.parameters()).state_dict(),
            {"step": step},
            keep=2,
        )
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]


def test_incomplete_checkpoint_is_reported(tmp_path: Path) -> None:
    path = Path(_save(tmp_path, 1))
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['optimizer\.safetensors'\]"):
        load_checkpoint(path)


def test_config_changes_show_a_dropped_value_as_stored_with_who_ignored_it() -> None:
    from csaligner.train.stored_config import drop_ignored_settings

    written = {
        "model": {"image": {"kind": "mlp", "bias": False}, "text": {"kind": "linear", "mlp_ratio": 2}},
        "loss": {"objective": "infonce", "lam": 0.5},
        "data": {"unpaired_batch_size": 64},
    }
    new = {
        "model": {"image": {"kind": "mlp", "bias": False}, "text": {"kind": "mlp", "mlp_ratio": 2}},
        "loss": {"objective": "mmd", "lam": 0.5},
        "data": {"unpaired_batch_size": 64},
    }
    loaded = drop_ignored_settings(written, {"image": (8, 8), "text": (6, 8)})
    assert ckpt_mod.config_changes(loaded, new, frozenset(), as_stored=written) == [
        "data.unpaired_batch_size: 64 (stored, but objective 'infonce' ignored it: dropped to 0) -> 64",
        "loss.lam: 0.5 (stored, but objective 'infonce' ignored it: dropped to 0.01) -> 0.5",
        "loss.objective: 'infonce' -> 'mmd'",
        "model.image.bias: False (stored, but kind 'mlp' ignored it at these widths: dropped) -> False",
        "model.text.kind: 'linear' -> 'mlp'",
        "model.text.mlp_ratio: 2 (stored, but kind 'linear' ignored it: dropped) -> 2",
    ]
    assert ckpt_mod.config_changes(loaded, new, frozenset())[1] == "loss.lam: 0.01 -> 0.5"  # without: the default
