"""Two gloo processes on CPU must match one process on the concatenated batch: loss, gradients, training."""

from __future__ import annotations

import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from csaligner.losses.objective import build_objective
from csaligner.train import load_config, train
from csaligner.train.batches import BatchSampler, split_features
from csaligner.train.config import RunConfig
from csaligner.train.distributed import DistInfo, all_gather_with_grad, init_distributed, wrap_ddp
from csaligner.train.model import build_model
from csaligner.train.step import DeviceFeatures, compute_terms
from tests.train import helpers
from tests.train.helpers import fast_overrides

# Multi-positive captions (uneven text counts per process) and an odd unpaired draw (uneven shares)
# exercise the padded all-gather; the learnable temperature checks a parameter outside DDP.
VARIANT = [
    "data.captions_per_image=all",
    "data.captions_per_image_in_cs=all",
    "data.paired_fraction=0.7",
    "data.unpaired_batch_size=7",
    "loss.learn_temperature=true",
    "model.image={kind: mlp, mlp_ratio: 2}",
    "train.device=cpu",  # gloo on CPU also where a GPU is present (two processes, maybe one GPU)
]


def one_step_grads(config: RunConfig, info: DistInfo, step: int) -> tuple[dict[str, torch.Tensor], float]:
    """Loss and parameter gradients of one step, as the training loop computes them."""
    features = helpers.synthetic_features()
    split = split_features(features, config.data)
    sampler = BatchSampler(split, config.data, config.train.batch_size, 0, info.rank, info.world_size)
    torch.manual_seed(0)
    model, _ = build_model(config.model, features.image.shape[1], features.text.shape[1])
    objective = build_objective(config.loss)
    feats = DeviceFeatures.from_features(features, info.device, use_tokens=False)
    ddp_model = wrap_ddp(model, info)  # keep a reference: a collected DDP drops its gradient hooks
    terms = compute_terms(ddp_model, objective, feats, sampler.batch(step), info, config)
    terms["loss"].backward()
    grads = {f"model.{k}": p.grad.detach().clone() for k, p in model.named_parameters()}
    grads["objective.logit_scale"] = objective.logit_scale.grad.detach().clone()
    return grads, float(terms["loss"].detach())


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        config = load_config(None, fast_overrides(Path(out_dir) / "unused", *VARIANT))
        grads, loss = one_step_grads(config, info, step=3)
        save_file(grads, f"{out_dir}/grads{rank}.safetensors", metadata={"loss": repr(loss)})
        # gradient of the gather itself: d/dx sum(w * gather(x)) is this process's slice of w, times world_size
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # shares of 1 and 2 rows
        gathered = all_gather_with_grad(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
        (weights * gathered).sum().backward()
        save_file({"gathered": gathered.detach(), "grad": x.grad}, f"{out_dir}/gather{rank}.safetensors")
        run_cfg = load_config(None, fast_overrides(Path(out_dir) / "ddp", *VARIANT, "train.steps=6"))
        result = train(run_cfg, helpers.synthetic_features())
        if rank == 0:
            Path(out_dir, "history.json").write_text(json.dumps(result.history))
        # Free the DDP wrappers (kept alive by reference cycles) and let both processes finish their
        # collectives before the group goes: gloo work freed at interpreter exit can SIGABRT the process.
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def test_two_processes_give_the_single_process_loss_and_gradients(ddp_outputs: Path) -> None:
    config = load_config(None, fast_overrides(ddp_outputs / "unused", *VARIANT))
    expected, loss = one_step_grads(config, DistInfo(), step=3)
    for rank in range(2):
        path = str(ddp_outputs / f"grads{rank}.safetensors")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            assert float(f.metadata()["loss"]) == pytest.approx(loss, abs=1e-6)
        got = load_file(path)
        assert set(got) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_all_gather_with_grad_returns_the_summed_local_slice(ddp_outputs: Path) -> None:
    gathered = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    weights = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    for rank, rows in ((0, slice(0, 1)), (1, slice(1, 3))):
        out = load_file(str(ddp_outputs / f"gather{rank}.safetensors"))
        assert torch.equal(out["gathered"], gathered)
        assert torch.equal(out["grad"], 2 * weights[rows])  # summed over the 2 processes


def test_two_process_training_matches_one_process(ddp_outputs: Path, tmp_path: Path) -> None:
    single = train(load_config(None, fast_overrides(tmp_path, *VARIANT, "train.steps=6")), helpers.synthetic_features())
    ddp = json.loads((ddp_outputs / "history.json").read_text())
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single.history], abs=1e-5)
    assert (ddp_outputs / "ddp" / "image_adapter.safetensors").is_file()


def test_more_processes_than_gpus_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    from csaligner.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"local rank 1\) would use cuda:1 but 1 CUDA device"):
        resolve_device("auto", local_rank=1)


@pytest.mark.parametrize("given", ["cuda", "cuda:1"])
def test_a_cuda_device_without_cuda_is_named_as_given(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "cuda" was reported as train.device='cuda:0', a value the user never wrote, with the fix "device=cpu"."""
    from csaligner.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        resolve_device(given, local_rank=0)
    assert str(err.value) == (
        f"train.device={given!r} but CUDA is not available here; use train.device=cpu or train.device=auto"
    )
    assert resolve_device("auto") == torch.device("cpu")
