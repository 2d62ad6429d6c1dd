"""csaligner.decode: aligned embeddings -> images with diffusers unCLIP decoders, FID and retrieval previews.

Importing this package needs only the core install; diffusers, transformers and Pillow are imported
by the functions that use them, which raise `MissingDependencyError` naming `pip install 'csaligner[decode]'`.
"""

from csaligner.decode._deps import MissingDependencyError
from csaligner.decode.unclip import (
    DECODERS,
    DecoderSpec,
    generate,
    load_decoder,
    load_image_encoder,
    mean_embed_norm,
    rescale_embeds,
    zero_image_embeds,
)

__all__ = [
    "DECODERS",
    "DecoderSpec",
    "MissingDependencyError",
    "generate",
    "load_decoder",
    "load_image_encoder",
    "mean_embed_norm",
    "rescale_embeds",
    "zero_image_embeds",
]
