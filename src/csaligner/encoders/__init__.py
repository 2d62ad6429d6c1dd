"""Frozen backbones behind one Protocol, chosen by registry name (`get_encoder("minilm")`).

Heavy libraries (transformers, peft, open_clip) are imported only when an encoder needs them.
"""

from csaligner.encoders.base import (
    EncoderOutput,
    EncoderUnavailableError,
    FrozenEncoder,
    ImagePreprocess,
    Modality,
    encoder_name,
    hash_files,
    mean_pool,
)
from csaligner.encoders.lora import (
    LoraTextConfig,
    LoraTextEncoder,
    apply_lora,
    load_lora_state_dict,
    lora_minilm,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from csaligner.encoders.registry import (
    encoder_spec,
    get_encoder,
    list_encoders,
    register_encoder,
    unregister_encoder,
)

__all__ = [
    "EncoderOutput",
    "EncoderUnavailableError",
    "FrozenEncoder",
    "ImagePreprocess",
    "LoraTextConfig",
    "LoraTextEncoder",
    "Modality",
    "apply_lora",
    "encoder_name",
    "encoder_spec",
    "get_encoder",
    "hash_files",
    "list_encoders",
    "load_lora_state_dict",
    "lora_minilm",
    "lora_state_dict",
    "mean_pool",
    "merge_lora",
    "register_encoder",
    "unmerge_lora",
    "unregister_encoder",
]
