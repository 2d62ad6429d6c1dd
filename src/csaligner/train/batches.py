"""Paired / unpaired split of cached features and stateless, seeded minibatch sampling.

Every batch is a pure function of (seed, step): the epoch's image order comes from a generator
seeded with (seed, epoch) and the caption / unpaired draws from one seeded with (seed, step).
Resuming therefore needs only the step, and N processes slicing the same global batch see
exactly what one process sees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from csaligner.data.features import PairedFeatures
from csaligner.train.config import DataConfig

_EPOCH_SALT, _STEP_SALT = 1, 2


def _generator(seed: int, salt: int, index: int) -> torch.Generator:
    # Integer mixing only: Python's str hash is randomised per process.
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + index) % (2**63 - 1))


@dataclass
class TrainingSplit:
    """Row indices into a `PairedFeatures` after the paired_fraction split.

    Attributes:
        paired_images: (N_p,) image rows used as pairs; each has at least one caption.
        caption_ptr: (N_p + 1,) CSR offsets: captions of paired image i are caption_rows[ptr[i]:ptr[i+1]].
        caption_rows: (M_p,) text rows grouped by paired image.
        unpaired_images: (P,) image rows in the unpaired pool (shuffled), empty when unused.
        unpaired_texts: (Q,) text rows in the unpaired pool (shuffled independently), empty when unused.
    """

    paired_images: Tensor
    caption_ptr: Tensor
    caption_rows: Tensor
    unpaired_images: Tensor
    unpaired_texts: Tensor

    @property
    def num_paired(self) -> int:
        return int(self.paired_images.numel())


def split_features(features: PairedFeatures, config: DataConfig, *, pools: bool = True) -> TrainingSplit:
    """Keep `paired_fraction` of the captioned images as pairs; the rest feed (or skip) the unpaired pools.

    Images without any caption and texts marked -1 join the unpaired pools as well. With
    `pools=False` (an objective without a divergence term) or `config.use_unpaired` False they are
    left out; `describe_split` counts them.
    """
    g = _generator(config.split_seed, 0, 0)
    t2i = features.text_to_image
    counts = torch.bincount(t2i[t2i >= 0], minlength=features.num_images)
    captioned = (counts > 0).nonzero().flatten()
    order = captioned[torch.randperm(captioned.numel(), generator=g)]
    n_paired = max(1, round(config.paired_fraction * captioned.numel())) if captioned.numel() else 0
    if n_paired == 0:
        raise ValueError("the features hold no captioned image: nothing to train InfoNCE on")
    paired = order[:n_paired].sort().values  # sorted: batches index a stable order
    is_paired = torch.zeros(features.num_images, dtype=torch.bool)
    is_paired[paired] = True
    text_paired = (t2i >= 0) & is_paired[t2i.clamp_min(0)]
    rows = text_paired.nonzero().flatten()
    rows = rows[torch.argsort(t2i[rows], stable=True)]  # group captions by image
    remap = torch.full((features.num_images,), -1, dtype=torch.long)
    remap[paired] = torch.arange(n_paired)
    ptr = torch.zeros(n_paired + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(remap[t2i[rows]], minlength=n_paired).cumsum(0)
    if config.use_unpaired and pools:
        un_img = (~is_paired).nonzero().flatten()
        un_txt = (~text_paired).nonzero().flatten()
        un_img = un_img[torch.randperm(un_img.numel(), generator=g)]
        un_txt = un_txt[torch.randperm(un_txt.numel(), generator=g)]
    else:
        un_img = un_txt = torch.zeros(0, dtype=torch.long)
    return TrainingSplit(paired, ptr, rows, un_img, un_txt)


def describe_split(split: TrainingSplit, features: PairedFeatures, left_out_because: str) -> str:
    """One line of counts: the pairs, the unpaired pools (CS term only) and what is left out, and why."""
    n_img, n_txt = features.num_images, features.num_texts
    pool_img, pool_txt = split.unpaired_images.numel(), split.unpaired_texts.numel()
    paired_txt = split.caption_rows.numel()
    line = f"data: {split.num_paired} of {n_img} images paired with {paired_txt} of {n_txt} texts"
    if pool_img or pool_txt:
        line += f"; unpaired pools for the divergence term: {pool_img} images, {pool_txt} texts"
    out_img, out_txt = n_img - split.num_paired - pool_img, n_txt - paired_txt - pool_txt
    if out_img or out_txt:
        line += f"; left out: {out_img} images, {out_txt} texts ({left_out_because})"
    return line


@dataclass
class Batch:
    """Row indices (into the PairedFeatures) of one process's share of a step.

    Attributes:
        image_rows: (B,) paired images.
        text_rows: (M,) captions in InfoNCE, grouped by image.
        text_to_image: (M,) position of each caption's image in image_rows.
        token_image_rows: (K,) images whose token sets enter the token-level CS term: the batch's
            images, or the first data.token_images of the global batch split across processes.
        token_text_rows: (K,) one caption per token image (its InfoNCE caption, or its first caption
            when InfoNCE sees all of them) for the token-level CS term.
        cs_text_rows: (E,) texts only in the CS term: other captions of the batch images, then
            unpaired texts.
        unpaired_image_rows: (P,) images only in the CS term.
    """

    image_rows: Tensor
    text_rows: Tensor
    text_to_image: Tensor
    token_image_rows: Tensor
    token_text_rows: Tensor
    cs_text_rows: Tensor
    unpaired_image_rows: Tensor

    def to(self, device: torch.device) -> Batch:
        """All the row indices on `device`, in one host-to-device copy.

        On CUDA the copy is non-blocking from pinned memory, so the host goes on queueing the step
        while the queued work of the last one runs. A `.to(device)` per index tensor from pageable
        memory waited for the whole stream each time (up to 7 waits per step).
        """
        parts = [getattr(self, f.name) for f in fields(self)]
        if all(p.device == device for p in parts):
            return self
        flat = torch.cat([p.to(torch.long) for p in parts])
        pinned = device.type == "cuda"
        flat = (flat.pin_memory() if pinned else flat).to(device, non_blocking=pinned)
        return Batch(*flat.split([p.numel() for p in parts]))


class BatchSampler:
    """Deterministic global batches, sliced for process `rank` of `world_size`."""

    def __init__(
        self, split: TrainingSplit, config: DataConfig, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if split.num_paired < world_size:
            raise ValueError(f"{split.num_paired} paired images cannot feed {world_size} processes")
        # Drop-last batches of a fixed size; shrink (to a multiple of world_size) for tiny data.
        self.batch_size = min(batch_size, split.num_paired) // world_size * world_size
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes")
        if self.batch_size < batch_size and rank == 0:  # InfoNCE sees fewer negatives than configured: say so
            warnings.warn(
                f"train.batch_size={batch_size} is more than the {split.num_paired} paired images: every step "
                f"uses a batch of {self.batch_size}",
                stacklevel=2,
            )
        self.split, self.config, self.seed = split, config, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = split.num_paired // self.batch_size
        self.unpaired_size = config.unpaired_batch_size or batch_size
        self._epoch, self._order = -1, torch.zeros(0, dtype=torch.long)

    def epochs_done(self, steps: int) -> float:
        """Epochs completed after `steps` steps, fractional (2.5: halfway through the third), as logged:
        a 10-epoch run ends at 10.0."""
        return round(steps / self.steps_per_epoch, 4)

    def _image_positions(self, step: int) -> Tensor:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, recomputed only when the epoch changes
            self._order = torch.randperm(self.split.num_paired, generator=_generator(self.seed, _EPOCH_SALT, epoch))
            self._epoch = epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, step: int) -> Batch:
        """This process's share of global batch `step` (0-based)."""
        g = _generator(self.seed, _STEP_SALT, step)
        pos = self._image_positions(step)  # (B,) global batch, positions into split.paired_images
        start, count = self.split.caption_ptr[pos], self.split.caption_ptr[pos + 1] - self.split.caption_ptr[pos]
        chosen = start + (torch.rand(pos.numel(), generator=g) * count).long().clamp_max(count - 1)
        un_img = self._draw(self.split.unpaired_images, g)
        un_txt = self._draw(self.split.unpaired_texts, g)
        token_caps = chosen if self.config.captions_per_image == "one" else start
        k = self.config.token_images or pos.numel()
        # Token images come from the global batch's first k (a random subset: the order is a random
        # permutation), split across processes independently of the pooled rows, so that any number
        # of processes sees the same token set as one process.
        tok = torch.arange(min(k, pos.numel())).tensor_split(self.world_size)[self.rank]
        token_images, token_texts = self.split.paired_images[pos[tok]], self.split.caption_rows[token_caps[tok]]
        mine = torch.arange(pos.numel()).tensor_split(self.world_size)[self.rank]
        pos, start, count, chosen = pos[mine], start[mine], count[mine], chosen[mine]
        everything = _ranges(start, count)  # (sum count,) all captions of my images, grouped by image
        owner = torch.repeat_interleave(torch.arange(pos.numel()), count)
        rows = self.split.caption_rows
        if self.config.captions_per_image == "all":
            text_pos, t2i, extra = everything, owner, torch.zeros(0, dtype=torch.long)
        else:
            text_pos, t2i = chosen, torch.arange(pos.numel())
            others = everything[~torch.isin(everything, chosen)]
            extra = others if self.config.captions_per_image_in_cs == "all" else torch.zeros(0, dtype=torch.long)
        return Batch(
            image_rows=self.split.paired_images[pos],
            text_rows=rows[text_pos],
            text_to_image=t2i,
            token_image_rows=token_images,
            token_text_rows=token_texts,
            cs_text_rows=torch.cat([rows[extra], un_txt.tensor_split(self.world_size)[self.rank]]),
            unpaired_image_rows=un_img.tensor_split(self.world_size)[self.rank],
        )

    def _draw(self, pool: Tensor, g: torch.Generator) -> Tensor:
        # Without replacement; a pool smaller than the draw is used whole (no duplicated points).
        if pool.numel() == 0:
            return pool
        return pool[torch.randperm(pool.numel(), generator=g)[: self.unpaired_size]]


def _ranges(start: Tensor, count: Tensor) -> Tensor:
    """Concatenate arange(start[i], start[i] + count[i]) for all i, vectorised."""
    total = int(count.sum())
    offsets = torch.repeat_interleave(start - (count.cumsum(0) - count), count)
    return offsets + torch.arange(total)
