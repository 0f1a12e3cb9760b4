"""Directions and probes with controls; steering and ablation.

- data.py: labelled datasets (CSV/JSONL files, a function over texts, the vocabulary) and one activation per example
  from any hook (a position or the mean), cached for reuse.
- linear.py: difference-of-means and logistic-regression probes, each score beside a shuffled-label and a
  random-direction control; the projection histogram.
- ksparse.py: k-sparse probing (Gurnee et al. 2023) with four neuron rankings, beside the random-rotation and
  shuffled-label controls.
- steer.py: directional ablation and activation addition as hooks; orthogonalize.py: the same ablation written into
  the weights of a new HF model folder.
- refusal.py, refusal_select.py: the refusal direction (Arditi et al. 2024), `interplab refusal`.
- probe_run.py: `interplab probe`; configs.py: the configs of both commands (standard library only).
"""
import lazy_loader
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["ProbeConfig", "RefusalConfig"],
        "data": ["LabelledActivations", "LabelledTexts", "cached_activations", "collect_activations", "label_texts", "load_labelled", "vocabulary_dataset"],
        "ksparse": ["KSparseResult", "KSparseRow", "ksparse_curve", "ksparse_probe", "planted_recall"],
        "linear": ["Control", "DiffMeansResult", "LogisticResult", "diff_of_means", "logistic_probe", "projection_histogram", "roc_auc"],
        "orthogonalize": ["orthogonalize_weights", "save_orthogonalized"],
        "probe_run": ["run_probe"],
        "refusal": ["run_refusal"],
        "steer": ["ablation_hooks", "addition_hooks", "directional_component"],
    },
)
