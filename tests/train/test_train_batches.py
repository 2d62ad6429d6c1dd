from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch import Tensor

from csaligner.data.features import PairedFeatures
from csaligner.train import DataConfig
from csaligner.train.batches import Batch, BatchSampler, describe_split, split_features


def captions_of(features: PairedFeatures, image_row: int) -> set[int]:
    return set((features.text_to_image == image_row).nonzero().flatten().tolist())


def test_full_split_keeps_every_captioned_image_and_groups_captions(features: PairedFeatures) -> None:
    split = split_features(features, DataConfig())
    assert split.num_paired == 46  # 48 images, the last 2 have no caption
    for i, row in enumerate(split.paired_images.tolist()):
        got = set(split.caption_rows[split.caption_ptr[i] : split.caption_ptr[i + 1]].tolist())
        assert got == captions_of(features, row)
    # caption-less images and -1 texts form the unpaired pools
    assert sorted(split.unpaired_images.tolist()) == [46, 47]
    assert sorted(split.unpaired_texts.tolist()) == sorted((features.text_to_image == -1).nonzero().flatten().tolist())


def test_paired_fraction_moves_the_rest_into_independent_pools(features: PairedFeatures) -> None:
    split = split_features(features, DataConfig(paired_fraction=0.25))
    assert split.num_paired == round(0.25 * 46)
    paired = set(split.paired_images.tolist())
    assert paired.isdisjoint(split.unpaired_images.tolist())
    assert len(paired) + split.unpaired_images.numel() == features.num_images
    t2i = features.text_to_image
    assert all(int(t2i[r]) == -1 or int(t2i[r]) not in paired for r in split.unpaired_texts.tolist())
    assert split.unpaired_texts.numel() + split.caption_rows.numel() == features.num_texts
    # shuffled independently: the pools' order does not keep images next to their captions
    pool_owner = t2i[split.unpaired_texts]
    firsts = pool_owner[torch.arange(0, pool_owner.numel(), 5)]
    assert not torch.equal(firsts[: split.unpaired_images.numel()], split.unpaired_images[: firsts.numel()])
    again = split_features(features, DataConfig(paired_fraction=0.25))
    assert torch.equal(again.unpaired_texts, split.unpaired_texts)  # seeded


def test_dropping_unpaired_leaves_empty_pools(features: PairedFeatures) -> None:
    split = split_features(features, DataConfig(paired_fraction=0.5, use_unpaired=False))
    assert split.unpaired_images.numel() == 0 and split.unpaired_texts.numel() == 0


def test_an_objective_without_pools_gets_none_and_the_counts_say_so(features: PairedFeatures) -> None:
    cfg = DataConfig(paired_fraction=0.5)
    split = split_features(features, cfg, pools=False)
    assert split.unpaired_images.numel() == 0 and split.unpaired_texts.numel() == 0
    n_txt = split.caption_rows.numel()
    line = describe_split(split, features, "loss.objective=infonce has no divergence term")
    assert line == (
        f"data: 23 of 48 images paired with {n_txt} of {features.num_texts} texts; left out: 25 images, "
        f"{features.num_texts - n_txt} texts (loss.objective=infonce has no divergence term)"
    )


def test_the_counts_name_the_pools_and_leave_nothing_out_when_all_is_used(features: PairedFeatures) -> None:
    split = split_features(features, DataConfig(paired_fraction=0.5))
    line = describe_split(split, features, "unused reason")
    pools = f"{split.unpaired_images.numel()} images, {split.unpaired_texts.numel()} texts"
    assert line.endswith(f"; unpaired pools for the divergence term: {pools}")
    assert "left out" not in line
    assert split.num_paired + split.unpaired_images.numel() == features.num_images


def test_one_caption_batches_cover_an_epoch_without_repeats(features: PairedFeatures) -> None:
    cfg = DataConfig()
    sampler = BatchSampler(split_features(features, cfg), cfg, batch_size=10, seed=3)
    assert sampler.steps_per_epoch == 4
    seen = torch.cat([sampler.batch(s).image_rows for s in range(4)])
    assert seen.unique().numel() == 40
    b = sampler.batch(5)
    assert b.text_rows.numel() == 10 and torch.equal(b.text_to_image, torch.arange(10))
    assert torch.equal(features.text_to_image[b.text_rows], b.image_rows)  # each caption belongs to its image
    assert sorted(b.cs_text_rows.tolist()) == sorted((features.text_to_image == -1).nonzero().flatten().tolist())
    assert not torch.equal(sampler.batch(0).image_rows, sampler.batch(4).image_rows)  # reshuffled each epoch


def test_all_captions_give_multi_positive_indices(features: PairedFeatures) -> None:
    cfg = DataConfig(captions_per_image="all", captions_per_image_in_cs="all")
    b = BatchSampler(split_features(features, cfg), cfg, batch_size=8, seed=0).batch(2)
    assert b.text_rows.numel() == sum(len(captions_of(features, r)) for r in b.image_rows.tolist())
    assert torch.equal(b.image_rows[b.text_to_image], features.text_to_image[b.text_rows])
    assert torch.equal(features.text_to_image[b.token_text_rows], b.image_rows)


def test_one_caption_in_infonce_all_in_cs(features: PairedFeatures) -> None:
    cfg = DataConfig(captions_per_image="one", captions_per_image_in_cs="all", use_unpaired=False)
    b = BatchSampler(split_features(features, cfg), cfg, batch_size=8, seed=0).batch(1)
    everything = set().union(*(captions_of(features, r) for r in b.image_rows.tolist()))
    assert set(b.text_rows.tolist()) | set(b.cs_text_rows.tolist()) == everything
    assert set(b.text_rows.tolist()).isdisjoint(b.cs_text_rows.tolist())


