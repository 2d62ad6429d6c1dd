"""Deterministic safetensors: the same tensors and metadata give the same bytes, in any process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from csaligner._safetensors_io import canonical_header, canonicalize_file, safetensors_bytes, save_safetensors

TENSORS = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float16), "mask": torch.tensor([True, False])}
# Keys in no particular order; values with quotes, escapes, control and non-ASCII characters.
METADATA = {"zeta": "é 😀", "format": "x", "config": json.dumps({"q": 'a"b\\c\n\t\x01'}), "alpha": "1"}


def _header(data: bytes) -> bytes:
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_plain_safetensors_orders_metadata_differently_between_saves() -> None:
    # The cause, kept as a test: if safetensors ever fixes its order, canonicalize_file stays harmless.
    headers = {_header(save(TENSORS, metadata=METADATA)) for _ in range(20)}
    assert len(headers) > 1


def test_safetensors_bytes_is_deterministic_and_loads_back(tmp_path: Path) -> None:
    outputs = {safetensors_bytes(TENSORS, METADATA) for _ in range(20)}
    assert len(outputs) == 1
    data = outputs.pop()
    header = _header(data)
    assert len(header) % 8 == 0 and header.startswith(b'{"__metadata__":{"alpha":"1","config":')
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == METADATA
        assert all(torch.equal(f.get_tensor(k), v) for k, v in TENSORS.items())


def test_header_without_metadata_is_left_as_safetensors_wrote_it() -> None:
    data = save(TENSORS)
    assert canonical_header(_header(data)) == _header(data) and safetensors_bytes(TENSORS) == data


def test_save_safetensors_equals_safetensors_bytes(tmp_path: Path) -> None:
    for i in range(5):
        save_safetensors(TENSORS, tmp_path / f"{i}.safetensors", metadata=METADATA)
        assert (tmp_path / f"{i}.safetensors").read_bytes() == safetensors_bytes(TENSORS, METADATA)


def test_canonicalize_file_rebuilds_a_header_of_another_length(tmp_path: Path) -> None:
    # A valid file whose header carries 16 extra padding spaces: the canonical header is shorter, so the
    # file is rebuilt (data copied after the new header) instead of patched in place.
    path = tmp_path / "padded.safetensors"
    save_file(TENSORS, str(path), metadata=METADATA)
    data = path.read_bytes()
    header = _header(data) + b" " * 16
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + len(_header(data)) :])
    canonicalize_file(path)
    assert path.read_bytes() == safetensors_bytes(TENSORS, METADATA)
    assert [p.name for p in tmp_path.iterdir()] == ["padded.safetensors"]  # no temporary left behind


# Writes an adapter, a cache shard and a checkpoint into sys.argv[1]; run under several PYTHONHASHSEEDs.
_WRITER = """
import sys
from pathlib import Path
import torch
from csaligner.adapters import AdapterConfig, build_adapter, save_adapter
from csaligner.data.cache_writer import CacheWriter
from csaligner.data.manifest import ImageTextManifest
from csaligner.train import save_checkpoint

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = AdapterConfig(kind="mlp", in_dim=8, out_dim=6)
adapter = build_adapter(cfg)
save_adapter(adapter, cfg, out / "adapter.safetensors")
m = ImageTextManifest(image_ids=("a",), image_paths=("/x/a.jpg",), captions=("c1", "c2"), text_to_image=(0, 0))
writer = CacheWriter(out / "cache", {"encoder": "tiny", "tokens": False}, m, {"image": [0], "text": [0, 1]}, 2)
writer.write_shard("text", 0, 0, 2, {"pooled": torch.arange(8.0).reshape(2, 4)})
opt = torch.optim.AdamW(adapter.parameters())
adapter(torch.randn(3, 8)).sum().backward()
opt.step()
save_checkpoint(out / "ckpt", 1, dict(adapter.state_dict()), opt.state_dict(), {"step": 1, "config": cfg.to_dict()})
"""


def _write_in_process(out: Path, hash_seed: str) -> dict[str, bytes]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    subprocess.run([sys.executable, "-c", _WRITER, str(out)], check=True, env=env, timeout=120)
    files = [*out.glob("*.safetensors"), *out.glob("cache/*.safetensors"), *out.glob("ckpt/step-*/*")]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_files_are_byte_identical_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    first = _write_in_process(tmp_path / "a", "1")
    second = _write_in_process(tmp_path / "b", "2")
    assert sorted(first) == sorted(second) and len(first) == 5  # adapter, shard, model, optimizer, state.json
    assert [name for name in first if first[name] != second[name]] == []


def test_saved_file_has_the_umask_mode_not_owner_only(tmp_path: Path, known_umask: int) -> None:
    # safetensors' save_file creates 0600: a cache shard or adapter others on the machine could not read
    path = tmp_path / "t.safetensors"
    save_safetensors(TENSORS, path, metadata=METADATA)
    assert path.stat().st_mode & 0o777 == 0o666 & ~known_umask
