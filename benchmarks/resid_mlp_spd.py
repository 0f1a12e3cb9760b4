"""SPD on the compressed-computation residual MLP against the SPD paper's known answer, on this CPU.

    python benchmarks/resid_mlp_spd.py [--toy resid-mlp-1] [--root DIR] [--layers in|both] [--steps N]
                                       [--batch-size B] [--importance-coeff X] [--lr X] [--no-controls]

Known answer (Bushnaq et al. 2025, §4.3): W_in of the 1-layer residual MLP splits into 100 subcomponents, one per
input feature: on the one-hot input of feature i exactly one W_in subcomponent is important, and that subcomponent is
important for no other feature. The truth (interplab.decompose.resid_mlp) is the rank-1 mechanism (W_in e_i) d_iᵀ of
each feature, so MMCS/ML2R are scored against it. `--layers both` also decomposes mlp_out, as the reference code
does (it has no rank-1 truth here: only its live count is reported).

Settings: interplab.decompose.presets (the reference's C = 100 and importance-minimality p = 2, on a shortened CPU
schedule, 4000 steps of 256: see there) unless given; `--steps 1500` fits 10 minutes with both controls at load 11.
One `interplab decompose` run folder under --root (a rerun reports a finished run), with its random-model control
and random-basis control. Prints what it measures; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from interplab.decompose.configs import DecomposeConfig
from interplab.decompose.run import run_decompose

LAYERS = {"in": ["layers.{i}.mlp_in"], "both": ["layers.{i}.mlp_in", "layers.{i}.mlp_out"]}


def one_per_feature(ci: list[list[float]], threshold: float) -> dict[str, object]:
    """From the importance matrix on one-hot inputs [features, C]: how many features have exactly one important
    subcomponent, how many important subcomponents serve exactly one feature, and whether the two form a bijection
    (every feature exactly one, all distinct)."""
    imp = torch.tensor(ci) > threshold
    per_feature, per_comp = imp.sum(1), imp.sum(0)
    single = per_feature == 1
    owners = imp[single].float().argmax(1)
    return {"features_with_exactly_one": int(single.sum()),
            "features_with_none": int((per_feature == 0).sum()),
            "mean_important_per_feature": float(per_feature.float().mean()),
            "subcomponents_important_for_one_feature": int((per_comp == 1).sum()),
            "subcomponents_important_for_several": int((per_comp > 1).sum()),
            "bijection": bool(single.all() and owners.unique().numel() == imp.shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", default="resid-mlp-1", choices=["resid-mlp-1", "resid-mlp-2"])
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "interplab-resid-mlp-spd"))
    parser.add_argument("--layers", default="in", choices=sorted(LAYERS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--importance-coeff", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-controls", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_layers = int(args.toy.rsplit("-", 1)[1])
    layers = [p.format(i=i) for i in range(n_layers) for p in LAYERS[args.layers]]
    cfg = DecomposeConfig(toy=args.toy, layers=layers, steps=args.steps, batch_size=args.batch_size,
                          importance_coeff=args.importance_coeff, lr=args.lr, seed=args.seed,
                          controls=not args.no_controls, progress=True,
                          out=str(Path(args.root) / f"{args.toy}-{args.layers}-s{args.seed}"))
    start = time.perf_counter()
    metrics = run_decompose(cfg)
    wall = time.perf_counter() - start
    scores, random_model = metrics["scores"], metrics.get("random_model")
    w_in = scores["layers"]["layers.0.mlp_in"]
    bij = {name: one_per_feature(layer["ci_one_hot"], cfg.live_threshold)
           for name, layer in scores["layers"].items() if name.endswith("mlp_in")}
    print(f"SPD on {args.toy} ({metrics['settings']}): {wall:.0f} s wall, load {os.getloadavg()[0]:.1f}")
    for name, layer in scores["layers"].items():
        rm = random_model["layers"][name] if random_model else {}
        print(f"  {name}: live {layer['live']} (true {layer.get('n_true')}), MMCS {layer.get('mmcs')}, ML2R "
              f"{layer.get('ml2r')}; random basis MMCS {layer.get('random_basis_mmcs')}; random model MMCS "
              f"{rm.get('mmcs')}, live {rm.get('live')}; one-hot importance: {bij.get(name)}")
    print(f"  output MSE to the target: {scores['losses']}")
    print(json.dumps({
        "bench": "resid_mlp_spd", "toy": args.toy, "layers": layers, "settings": metrics["settings"],
        "live_w_in": w_in["live"], "one_per_feature": bij["layers.0.mlp_in"]["bijection"],
        "one_hot_w_in": bij["layers.0.mlp_in"], "mmcs": w_in["mmcs"], "ml2r": w_in["ml2r"],
        "live": {n: v["live"] for n, v in scores["layers"].items()},
        "random_basis_mmcs": w_in["random_basis_mmcs"],
        "random_model_mmcs": random_model["layers"]["layers.0.mlp_in"]["mmcs"] if random_model else None,
        "random_model_live_w_in": random_model["layers"]["layers.0.mlp_in"]["live"] if random_model else None,
        "losses": scores["losses"], "random_model_losses": random_model["losses"] if random_model else None,
        "wall_s": round(wall, 1), "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
