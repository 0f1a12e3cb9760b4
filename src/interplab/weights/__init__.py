"""Reading weights: factored QK/OV circuits, SVD directions read through the vocabulary, outlier dimensions.

    from interplab.weights import attention_weights, ov_circuit, copying_score, full_ov_circuit
    attn = attention_weights(model, layer=3)          # W_Q, W_K, W_V [head, d_model, d_head], W_O, ...; norms folded
    U, S, V = ov_circuit(attn)[2].svd()               # head 2's W_V W_O, never formed densely

- extract.py: any model's weights in the TransformerLens layout (`x @ W`), norm scale folded in, GQA expanded.
- factored.py: `FactoredMatrix` (A @ B kept factored: product, transpose, heads by index, norm, SVD, eigenvalues).
- circuits.py: W_QK, W_OV, the full circuits E·QK·Eᵀ and E·OV·U, copying and composition scores.
- svd_read.py, svd_run.py, svd_figures.py: singular directions read through the unembedding, with
  interpretability proxies beside random directions (`interplab weights svd`).
- outliers.py, outlier_stats.py, outlier_figures.py: massive activations and rogue dimensions beside a rotated
  basis (`interplab weights outliers`).
- configs.py: the configs of both commands (standard library only).
The logit and tuned lens read the residual stream through these weights; they live in `interplab.lens`.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["OutliersConfig", "SVDConfig"],
        "circuits": ["composition_score", "composition_scores", "copying_score", "full_ov_circuit", "full_qk_circuit", "ov_circuit", "qk_circuit"],
        "extract": ["AttentionWeights", "MLPWeights", "attention_weights", "embedding", "mlp_weights", "normalize", "positional_embedding", "unembedding"],
        "factored": ["FactoredMatrix", "SVD"],
        "svd_read": ["matrix_directions", "read_directions", "vocabulary"],
    },
)
