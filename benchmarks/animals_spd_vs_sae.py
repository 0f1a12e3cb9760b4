"""SPD vs SAEs on animals-facts: which one recovers the units the computation uses (the animals)?

    python benchmarks/animals_spd_vs_sae.py [--root DIR] [--steps N] [--C N] [--tokens N]

The target (interplab.decompose.animals_model): 200 animals, generic unit vectors of a 50-dim attribute span in
d = 64 (the animals generator's dense default), 2 present per sample; one detector neuron per animal (its row is
the animal's direction, its threshold trained) and a trained readout of each animal's fact.

- SPD (interplab.decompose, C subcomponents per layer) on both layers, scored by its MMCS/ML2R against the true
  per-animal mechanisms, beside the random-model control (the same SPD on a re-initialised model, scored against the
  trained truth) and a random rank-1 basis. For a comparison in the SAE's own terms, the input directions V[:, c] of
  the live detector subcomponents are also scored as a dictionary of x against the animal and attribute directions.
- SAEs (interplab.sae.trainer.train on the same generator's stream: ReLU/L1 and TopK with k = 2, 4x = 256 latents)
  scored by interplab.synth.score against the animal directions and the attribute directions, beside a random
  dictionary and PCA.

Everything lives under --root (default: a temporary folder); a rerun resumes SPD from its checkpoints and reuses the
trained SAEs. Last line: one JSON object with both methods' scores and the controls.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from interplab.decompose.configs import DecomposeConfig
from interplab.decompose.evaluate import score
from interplab.decompose.presets import resolve
from interplab.decompose.run import RANDOM_SEED_OFFSET, decompose, reinitialised
from interplab.decompose.scores import importances_on
from interplab.decompose.toys import TOYS
from interplab.decompose.truth import ToyRequest
from interplab.sae.files import load_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train
from interplab.synth.score import max_cosines, score_with_controls
from interplab.synth.sources import synthetic_source

SPEC = "animals:n_animals=200,n_attributes=50,n_independent=0,d=64,animal_mean_active=2.0,seed=0"
"""The generator animals-facts reads (AnimalsFactsConfig's defaults), as a spec the SAE trainer streams."""


def spd_part(root: Path, args: argparse.Namespace) -> dict:
    """SPD on the trained model and on the random-model control; both scored against the trained truth."""
    truth = TOYS["animals-facts"](ToyRequest(0, root / "target", "cpu", True))
    truth.targets = args.layers.split(",")
    cfg = DecomposeConfig(toy="animals-facts", C=args.C, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          importance_coeff=args.importance_coeff, p=args.p, faithfulness_coeff=args.faithfulness_coeff,
                          progress=True, out=str(root))
    settings = resolve(cfg, "animals-facts")
    print(f"model losses {truth.losses(20_000, seed=7)}; SPD settings {settings}", flush=True)
    main = decompose(truth, cfg, settings, checkpoint=root / "spd-main.pt", desc="spd animals-facts")
    scores = score(main, truth, threshold=cfg.live_threshold, eval_batch=cfg.eval_batch, seed=0)
    control_truth = reinitialised(truth, RANDOM_SEED_OFFSET)
    control = decompose(control_truth, cfg, settings, checkpoint=root / "spd-random-model.pt",
                        desc="spd random model")
    control_scores = score(control, control_truth, threshold=cfg.live_threshold, eval_batch=cfg.eval_batch, seed=0)
    out = {"spd_seconds": main.seconds + control.seconds}
    for layer in truth.targets:
        s, c = scores["layers"][layer], control_scores["layers"][layer]
        out |= {f"spd_{layer}_mmcs": s["mmcs"], f"spd_{layer}_ml2r": s["ml2r"], f"spd_{layer}_live": s["live"],
                f"spd_{layer}_mean_active": s["mean_active"], f"spd_{layer}_random_basis_mmcs": s["random_basis_mmcs"],
                f"spd_{layer}_random_model_mmcs": c["mmcs"]}
    out["spd_losses"] = scores["losses"]
    # The live detector subcomponents' input directions, read as a dictionary of x.
    x = truth.sample(4096, torch.Generator().manual_seed(1))
    live = importances_on(main, truth, x)["detect"].amax(0) > cfg.live_threshold
    V = main.components["detect"].V.detach().T[live]                                       # [live, d]
    for name, D in (("animals", truth.generator.animal_directions), ("attributes", truth.generator.attribute_directions)):
        out[f"spd_read_dirs_vs_{name}_mmcs"] = float(max_cosines(V, D).true_max.mean())
    return out


def sae_part(root: Path, args: argparse.Namespace, gen_truth) -> dict:
    """ReLU/L1 and TopK SAEs on the generator's stream, scored against both ontologies with controls."""
    out = {}
    batch = gen_truth.generator.sample(8192, torch.Generator().manual_seed(1_000_003))
    x = batch.x
    for arch, sweep in (("relu", {"l1_coefficient": [args.l1]}), ("topk", {"k": [2]})):
        cfg = TrainConfig(synthetic=SPEC, arch=arch, expansion=[4], tokens=args.tokens, batch_size=256, lr=3e-3,
                          out=str(root / f"sae-{arch}"), seed=0, checkpoint_every=0, resume=True, **sweep)
        trained = train(cfg, source=synthetic_source(cfg), progress=True)
        sae = load_sae(str(root / f"sae-{arch}" / trained.names[0])).float().eval()
        with torch.no_grad():
            codes = sae.encode(x)
            fvu = float((x - sae.decode(codes)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        out[f"sae_{arch}_l0"] = float((codes != 0).sum(1).float().mean())
        out[f"sae_{arch}_fvu"] = fvu
        truths = {"animals": (gen_truth.generator.animal_directions, batch.animal_coeffs),
                  "attributes": (gen_truth.generator.attribute_directions, batch.attribute_values)}
        for name, (D, coeffs) in truths.items():
            s = score_with_controls(sae.W_dec, D, x, codes=codes, coeffs=coeffs, seed=0)
            out[f"sae_{arch}_{name}_mmcs"] = s["learned"]["mmcs_true"]
            out[f"sae_{arch}_{name}_recovery"] = s["learned"]["recovery"]
            out[f"sae_random_{name}_mmcs"] = s["random"]["mmcs_true"]
            out[f"sae_pca_{name}_mmcs"] = s["pca"]["mmcs_true"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="working folder (default: a temporary folder)")
    parser.add_argument("--C", type=int, default=250, help="SPD subcomponents per layer (200 animals)")
    parser.add_argument("--steps", type=int, default=2000, help="SPD steps")
    parser.add_argument("--batch-size", type=int, default=256, help="SPD batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="SPD peak learning rate")
    parser.add_argument("--importance-coeff", type=float, default=2e-3, help="SPD importance-minimality coefficient")
    parser.add_argument("--p", type=float, default=1.0, help="SPD importance-minimality exponent")
    parser.add_argument("--faithfulness-coeff", type=float, default=1000.0,
                        help="SPD faithfulness coefficient (its loss is a mean over the 12,800 weight entries)")
    parser.add_argument("--layers", default="detect", help="layers SPD decomposes (detect, fact or both)")
    parser.add_argument("--tokens", type=int, default=300_000, help="SAE training samples")
    parser.add_argument("--l1", type=float, default=1.0, help="ReLU SAE L1 coefficient")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="animals-spd-sae-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"torch threads {torch.get_num_threads()}; working in {root}", flush=True)
    result = {"bench": "animals_spd_vs_sae"} | spd_part(root, args)
    truth = TOYS["animals-facts"](ToyRequest(0, root / "target", "cpu", False))
    result |= sae_part(root, args, truth)
    result["wall_s"] = time.perf_counter() - start
    for key, value in result.items():
        if key != "bench":
            print(f"{key}: {value}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