def test_caption_choice_varies_between_steps(features: PairedFeatures) -> None:
    cfg = DataConfig()
    sampler = BatchSampler(split_features(features, cfg), cfg, batch_size=46, seed=0)
    assert not torch.equal(sampler.batch(0).text_rows.sort().values, sampler.batch(1).text_rows.sort().values)


def test_batches_are_a_pure_function_of_seed_and_step(features: PairedFeatures) -> None:
    cfg = DataConfig(paired_fraction=0.5, unpaired_batch_size=6)
    split = split_features(features, cfg)
    a, b = BatchSampler(split, cfg, 8, seed=1), BatchSampler(split, cfg, 8, seed=1)
    for step in (7, 0, 3):
        x, y = a.batch(step), b.batch(step)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
    assert a.batch(0).unpaired_image_rows.numel() == 6


@pytest.mark.parametrize("mode", ["one", "all"])
def test_process_shares_concatenate_to_the_single_process_batch(features: PairedFeatures, mode: str) -> None:
    cfg = DataConfig(
        captions_per_image=mode, captions_per_image_in_cs="all", paired_fraction=0.6, unpaired_batch_size=7
    )
    split = split_features(features, cfg)
    whole = BatchSampler(split, cfg, 12, seed=0).batch(5)
    parts = [BatchSampler(split, cfg, 12, seed=0, rank=r, world_size=2).batch(5) for r in range(2)]
    assert torch.equal(torch.cat([p.image_rows for p in parts]), whole.image_rows)
    assert torch.equal(torch.cat([p.text_rows for p in parts]), whole.text_rows)
    assert torch.equal(torch.cat([p.unpaired_image_rows for p in parts]), whole.unpaired_image_rows)
    assert sorted(torch.cat([p.cs_text_rows for p in parts]).tolist()) == sorted(whole.cs_text_rows.tolist())


def test_batch_size_must_split_over_processes(features: PairedFeatures) -> None:
    cfg = DataConfig()
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        BatchSampler(split_features(features, cfg), cfg, 16, seed=0, rank=0, world_size=3)


def test_token_images_default_to_the_whole_batch(features: PairedFeatures) -> None:
    cfg = DataConfig()
    b = BatchSampler(split_features(features, cfg), cfg, batch_size=10, seed=1).batch(3)
    assert torch.equal(b.token_image_rows, b.image_rows)
    assert torch.equal(features.text_to_image[b.token_text_rows], b.token_image_rows)


@pytest.mark.parametrize("captions", ["one", "all"])
def test_token_images_take_a_subset_that_any_process_count_agrees_on(features: PairedFeatures, captions: str) -> None:
    cfg = DataConfig(token_images=5, captions_per_image=captions, captions_per_image_in_cs=captions)
    split = split_features(features, cfg)
    one = BatchSampler(split, cfg, batch_size=12, seed=4).batch(2)
    assert one.token_image_rows.numel() == 5 and torch.equal(one.token_image_rows, one.image_rows[:5])
    assert torch.equal(features.text_to_image[one.token_text_rows], one.token_image_rows)
    shares = [BatchSampler(split, cfg, batch_size=12, seed=4, rank=r, world_size=2).batch(2) for r in range(2)]
    assert torch.equal(torch.cat([s.token_image_rows for s in shares]), one.token_image_rows)
    assert torch.equal(torch.cat([s.token_text_rows for s in shares]), one.token_text_rows)


def test_token_images_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ValueError, match=r"data\.token_images must be an integer >= 0"):
        DataConfig(token_images=-1)


def test_a_batch_larger_than_the_paired_images_shrinks_and_says_so(features: PairedFeatures) -> None:
    cfg = DataConfig(paired_fraction=0.5)
    split = split_features(features, cfg)
    with pytest.warns(UserWarning, match=rf"train.batch_size=64 is more than the {split.num_paired} paired images"):
        sampler = BatchSampler(split, cfg, batch_size=64, seed=0)
    assert sampler.batch_size == split.num_paired and sampler.batch(0).image_rows.numel() == split.num_paired


def _sampled_batch(features: PairedFeatures) -> Batch:
    cfg = DataConfig(paired_fraction=0.5, captions_per_image_in_cs="all")  # every index tensor non-empty
    return BatchSampler(split_features(features, cfg), cfg, batch_size=8, seed=0).batch(3)


def test_batch_to_moves_every_index_in_one_copy(features: PairedFeatures, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _sampled_batch(features)
    assert all(getattr(batch, f.name).numel() for f in fields(Batch))
    assert batch.to(torch.device("cpu")) is batch  # already there: nothing to copy
    copies: list[tuple[int, ...]] = []
    real_to = Tensor.to

    def counting_to(self: Tensor, *args: object, **kwargs: object) -> Tensor:
        if any(isinstance(a, torch.device) for a in args):
            copies.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(Tensor, "to", counting_to)
    meta = batch.to(torch.device("meta"))
    assert len(copies) == 1  # one flat copy, not one per index tensor
    for f in fields(Batch):
        got, want = getattr(meta, f.name), getattr(batch, f.name)
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == torch.long


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_to_cuda_keeps_every_index(features: PairedFeatures) -> None:
    batch = _sampled_batch(features)
    moved = batch.to(torch.device("cuda", torch.cuda.current_device()))
    for f in fields(Batch):
        assert torch.equal(getattr(moved, f.name).cpu(), getattr(batch, f.name))
