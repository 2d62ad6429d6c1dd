"""Training adapters on cached features: configs, the loop, checkpoints, data parallel helpers.

>>> from csaligner.train import load_config, train, embed
>>> result = train(load_config("configs/flickr8k_cs_aligner.yaml", ["train.epochs=2"]))
>>> image_emb, text_emb = embed(features, result.run_dir)
"""

from csaligner.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from csaligner.train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from csaligner.train.distributed import all_gather_with_grad
from csaligner.train.embed import apply_adapter, embed
from csaligner.train.loop import RunResult, train
from csaligner.train.overrides import dump_yaml, load_config

__all__ = [
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "all_gather_with_grad",
    "apply_adapter",
    "dump_yaml",
    "embed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "train",
]
