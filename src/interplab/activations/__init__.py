"""The activation store: harvested activations and their token ids, sharded on disk or any fsspec URL.

`StoreWriter` writes a store shard by shard (atomic, resumable, deterministic); `ActivationStore` reads it back,
verifying each shard's sha256, and streams shuffled token-level batches with bounded memory.
"""

from interplab.activations.store import STORE_FORMAT, ActivationStore, CorruptShardError
from interplab.activations.writer import StoreWriter

__all__ = ["ActivationStore", "CorruptShardError", "STORE_FORMAT", "StoreWriter"]
