"""Generator 1 (sparse features in superposition, G=512, d=256, 5 active) against every SAE architecture.

    python benchmarks/synthetic.py [--tokens N] [--out DIR]

Runs `interplab synth bench` on the default `sparse` generator only (every architecture at width 4x = 1,024
latents, two sparsity settings each, 1M samples) and prints, as its last line, the best configuration beside its
random-dictionary and PCA controls, all measured in this run:
{"bench": "synthetic", "best_arch", "best_mmcs", "best_recovery_at_0_9", "random_mmcs", "pca_mmcs", "wall_s"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from interplab.synth.bench import SynthBenchConfig, format_table, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=SynthBenchConfig.tokens, help="training samples per SAE")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="interplab-synth-bench-")
    result = run_bench(SynthBenchConfig(generators=["sparse"], tokens=args.tokens, out=out))
    print(format_table(result))
    best = result["summary"]["best"]["sparse/features"]
    print(json.dumps({"bench": "synthetic", "best_arch": best["arch"], "best_sae": best["sae"],
                      "best_mmcs": round(best["mmcs"], 4), "best_recovery_at_0_9": round(best["recovery"], 4),
                      "random_mmcs": round(best["random_mmcs"], 4), "pca_mmcs": round(best["pca_mmcs"], 4),
                      "wall_s": round(result["wall_s"], 1)}))


if __name__ == "__main__":
    main()
