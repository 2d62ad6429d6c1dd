"""Manifests, data sets, unpaired pools, the feature cache, and the loaders training/eval call.

csalign encode --encoder efficientnet-lite0 --data flickr8k:train --out cache/f8k-img
csalign encode --encoder minilm --data flickr8k:train --out cache/f8k-txt
feats = load_paired_features("cache/f8k-img", "cache/f8k-txt")   # -> PairedFeatures
"""

from csaligner.data.cache import CacheIntegrityError, CacheKeyError, FeatureCache
from csaligner.data.datasets import (
    data_root,
    read_class_folders,
    read_coco_captions,
    read_flickr8k,
    resolve_dataset,
)
from csaligner.data.delimited import CsvQuotedTsvWarning, unquote_tsv
from csaligner.data.encode import EncodeConfig, encode_manifest
from csaligner.data.features import PairedFeatures
from csaligner.data.images import BadImage, BadImageError, scan_images
from csaligner.data.loading import load_class_features, load_paired_features
from csaligner.data.manifest import ImageTextManifest, read_manifest, write_manifest
from csaligner.data.unpaired import concat_manifests, image_pool, split_paired_unpaired, text_pool

__all__ = [
    "BadImage",
    "BadImageError",
    "CacheIntegrityError",
    "CacheKeyError",
    "CsvQuotedTsvWarning",
    "EncodeConfig",
    "FeatureCache",
    "ImageTextManifest",
    "PairedFeatures",
    "concat_manifests",
    "data_root",
    "encode_manifest",
    "image_pool",
    "load_class_features",
    "load_paired_features",
    "read_class_folders",
    "read_coco_captions",
    "read_flickr8k",
    "read_manifest",
    "resolve_dataset",
    "scan_images",
    "split_paired_unpaired",
    "text_pool",
    "unquote_tsv",
    "write_manifest",
]
