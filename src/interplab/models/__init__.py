"""Models with TransformerLens-named hook points: HF causal LMs, GGUF files, SmolLM2, and the toy transformer."""

from interplab.models.hooked import CacheResult, HookedModel, ModelInfo
from interplab.models.hooks import HookFn
from interplab.models.load import MODEL_SPEC_HELP, SMOLLM2, load_model
from interplab.models.nnsight_names import nnsight_path
from interplab.models.toy import ToyConfig, ToyTransformer

__all__ = [
    "CacheResult",
    "HookFn",
    "HookedModel",
    "MODEL_SPEC_HELP",
    "ModelInfo",
    "SMOLLM2",
    "ToyConfig",
    "ToyTransformer",
    "load_model",
    "nnsight_path",
]
