"""Apply a finished run's adapters to features, for evaluation.

A run trained with `data.use_tokens=true` and a text adapter that reads token states (the prior)
maps a caption from its pooled feature *and* its word tokens; fed the pooled feature alone it
gives different, much worse embeddings. So every path here either passes the tokens or refuses
(`text_adapter_reads_tokens`, `apply_text_adapter`); none falls back to pooled-only silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csaligner.data.features import PairedFeatures
from csaligner.train.model import LoadedAdapters, load_adapters, run_encoders

if TYPE_CHECKING:
    from csaligner.encoders import EncoderOutput

TOKENS_FIX = "encode the eval text cache with --tokens (csalign encode --encoder ... --tokens)"
"""What to do when a token-conditioned run is given text features without tokens."""


def tokens_fix(run_dir: str) -> str:
    """`TOKENS_FIX` naming the run's own text encoder where encoders.json records it ("--encoder minilm")."""
    spec = run_encoders(run_dir).get("text_encoder_spec")
    return TOKENS_FIX.replace("--encoder ...", f"--encoder {spec} --data DATA --out DIR") if spec else TOKENS_FIX


@torch.no_grad()
def embed(
    features: PairedFeatures,
    run_dir: str,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Map features through the adapters saved in `run_dir`.

    Args:
        features: image (N, D_img) and text (M, D_txt) features from the same encoders the run used,
            with text tokens when the run's text adapter reads them.
        run_dir: a training run directory holding image_adapter.safetensors and text_adapter.safetensors.
        batch_size: rows per adapter call.
        device: where to run the adapters.
        normalize: L2-normalise the outputs (what retrieval and the loss use).

    Returns:
        (image_emb (N, D), text_emb (M, D)) float32 on CPU.

    Raises:
        ValueError: the run's text adapter reads text tokens and `features` has none.
    """
    adapters = load_adapters(run_dir, device)
    image = apply_adapter(adapters.image, features.image, batch_size=batch_size, device=device)
    text = apply_text_adapter(
        adapters,
        run_dir,
        features.text,
        features.text_tokens,
        features.text_token_mask,
        fix=tokens_fix(run_dir),
        batch_size=batch_size,
        device=device,
    )
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return image, text


def text_adapter_reads_tokens(adapters: LoadedAdapters) -> bool:
    """True when the run fed text tokens to its text adapter and that adapter reads them.

    A run with data.use_tokens=true but a pooled-only text adapter (mlp, linear: they accept and
    ignore `text_tokens`) maps pooled features exactly as it was trained, so it needs no tokens.
    """
    from csaligner.adapters import reads_text_tokens

    return adapters.uses_tokens and reads_text_tokens(adapters.text)


@torch.no_grad()
def apply_text_adapter(
    adapters: LoadedAdapters,
    run_dir: object,
    text: Tensor,
    tokens: Tensor | None,
    token_mask: Tensor | None,
    *,
    fix: str,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
) -> Tensor:
    """(M, D_txt) pooled text (+ (M, L, D_tok) tokens) -> (M, D) unnormalised, as the run was trained.

    Tokens are passed when the text adapter reads them and dropped otherwise (pooled-only adapters
    ignore them anyway). `fix` is the advice in the error raised when they are needed but missing.
    """
    if not text_adapter_reads_tokens(adapters):
        return apply_adapter(adapters.text, text, batch_size=batch_size, device=device)
    if tokens is None:
        raise ValueError(
            f"run {run_dir} was trained with text tokens (data.use_tokens=true, text adapter "
            f"{adapters.configs['text'].kind!r}) but the text features given have none, and without them "
            f"its text embeddings are not the ones it was trained to produce; {fix}"
        )
    return apply_adapter(adapters.text, text, tokens, token_mask, batch_size=batch_size, device=device)


def encode_texts(
    texts: Sequence[str], text_encoder: str, *, tokens: bool = False, expect_id: str | None = None
) -> EncoderOutput:
    """Raw texts (prompts) through a registered text encoder: float32 pooled (P, D), tokens (P, L, D_tok), mask.

    Args:
        texts: P strings.
        text_encoder: a `get_encoder` name ("minilm", "hf-text:/abs/dir", ...).
        tokens: also return token states and their mask.
        expect_id: the encoder id the features this must match were made with (a run's record);
            None skips the check.

    Raises:
        ValueError: the encoder loads other weights than `expect_id`, or `tokens` was asked for and
            the encoder returned none.
    """
    from csaligner.encoders import EncoderOutput, get_encoder

    encoder = get_encoder(text_encoder)
    if expect_id and encoder.id != expect_id:  # same name, other weights: the adapters would map nonsense
        raise ValueError(
            f"text encoder {text_encoder!r} now loads {encoder.id!r}, but the run was trained on features of "
            f"{expect_id!r}: its weights changed since (another package version or folder). Install or point at "
            "the weights the run was trained with"
        )
    with torch.inference_mode():
        out = encoder.encode_texts(list(texts), tokens=tokens)
    if tokens and out.tokens is None:
        raise ValueError(
            f"text encoder {text_encoder!r} returned no token states; a run whose text adapter reads tokens "
            "needs the encoder it was trained on, which gives them"
        )
    token_states = None if out.tokens is None else out.tokens.float()
    return EncoderOutput(out.pooled.float(), token_states, out.mask)


def embed_texts(
    adapters: LoadedAdapters,
    run_dir: object,
    texts: Sequence[str],
    text_encoder: str,
    *,
    batch_size: int = 4096,
    expect_id: str | None = None,
) -> Tensor:
    """(P, D) unnormalised text-adapter outputs of raw texts, float32 on CPU.

    The texts are encoded with `text_encoder` (the one the run was trained on), with token states
    when the run's text adapter reads them, so prompts are mapped the way training captions were.
    """
    encoded = encode_texts(texts, text_encoder, tokens=text_adapter_reads_tokens(adapters), expect_id=expect_id)
    fix = f"encode the texts with {text_encoder!r} and tokens=True"
    return apply_text_adapter(
        adapters, run_dir, encoded.pooled, encoded.tokens, encoded.mask, fix=fix, batch_size=batch_size
    )


@torch.no_grad()
def apply_adapter(
    adapter: nn.Module,
    x: Tensor,
    tokens: Tensor | None = None,
    token_mask: Tensor | None = None,
    *,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
) -> Tensor:
    """adapter(x) in chunks of `batch_size` rows; x (N, D_in) -> (N, D_out) float32 on CPU."""
    was_training = adapter.training
    adapter.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        kwargs: dict[str, Tensor | None] = {}
        if tokens is not None:
            kwargs["text_tokens"] = tokens[rows].to(device)
            kwargs["text_token_mask"] = None if token_mask is None else token_mask[rows].to(device)
        out.append(adapter(x[rows].to(device).float(), **kwargs).float().cpu())
    adapter.train(was_training)
    return torch.cat(out)
