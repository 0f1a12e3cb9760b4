"""The activation store: harvested activations and their token ids, sharded on disk or any fsspec URL.

`StoreWriter` writes a store shard by shard (atomic, resumable, deterministic); `ActivationStore` reads it back,
verifying each shard's sha256, and streams shuffled token-level batches with bounded memory.
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "store": ["ActivationStore", "CorruptShardError", "STORE_FORMAT"],
        "writer": ["StoreWriter"],
    },
)
