"""Reading weights: factored QK/OV circuits, SVD directions read through the vocabulary, outlier dimensions, logit
and tuned lens.

    from interplab.weights import attention_weights, ov_circuit, copying_score, full_ov_circuit
    attn = attention_weights(model, layer=3)          # W_Q, W_K, W_V [head, d_model, d_head], W_O, ...; norms folded
    U, S, V = ov_circuit(attn)[2].svd()               # head 2's W_V W_O, never formed densely

- extract.py: any model's weights in the TransformerLens layout (`x @ W`), norm scale folded in, GQA expanded.
- factored.py: `FactoredMatrix` (A @ B kept factored: product, transpose, heads by index, norm, SVD, eigenvalues).
- circuits.py: W_QK, W_OV, the full circuits E·QK·Eᵀ and E·OV·U, copying and composition scores.
- svd_read.py, svd_run.py: singular directions read through the unembedding, with interpretability proxies beside
  random directions (`interplab weights svd`).
- outliers.py, outlier_stats.py: massive activations and rogue dimensions beside a rotated basis
  (`interplab weights outliers`).
- lens.py, tuned_lens.py, lens_run.py: logit lens and tuned lens, KL per layer beside a context-free control
  (`interplab lens`).
"""

from interplab.weights.circuits import (
    composition_score,
    composition_scores,
    copying_score,
    full_ov_circuit,
    full_qk_circuit,
    ov_circuit,
    qk_circuit,
)
from interplab.weights.extract import (
    AttentionWeights,
    MLPWeights,
    attention_weights,
    embedding,
    mlp_weights,
    normalize,
    positional_embedding,
    unembedding,
)
from interplab.weights.factored import SVD, FactoredMatrix
from interplab.weights.lens import evaluate_lenses, layer_residuals, readout
from interplab.weights.svd_read import matrix_directions, read_directions, vocabulary
from interplab.weights.tuned_lens import TunedLens, train_tuned_lens

__all__ = [
    "SVD", "AttentionWeights", "FactoredMatrix", "MLPWeights", "TunedLens", "attention_weights", "composition_score",
    "composition_scores", "copying_score", "embedding", "evaluate_lenses", "full_ov_circuit", "full_qk_circuit",
    "layer_residuals", "matrix_directions", "mlp_weights", "normalize", "ov_circuit", "positional_embedding",
    "qk_circuit", "read_directions", "readout", "train_tuned_lens", "unembedding", "vocabulary",
]
