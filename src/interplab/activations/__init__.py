"""The activation store: harvested activations and their token ids, sharded on disk or any fsspec URL.

`StoreWriter` writes a store shard by shard (atomic, resumable, deterministic); `ActivationStore` reads it back,
verifying each shard's sha256, and streams shuffled token-level batches with bounded memory;
`interplab.activations.harvest.harvest(HarvestConfig(...))` fills one from a model run over a corpus.
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["HarvestConfig", "InspectConfig"],
        "store": ["ActivationStore", "CorruptShardError", "STORE_FORMAT"],
        "writer": ["StoreWriter"],
    },
)
