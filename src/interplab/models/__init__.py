"""Models with TransformerLens-named hook points: HF causal LMs, GGUF files, SmolLM2, the toy transformer, and its
table-embedding variant."""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "hooked": ["CacheResult", "HookedModel", "ModelInfo"],
        "hooks": ["HookFn"],
        "load": ["MODEL_SPEC_HELP", "SMOLLM2", "load_model"],
        "nnsight_names": ["nnsight_path"],
        "table_embed": ["TableEmbedConfig", "TableEmbedTransformer", "prefix_rows"],
        "tokens": ["ByteTokenizer", "token_text"],
        "toy": ["ToyConfig", "ToyTransformer"],
    },
)
