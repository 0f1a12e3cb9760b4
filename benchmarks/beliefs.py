"""Belief-state geometry on Mess3(0.05, 0.85) (Shai et al. 2024): train, regress, figures, against the paper's MSE.

    python benchmarks/beliefs.py [--tokens N] [--out DIR] [--all-checkpoints]

Trains the paper's model (4 layers, d_model 64, 1 head, ctx 10) on 3.2M tokens with `interplab beliefs train`'s
defaults, then regresses the belief states on every residual stream and their concatenation over all 3^10 × 10 =
590,490 points (`interplab beliefs regress`) at 64k, 640k and 3.2M tokens (the paper's final-layer MSE there: 0.0118,
0.0084, 0.00248; its shuffle control: 0.111), with 5-fold CV and 20 shuffles at the end. Prints the summaries, then as
its last line: {"bench": "beliefs", "tokens", "final_mse", "shuffle_mse", "r2", "wall_s", ...} (final layer =
blocks.3.hook_resid_post; wall_s covers training, regression and figures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig
from interplab.beliefs.regress import run_regress
from interplab.beliefs.regress import format_summary as regress_summary
from interplab.beliefs.train import saved_checkpoints, train_beliefs
from interplab.beliefs.train import format_summary as train_summary

PAPER_MSE = {64_000: 0.0118, 640_000: 0.0084, 3_200_000: 0.00248}
"""Shai et al. (2024), Mess3, final layer: regression MSE at these training-token counts."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=3_200_000, help="training tokens")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--all-checkpoints", action="store_true",
                        help="regress at every saved checkpoint, not only 64k, 640k and the last (slower)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="interplab-beliefs-")
    start = time.perf_counter()
    trained = train_beliefs(BeliefTrainConfig(tokens=args.tokens, out=out))
    print(train_summary(trained))
    saved = [t for t, _ in saved_checkpoints(out)]
    chosen = saved if args.all_checkpoints else [t for t in saved if t in PAPER_MSE or t == saved[-1]]
    result = run_regress(BeliefRegressConfig(run=out, checkpoint=chosen))
    print(regress_summary(result))
    wall = time.perf_counter() - start
    head = result["final"][result["headline"]]
    gap = trained.metrics["final"]["gap"]
    at = {row["tokens"]: round(row["targets"][result["headline"]]["mse"], 6) for row in result["curve"]}
    print(json.dumps({"bench": "beliefs", "tokens": trained.metrics["tokens"], "final_mse": round(head["mse"], 6),
                      "shuffle_mse": round(head["shuffle_mse_mean"], 4), "r2": round(head["r2"], 5),
                      "wall_s": round(wall, 1), "cv_mse": round(head["cv_mse"], 6), "p_value": head["p_value"],
                      "concat_mse": round(result["final"]["concat"]["mse"], 6), "mse_at_tokens": at,
                      "paper_mse_at_tokens": PAPER_MSE, "train_s": round(trained.seconds, 1),
                      "mean_loss_gap_nats": round(sum(gap) / len(gap), 6),
                      "out": out}))


if __name__ == "__main__":
    main()
