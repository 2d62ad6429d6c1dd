"""Eclipse-style time-independent prior transformer: text features -> image-feature space.

The structure follows the unCLIP / Karlo / Kandinsky prior (diffusers' `PriorTransformer`) with the
diffusion parts removed, as in Eclipse and the CS-Aligner paper's Appendix F (10 layers, 16 heads of
width 32, dropout 0, no time embedding). The input sequence is::

    [text token 1 .. text token L,  pooled text,  learned 1 .. learned K]      (K = 3 by default)

every entry projected or learned at the inner width num_heads * head_dim, plus a learned position
embedding. The final state of the last learned token (diffusers' "prd" token) is layer-normed and
projected to the image width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner._validation import check_tensor
from csaligner.adapters.config import AdapterConfig
from csaligner.adapters.registry import Adapter, check_adapter_input, register_adapter

INIT_STD = 0.02
"""Std of the normal init of every Linear weight and learned embedding (GPT-2 / CLIP convention)."""


class _PriorBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        width = num_heads * head_dim
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        """Args:
            h: (B, S, E) residual stream.
            allowed: (B, 1, S, S) bool, True where query i may attend to key j.

        Returns:
            (B, S, E) updated residual stream.
        """
        b, s, e = h.shape
        # (B, S, 3E) -> 3 x (B, H, S, Dh)
        q, k, v = self.qkv(self.norm1(h)).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, S, Dh)
        h = h + self.drop(self.attn_out(attn.transpose(1, 2).reshape(b, s, e)))
        return h + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(h)))))


@register_adapter("prior")
class PriorTransformerAdapter(Adapter):
    """Time-independent prior transformer mapping text features (B, D_t) to image features (B, D_img).

    Positions: text tokens take positions 0..L-1 and the pooled text and learned tokens take the
    fixed positions max_text_tokens.., so right padding (with its mask) gives the same output as
    the unpadded sequence. Padded tokens are zeroed before projection and masked as attention keys,
    so their values (even NaN) never reach the output. Every position may attend to itself, so a
    padded query row is never fully masked.

    Initialisation: Linear weights and the learned / position embeddings ~ N(0, 0.02^2), biases 0,
    LayerNorms (1, 0); the two residual output projections of each block are scaled by
    1/sqrt(2 * num_layers) (GPT-2) so the residual stream keeps unit scale with depth. The output
    projection is *not* zero-initialised: the alignment losses L2-normalise its output, and a zero
    vector has no direction (its normalised gradient is ~1/eps).

    Args:
        in_dim: pooled text width D_t.
        out_dim: image-embedding width D_img (768 or 1280 in the paper).
        num_layers: transformer blocks.
        num_heads: attention heads.
        head_dim: width per head; inner width E = num_heads * head_dim.
        dropout: attention and residual dropout.
        num_learned_tokens: K learned tokens after the pooled text; the output is read off the last.
        max_text_tokens: longest accepted text-token sequence.
        token_dim: width of the text token states; None means in_dim.
        causal: causal attention (each position sees itself and earlier ones) instead of full.
    """

    settings = (
        "num_layers",
        "num_heads",
        "head_dim",
        "dropout",
        "num_learned_tokens",
        "max_text_tokens",
        "token_dim",
        "causal",
    )

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_layers: int = 10,
        num_heads: int = 16,
        head_dim: int = 32,
        dropout: float = 0.0,
        num_learned_tokens: int = 3,
        max_text_tokens: int = 77,
        token_dim: int | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        AdapterConfig(  # validates every size with the config's error messages
            "prior", in_dim, out_dim, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
            dropout=dropout, num_learned_tokens=num_learned_tokens, max_text_tokens=max_text_tokens,
            token_dim=token_dim, causal=causal,
        )  # fmt: skip
        width = num_heads * head_dim
        self.in_dim, self.out_dim, self.token_dim = in_dim, out_dim, token_dim or in_dim
        self.max_text_tokens, self.causal = max_text_tokens, causal
        self.text_proj = nn.Linear(in_dim, width)
        self.token_proj = nn.Linear(self.token_dim, width)
        self.learned_tokens = nn.Parameter(torch.empty(num_learned_tokens, width))  # (K, E)
        self.pos_embedding = nn.Parameter(torch.empty(max_text_tokens + 1 + num_learned_tokens, width))
        self.blocks = nn.ModuleList(_PriorBlock(num_heads, head_dim, dropout) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: AdapterConfig) -> PriorTransformerAdapter:
        """Build from the prior fields of `config` (num_layers, num_heads, head_dim, ...)."""
        return cls(
            config.in_dim,
            config.out_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            dropout=config.dropout,
            num_learned_tokens=config.num_learned_tokens,
            max_text_tokens=config.max_text_tokens,
            token_dim=config.token_dim,
            causal=config.causal,
        )

    def reset_parameters(self) -> None:
        """(Re)initialise every weight as documented in the class docstring."""
        if self.learned_tokens.is_meta:
            return  # shapes only (e.g. save_adapter's check); meta normal_ costs seconds on first use
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.learned_tokens, std=INIT_STD)
        nn.init.normal_(self.pos_embedding, std=INIT_STD)
        residual_std = INIT_STD / math.sqrt(2 * max(len(self.blocks), 1))
        for block in self.blocks:
            assert isinstance(block, _PriorBlock)
            nn.init.normal_(block.attn_out.weight, std=residual_std)
            nn.init.normal_(block.fc2.weight, std=residual_std)

    def forward(
        self,
        text: Tensor,
        text_tokens: Tensor | None = None,
        text_token_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Map pooled text (and optional token states) to the image-feature space.

        Args:
            text: (B, D_t) pooled text features.
            text_tokens: optional (B, L, D_tok) text token states, L <= max_text_tokens.
            text_token_mask: optional (B, L) bool (or 0/1, e.g. an attention mask), True for real tokens; None
                means no padding. A sample may have no real token: the pooled text still conditions it.
            **kwargs: ignored (e.g. image-side arguments), so every adapter is called the same way.

        Returns:
            (B, D_img) predicted image features.
        """
        check_adapter_input("text", text, self.in_dim)
        dtype = self.text_proj.weight.dtype
        pooled = self.text_proj(text.to(dtype))[:, None]  # (B, 1, E)
        b = pooled.shape[0]
        tail = torch.cat([pooled, self.learned_tokens.expand(b, -1, -1)], dim=1)  # (B, 1 + K, E)
        tail = tail + self.pos_embedding[self.max_text_tokens :]
        if text_tokens is None:
            if text_token_mask is not None:
                raise ValueError("text_token_mask was given without text_tokens; pass both or neither")
            seq, key_ok = tail, torch.ones(b, tail.shape[1], dtype=torch.bool, device=tail.device)
        else:
            mask = self._check_tokens(text_tokens, text_token_mask, b)  # (B, L)
            tokens = text_tokens.to(dtype).masked_fill(~mask[..., None], 0.0)  # padding zeroed: NaN-safe
            head = self.token_proj(tokens) + self.pos_embedding[: tokens.shape[1]]  # (B, L, E)
            seq = torch.cat([head, tail], dim=1)  # (B, S, E), S = L + 1 + K
            key_ok = torch.cat([mask, mask.new_ones(b, tail.shape[1])], dim=1)  # (B, S)
        h, allowed = seq, self._attention_mask(key_ok)  # (B, S, E), (B, 1, S, S)
        for block in self.blocks:
            h = block(h, allowed)
        return self.proj_out(self.norm_out(h[:, -1]))  # (B, D_img) from the last learned token

    def _attention_mask(self, key_ok: Tensor) -> Tensor:
        """(B, S) valid keys -> (B, 1, S, S) bool: key valid, causal if asked, diagonal always allowed."""
        s = key_ok.shape[1]
        allowed = key_ok[:, None, :].expand(-1, s, -1)  # (B, S_q, S_k)
        eye = torch.eye(s, dtype=torch.bool, device=key_ok.device)
        if self.causal:
            allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=key_ok.device).tril()
        return (allowed | eye)[:, None]

    def _check_tokens(self, tokens: Tensor, mask: Tensor | None, batch: int) -> Tensor:
        """Validate (B, L, D_tok) tokens and their mask; return a (B, L) bool mask."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or not tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"text_tokens must be a floating (B, L, {self.token_dim}) tensor, got {got}")
        b, length, d = tokens.shape
        if b != batch or d != self.token_dim:
            raise ValueError(
                f"text_tokens must have shape ({batch}, L, {self.token_dim}) to match text and token_dim, "
                f"got {tuple(tokens.shape)}"
            )
        if length > self.max_text_tokens:
            raise ValueError(
                f"text_tokens has {length} tokens but max_text_tokens={self.max_text_tokens}; "
                "truncate the tokens or build the adapter with a larger max_text_tokens"
            )
        if mask is None:
            return torch.ones(b, length, dtype=torch.bool, device=tokens.device)
        check_tensor("text_token_mask", mask, "token flags (True for real tokens)")
        if mask.shape != (b, length):
            raise ValueError(
                f"text_token_mask must have shape ({b}, {length}) to match text_tokens, got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            # as the token-level loss: an attention mask is 0/1; a 2 read as True, soft weights as 1
            raise ValueError(
                "text_token_mask must be bool or hold only 0 and 1 (True for real tokens), got other values"
            )
        return mask.to(device=tokens.device) != 0
