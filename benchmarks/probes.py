"""Probes where the answer is known, then k-sparse probing on SmolLM2-135M's MLP neurons.

    python benchmarks/probes.py [--layer L] [--max-examples N] [--out DIR]

1. Planted direction (ground-truth lab): x from the default sparse generator (512 unit features in d = 256, 5 active
   on average); label = 1[x·f0 > 0.3], a linear function of feature 0's direction f0. Difference of means and the
   logistic probe must find f0 (cosine), beside their shuffled-label controls. The same for the latent label
   "feature 0 is active" is reported as latent_* (not a linear function of x).
2. Planted neurons: x ~ N(0, 1) in d = 512 "neurons", label = 1[x_7 + x_42 > 0]; k-sparse probing (mean difference
   and f-statistic rankings) must rank neurons 7 and 42 first (recall of the planted pair in the top 2).
3. SmolLM2-135M: every vocabulary token (a seeded subsample), label = its text starts with an uppercase letter, read
   alone after BOS at blocks.L.mlp.hook_post (1,536 neurons); k-sparse probing for k = 1 ... 64 with the rotated and
   shuffled-label controls. The fit time is measured (activations collected once, outside the timing).

Last line: {"bench": "probes", "diff_means_cosine", "logistic_cosine", "ksparse_planted_recall", "shuffled_label_f1",
"ksparse_fit_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def planted_direction(n: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Cosines of the probe directions with feature 0's planted direction f0, for two labels: a linear function of
    the data, 1[x·f0 > 0.3] (the headline check), and the latent "feature 0 is active" (a contrast: under
    superposition the best separating direction for a latent tilts away from f0 to cancel the other features)."""
    from interplab.probes.linear import diff_of_means, logistic_probe
    from interplab.synth.specs import make_generator

    gen = make_generator("sparse")
    batch = gen.sample(n, torch.Generator().manual_seed(seed))
    truth = gen.features[0]
    out: dict[str, float] = {}
    for name, labels in (("", (batch.x @ truth > 0.3).long()), ("latent_", batch.active[:, 0].long())):
        dom = diff_of_means(batch.x, labels, seed=seed)
        lr = logistic_probe(batch.x, labels, seed=seed)
        out.update({f"{name}diff_means_cosine": float(dom.direction @ truth),
                    f"{name}logistic_cosine": float(lr.direction @ truth),
                    f"{name}diff_means_auc": dom.scores["auc"],
                    f"{name}diff_means_shuffled_auc": dom.controls["shuffled"]["auc"].mean,
                    f"{name}logistic_auc": lr.scores["auc"],
                    f"{name}logistic_shuffled_auc": lr.controls["shuffled"]["auc"].mean,
                    f"{name}positives": int(labels.sum())})
    return out


def planted_neurons(n: int = 4000, d: int = 512, seed: int = 0) -> dict[str, float]:
    from interplab.probes.ksparse import ksparse_probe, planted_recall

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    labels = (x[:, 7] + x[:, 42] > 0).long()
    result = ksparse_probe(x, labels, ks=[1, 2, 4], methods=("mean_diff", "f_stat"), shuffles=1, seed=seed)
    recall = planted_recall(result, [7, 42], 2)
    return {"ksparse_planted_recall": min(recall.values()), "planted_recall_by_method": recall,
            "planted_f1_k2": result.score("plain", "f_stat", 2), "planted_f1_k2_rotated": result.score(
                "rotated", "f_stat", 2)}


def smollm2_sweep(layer: int, max_examples: int, out: str) -> dict[str, float]:
    from interplab.models import load_model
    from interplab.probes.data import cached_activations
    from interplab.probes.ksparse import ksparse_probe
    from interplab.probes.probe_run import ProbeConfig, load_data, subsample

    model = load_model("smollm2-135m")
    cfg = ProbeConfig(hook=f"blocks.{layer}.mlp.hook_post", max_examples=max_examples)
    data = subsample(load_data(cfg, model.tokenizer), cfg.max_examples, cfg.seed)
    acts = cached_activations(f"{out}/acts", model, data, cfg.hook, "last")
    start = time.perf_counter()
    result = ksparse_probe(acts.acts, acts.labels, methods=("mean_diff", "f_stat"), shuffles=3, seed=0)
    fit_s = time.perf_counter() - start
    curve = {k: round(result.score("plain", "f_stat", k), 4) for k in result.ks}
    rotated = {k: round(result.score("rotated", "f_stat", k), 4) for k in result.ks}
    shuffled = {k: round(result.score("shuffled", "f_stat", k), 4) for k in result.ks}
    return {"ksparse_fit_s": round(fit_s, 1), "shuffled_label_f1": max(shuffled.values()),
            "smollm2_hook": cfg.hook, "smollm2_examples": len(acts.labels),
            "smollm2_positive": int(acts.labels.sum()), "f1_by_k": curve, "rotated_f1_by_k": rotated,
            "shuffled_f1_by_k": shuffled, "dense_f1": round(result.score("plain", "all", result.d), 4),
            "chance_f1": round(result.chance_f1, 4), "top_neurons": result.rankings["f_stat"][:8].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3, help="SmolLM2 block whose MLP neurons are probed")
    parser.add_argument("--max-examples", type=int, default=6000, help="vocabulary tokens probed (subsample)")
    parser.add_argument("--out", default=None, help="folder for the cached activations (default: temporary)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="interplab-probes-")
    start = time.perf_counter()
    figures: dict[str, object] = {"bench": "probes"}
    figures.update(planted_direction())
    figures.update(planted_neurons())
    figures.update(smollm2_sweep(args.layer, args.max_examples, out))
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
