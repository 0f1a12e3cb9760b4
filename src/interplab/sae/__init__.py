"""Sparse dictionaries: ReLU/L1, TopK, BatchTopK, JumpReLU and Matryoshka SAEs, saved in the SAELens layout.

    from interplab.sae import SAEConfig, make_sae, load_sae
    sae = make_sae(SAEConfig(arch="topk", d_in=576, d_sae=9216, k=32))
    out = sae.training_forward(x, dead_mask=dead)   # TrainOutput(recon, loss, mse, ..., fired)
    sae.save("my_sae")                              # loadable by sae_lens.SAE.load_from_disk too
    f = load_sae("my_sae").encode(x)

    from interplab.sae import TrainConfig, train      # the trainer: sweeps, checkpoints, exact resume
    train(TrainConfig(store="acts", arch="topk", k=[16, 32], expansion=[16], out="saes"))

Every architecture shares `SparseAutoencoder` (base.py); top-k style training uses the sparse kernels of kernels.py.
Under torchrun the trainer is data-parallel (data_parallel.py), or latent-sharded with --shard-latents
(sharded.py, parallel_ops.py); `train_hooks` trains one run per hook, the hooks spread over the ranks (per_hook.py).
"""

from interplab.sae.base import SparseAutoencoder, TrainOutput, load_sae, make_sae
from interplab.sae.batchtopk import BatchTopKSAE
from interplab.sae.config import ARCHS, SAEConfig
from interplab.sae.jumprelu import JumpReLUSAE
from interplab.sae.matryoshka import MatryoshkaSAE
from interplab.sae.per_hook import train_hooks
from interplab.sae.relu import ReLUSAE
from interplab.sae.sharded import ShardedTopKSAE
from interplab.sae.topk import TopKSAE
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import TrainResult, train

__all__ = [
    "ARCHS",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SAEConfig",
    "ShardedTopKSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "TrainConfig",
    "TrainOutput",
    "TrainResult",
    "load_sae",
    "make_sae",
    "train",
    "train_hooks",
]
