"""LoRA on a tiny random BertModel: only LoRA trains, merge keeps outputs, unmerge restores weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from csaligner.encoders import LoraTextConfig, LoraTextEncoder, apply_lora, load_lora_state_dict, lora_state_dict
from csaligner.encoders.lora import num_trainable

pytest.importorskip("peft")


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    return ids, (ids != 0).long()


def randomise_lora(model: nn.Module) -> None:
    """LoRA B starts at zero (a no-op); make the update non-trivial so merge tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_only_lora_weights_train(tiny_bert: nn.Module) -> None:
    enc = LoraTextEncoder(tiny_bert)
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # "...attention.self.query.lora_A.default.weight": the adapted linear precedes lora_A/lora_B
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names} == {"query", "value"}
    assert 0 < num_trainable(enc) < 0.1 * sum(p.numel() for p in enc.parameters())
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(enc.trainable_parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    for _ in range(2):  # first step moves B off zero, second moves A too
        pooled, _ = enc(*batch())
        pooled.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in enc.named_parameters() if p.requires_grad)
    assert all(torch.equal(frozen[n], p) for n, p in enc.named_parameters() if not p.requires_grad)


def test_merge_keeps_outputs_and_unmerge_restores(tiny_bert: nn.Module) -> None:
    enc = LoraTextEncoder(tiny_bert, config=LoraTextConfig(r=4, alpha=8, dropout=0.0)).eval()
    randomise_lora(enc)
    base = enc.peft_model.base_model.model.encoder.layer[0].attention.self.query.base_layer
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        ref = enc(*batch())[0]
        enc.merge()
        assert not torch.allclose(base.weight, w0)  # the update went into W
        torch.testing.assert_close(enc(*batch())[0], ref, atol=1e-5, rtol=1e-4)
        enc.unmerge()
        torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(enc(*batch())[0], ref, atol=1e-5, rtol=1e-4)


def test_merge_unmerge_cycles_leave_base_weights_bit_identical(tiny_bert: nn.Module) -> None:
    """peft's unmerge subtracts B A again (rounding drift of ~1e-8 per cycle); the encoder restores W exactly."""
    enc = LoraTextEncoder(tiny_bert, config=LoraTextConfig(dropout=0.0)).eval()
    randomise_lora(enc)
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    for _ in range(3):
        enc.merge()
        enc.unmerge()
    assert all(torch.equal(frozen[n], p) for n, p in enc.named_parameters() if not p.requires_grad)


def test_merging_twice_then_unmerging_restores_the_base_weights(tiny_bert: nn.Module) -> None:
    """A second merge took its copy of the already-merged weights, so unmerge put B A into the frozen base."""
    enc = LoraTextEncoder(tiny_bert, config=LoraTextConfig(dropout=0.0)).eval()
    randomise_lora(enc)
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        ref = enc(*batch())[0]
        enc.merge()
        enc.merge()  # e.g. an eval helper that merges, called from a loop that merged already
        torch.testing.assert_close(enc(*batch())[0], ref, atol=1e-5, rtol=1e-4)
        enc.unmerge()
        assert all(torch.equal(frozen[n], p) for n, p in enc.named_parameters() if not p.requires_grad)
        torch.testing.assert_close(enc(*batch())[0], ref, atol=1e-5, rtol=1e-4)


def test_lora_changes_outputs_and_state_dict_round_trips(tiny_bert: nn.Module) -> None:
    plain = copy.deepcopy(tiny_bert)
    enc = LoraTextEncoder(tiny_bert, config=LoraTextConfig(dropout=0.0)).eval()
    randomise_lora(enc)
    ids, mask = batch()
    with torch.no_grad():
        out = enc(ids, mask)[0]
        assert not torch.allclose(out, plain(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1))
    state = lora_state_dict(enc.peft_model)
    assert state and all("lora_" in k for k in state)
    fresh = apply_lora(plain, LoraTextConfig(dropout=0.0)).eval()
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        hidden = fresh(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), out)


def test_lora_state_dict_takes_the_encoder_itself(tiny_bert: nn.Module) -> None:
    """lora_state_dict(encoder) was AttributeError: 'LoraTextEncoder' object has no attribute 'peft_config'."""
    plain = copy.deepcopy(tiny_bert)
    enc = LoraTextEncoder(tiny_bert, config=LoraTextConfig(dropout=0.0)).eval()
    randomise_lora(enc)
    state = lora_state_dict(enc)
    assert state.keys() == lora_state_dict(enc.peft_model).keys() and state
    fresh = LoraTextEncoder(plain, config=LoraTextConfig(dropout=0.0)).eval()
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*batch())[0], enc(*batch())[0])
    with pytest.raises(TypeError, match="takes a LoraTextEncoder or the peft model apply_lora returned, got Linear"):
        lora_state_dict(nn.Linear(2, 2))


def test_config_and_target_errors(tiny_bert: nn.Module) -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraTextConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraTextConfig(dropout=1.0)
    with pytest.raises(ValueError, match="rank r must be an integer >= 1, got True"):
        LoraTextConfig(r=True)  # bool is an int subclass: it built rank-1 updates
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got True"):
        LoraTextConfig(alpha=True)
    with pytest.raises(ValueError, match=r"match no nn.Linear.*'query'"):
        apply_lora(tiny_bert, LoraTextConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="without a tokenizer"):
        LoraTextEncoder(tiny_bert).encode(["a dog"])
