"""csaligner.decode: aligned embeddings -> images with diffusers unCLIP decoders, FID and retrieval previews.

Importing this package needs only the core install; diffusers, transformers and Pillow are imported
by the functions that use them, which raise `MissingDependencyError` naming `pip install 'csaligner[decode]'`.
"""

from csaligner.decode._deps import MissingDependencyError
from csaligner.decode.fid import FIDResult, compute_fid, fid_from_features, frechet_distance, gaussian_stats
from csaligner.decode.fid_features import (
    FEATURE_EXTRACTORS,
    ImageFeatureExtractor,
    build_feature_extractor,
    register_feature_extractor,
)
from csaligner.decode.preview import render_preview, retrieve_topk
from csaligner.decode.unclip import (
    DECODERS,
    DecoderSpec,
    check_decoder_folder,
    generate,
    load_decoder,
    load_image_encoder,
    mean_embed_norm,
    rescale_embeds,
    zero_image_embeds,
)

__all__ = [
    "DECODERS",
    "FEATURE_EXTRACTORS",
    "DecoderSpec",
    "FIDResult",
    "ImageFeatureExtractor",
    "MissingDependencyError",
    "build_feature_extractor",
    "check_decoder_folder",
    "compute_fid",
    "fid_from_features",
    "frechet_distance",
    "gaussian_stats",
    "generate",
    "load_decoder",
    "load_image_encoder",
    "mean_embed_norm",
    "register_feature_extractor",
    "render_preview",
    "rescale_embeds",
    "retrieve_topk",
    "zero_image_embeds",
]
