"""Evaluation: reconstruction, sparsity and downstream metrics, and the controls that give them meaning.

    from interplab.evals import reconstruction_metrics, kl_per_token, epsilon_random, ratio_with_sem
    x_hat = sae(x)
    reconstruction_metrics(x, x_hat)                          # {"mse", "explained_variance", "cossim", ...}
    kl_sae = kl_per_token(clean_logits, logits_with(x_hat))   # [batch pos]
    kl_eps = kl_per_token(clean_logits, logits_with(epsilon_random(x, x_hat, gen)))
    ratio_with_sem(kl_sae, kl_eps)                            # MeanSEM(mean=kl_ratio, sem=...)
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "controls": ["covariance_matched_error", "epsilon_random", "error_covariance_factor", "mean_ablation", "random_unit_vectors", "sae_norm_patch", "sae_output_at_original_norm", "zero_ablation"],
        "metrics": ["DENSE_THRESHOLD", "FiringCounts", "MeanSEM", "ce_loss_per_token", "ce_loss_recovered", "density_histogram", "firing_counts", "kl_per_token", "mean_and_sem", "ratio_with_sem", "reconstruction_metrics", "sparsity_metrics"],
    },
)
