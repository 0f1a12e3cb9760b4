"""Sparse dictionaries: ReLU/L1, TopK, BatchTopK, JumpReLU and Matryoshka SAEs, saved in the SAELens layout.

    from interplab.sae import SAEConfig, make_sae, load_sae
    sae = make_sae(SAEConfig(arch="topk", d_in=576, d_sae=9216, k=32))
    out = sae.training_forward(x, dead_mask=dead)   # TrainOutput(recon, loss, mse, ..., fired)
    sae.save("my_sae")                              # loadable by sae_lens.SAE.load_from_disk too
    f = load_sae("my_sae").encode(x)

    from interplab.sae import TrainConfig, train      # the trainer: sweeps, checkpoints, exact resume
    train(TrainConfig(store="acts", arch="topk", k=[16, 32], expansion=[16], out="saes"))
    train(TrainConfig(store="acts", hook="blocks.6.mlp.hook_in", target="blocks.6.hook_mlp_out", out="tcs"))
    tc = load_transcoder("tcs/topk-k32-x16")           # a Transcoder (SAELens or sparsify transcoder layout)

Every architecture shares `SparseAutoencoder` (base.py); top-k style training uses the sparse kernels of kernels.py.
Under torchrun the trainer is data-parallel (data_parallel.py), or latent-sharded with --shard-latents
(sharded.py, parallel_ops.py); `train_hooks` trains one run per hook, the hooks spread over the ranks (per_hook.py).
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "base": ["SparseAutoencoder", "TrainOutput"],
        "batchtopk": ["BatchTopKSAE"],
        "config": ["ARCHS", "SAEConfig"],
        "files": ["load_sae"],
        "jumprelu": ["JumpReLUSAE"],
        "loading": ["SAEWithModel", "load_sae_and_model"],
        "matryoshka": ["MatryoshkaSAE"],
        "per_hook": ["train_hooks"],
        "registry": ["make_sae"],
        "relu": ["ReLUSAE"],
        "sharded": ["ShardedTopKSAE"],
        "topk": ["TopKSAE"],
        "train_config": ["TrainConfig"],
        "trainer": ["TrainResult", "train"],
        "transcoder": ["Transcoder", "TranscoderSet"],
        "transcoder_files": ["load_transcoder", "load_transcoder_set", "save_transcoder_set"],
    },
)
