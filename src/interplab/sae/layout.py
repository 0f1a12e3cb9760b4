"""Names of the two dictionary file layouts (described in files.py): their files and their architecture names.

Shared by saving (`SparseAutoencoder.save`, base.py) and loading (files.py), so that both read from one place.
"""

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
FORMAT_VERSION = 1
"""Version of our own entry ("interplab") in cfg.json."""
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens config version our cfg.json follows (older versions make SAELens rewrite the config)."""

SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu"}
"""Our architecture -> the SAELens architecture it is saved as (batchtopk/matryoshka: the JumpReLU they are at
inference)."""
FROM_SAELENS_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                     "matryoshka_batchtopk": "matryoshka"}
"""A SAELens architecture -> ours, for folders SAELens wrote."""

SAELENS_TRANSCODER_ARCH = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                           ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}
"""(Our inference architecture, has W_skip) -> SAELens's transcoder architecture (batchtopk and matryoshka transcoders
are saved as the JumpReLU they are at inference; SAELens has no TopK transcoder: those go to the sparsify layout)."""
FROM_SAELENS_TRANSCODER_ARCH = {"transcoder": "standard", "skip_transcoder": "standard",
                                "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
"""A SAELens transcoder architecture -> the SAELens SAE architecture its encoder and decoder compute."""
