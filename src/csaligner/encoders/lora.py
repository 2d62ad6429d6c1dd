"""LoRA on a Hugging Face text encoder (peft): the one encoder in this package that trains.

`apply_lora` freezes the base model and adds rank-r updates to the attention query/value
linears; `LoraTextEncoder` wraps tokenizer + LoRA model + masked mean pooling as an nn.Module
whose forward keeps the graph, so adapters and LoRA train end to end. `merge_lora` folds the
updates into the base weights for inference; `unmerge_lora` takes them out again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from csaligner._validation import is_integer, is_number, numpy_hint
from csaligner.encoders.base import EncoderUnavailableError, check_texts, mean_pool

PEFT_HINT = "pip install 'csaligner[lora]' (peft)"


@dataclass(frozen=True)
class LoraTextConfig:
    """LoRA hyper-parameters.

    Attributes:
        r: rank of each update.
        alpha: scale numerator; the update is (alpha / r) * B @ A.
        dropout: dropout on the LoRA branch input.
        target_modules: names of the linears to adapt (BERT: "query", "key", "value", "dense").
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        # bool is an int subclass: r=True would build rank-1 updates
        if not is_integer(self.r, plain=True) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}{numpy_hint(self.r)}")
        if not is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one linear, e.g. ('query', 'value')")


def apply_lora(model: nn.Module, config: LoraTextConfig | None = None) -> Any:
    """Wrap `model` with LoRA adapters; only the LoRA weights stay trainable.

    Args:
        model: a transformers model, e.g. a BertModel.
        config: LoRA settings (default r=8, alpha=16, dropout=0.1 on query/value).

    Returns:
        the peft PeftModel (forward as the base model).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise EncoderUnavailableError(f"LoRA needs {PEFT_HINT}") from err
    cfg = config or LoraTextConfig()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ValueError(f"target_modules {missing} match no nn.Linear in the model; its linears are {sorted(names)}")
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none"
    )
    return get_peft_model(model, lora)


def merge_lora(peft_model: Any) -> None:
    """Fold the LoRA updates into the base weights (W <- W + alpha/r * B A) for faster inference."""
    peft_model.merge_adapter()


def unmerge_lora(peft_model: Any) -> None:
    """Undo `merge_lora`: restore the base weights and the separate LoRA branch."""
    peft_model.unmerge_adapter()


def lora_state_dict(model: Any) -> dict[str, Tensor]:
    """Only the LoRA weights (a few hundred KB), for checkpoints.

    Args:
        model: a `LoraTextEncoder`, or the peft model `apply_lora` returned.
    """
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(_peft_model(model, "lora_state_dict")))


def load_lora_state_dict(model: Any, state: dict[str, Tensor]) -> None:
    """Load weights saved with `lora_state_dict` into a model built with the same config.

    Args:
        model: a `LoraTextEncoder`, or the peft model `apply_lora` returned.
        state: what `lora_state_dict` returned.
    """
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(_peft_model(model, "load_lora_state_dict"), state)


def _peft_model(model: Any, caller: str) -> Any:
    """The peft model inside a `LoraTextEncoder`, or `model` itself when it is one."""
    if isinstance(model, LoraTextEncoder):
        return model.peft_model
    if not hasattr(model, "peft_config"):
        raise TypeError(
            f"{caller} takes a LoraTextEncoder or the peft model apply_lora returned, got {type(model).__name__} "
            "(a model without LoRA has no LoRA weights)"
        )
    return model


class LoraTextEncoder(nn.Module):
    """Trainable text encoder: tokenizer -> LoRA-wrapped transformer -> masked mean pooling.

    Args:
        model: the base transformers model (frozen by `apply_lora`).
        tokenizer: its tokenizer (any callable returning input_ids / attention_mask), or None
            when callers pass token ids to `forward` themselves.
        config: LoRA settings.
        max_length: truncation length for `encode`.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, config: LoraTextConfig | None = None, max_length: int = 128
    ) -> None:
        super().__init__()
        self.peft_model = apply_lora(model, config)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._unmerged: dict[str, Tensor] | None = None  # exact base weights while merged

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) ids and mask -> (B, D) pooled and (B, L, D) hidden states, with gradients to LoRA."""
        hidden = self.peft_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask.bool()), hidden

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Tokenise and run `forward`; returns (B, D) pooled features (graph kept for training)."""
        if self.tokenizer is None:
            raise ValueError("LoraTextEncoder was built without a tokenizer; call forward(input_ids, attention_mask)")
        device = next(self.parameters()).device
        batch = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device))[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merge(self) -> None:
        """Fold the updates into the base weights, keeping a copy of those weights for `unmerge`.

        Merging an encoder that is already merged does nothing: a second copy would hold the merged
        weights, and `unmerge` would restore those, leaving the updates in the frozen base twice.
        """
        if self._unmerged is not None or is_merged(self.peft_model):
            return
        # peft's unmerge subtracts alpha/r * B A again, which leaves ~1 ulp of rounding drift in W on
        # every merge/unmerge cycle (evaluating between training steps would slowly edit the "frozen" base).
        self._unmerged = {n: p.detach().clone() for n, p in self.peft_model.named_parameters() if "base_layer" in n}
        merge_lora(self.peft_model)

    def unmerge(self) -> None:
        """Take the updates out again; the base weights come back bit for bit."""
        unmerge_lora(self.peft_model)
        if self._unmerged is not None:
            with torch.no_grad():
                for name, p in self.peft_model.named_parameters():
                    if name in self._unmerged:
                        p.copy_(self._unmerged[name])
            self._unmerged = None


def is_merged(peft_model: Any) -> bool:
    """True when any LoRA layer of `peft_model` has its update folded into the base weights."""
    return any(bool(getattr(m, "merged", False)) for m in peft_model.modules() if hasattr(m, "merge"))


def num_trainable(module: nn.Module) -> int:
    """Count trainable parameters (LoRA should be a small fraction of the base model)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def lora_minilm(config: LoraTextConfig | None = None, device: str = "cpu") -> LoraTextEncoder:
    """LoRA on the packaged all-MiniLM-L6-v2 BertModel (local files only)."""
    from csaligner.encoders.text import HFTextEncoder, minilm_dir

    base = HFTextEncoder(minilm_dir(), name="minilm", max_length=256)
    enc = LoraTextEncoder(base.model.train(), base.tokenizer, config, max_length=256)
    return enc.to(torch.device(device))
