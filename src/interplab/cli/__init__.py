"""The `interplab` command: one subcommand per capability, options generated from the config dataclasses.

Commands may be nested one level (`interplab sae train`): a COMMANDS key with a space makes a group (`interplab sae
--help` lists its subcommands). Bad input is an `InterplabError`: one line on stderr and exit code 2. Ctrl-C during a
harvest or a training run leaves it resumable and exits with 130.

This module imports only the standard library and the config modules (which import only the standard library), so
`interplab --help` and `interplab COMMAND --help` never import torch, transformers or matplotlib. The code that runs a
command is in `interplab.cli.commands`, imported once a command has been parsed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from interplab.activations.configs import HarvestConfig, InspectConfig
from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig, MSPConfig
from interplab.circuits.configs import DLAConfig, HeadsConfig, PatchConfig
from interplab.config import add_dataclass_args, dataclass_from_args
from interplab.dashboard.configs import DashboardConfig, NeuronpediaConfig, ServeConfig
from interplab.decompose.configs import DecomposeConfig
from interplab.demo_config import DemoConfig
from interplab.errors import InterplabError
from interplab.evals.configs import EvalConfig, PerturbConfig, TranscoderEvalConfig
from interplab.graphs.configs import GraphConfig
from interplab.lens.configs import LensConfig
from interplab.models.configs import HooksConfig
from interplab.probes.configs import ProbeConfig, RefusalConfig
from interplab.report.configs import ParetoConfig, RunReportConfig
from interplab.sae.crosslayer_config import CLTTrainConfig
from interplab.sae.train_config import TrainConfig
from interplab.synth.configs import PlantedConfig, SynthBenchConfig, SynthScoreConfig, TMSRunConfig
from interplab.toy.configs import InspectToyConfig, ToyTrainConfig
from interplab.weights.configs import OutliersConfig, SVDConfig

__all__ = ["COMMANDS", "GROUPS", "build_parser", "main"]


COMMANDS: dict[str, tuple[type, str, str]] = {
    "demo": (DemoConfig, "demo", "the main job on the defaults: harvest, train SAEs, evaluate them with controls, "
             "perturbation sweep, figures and report"),
    "harvest": (HarvestConfig, "harvest", "harvest activations at hook points into an on-disk store"),
    "hooks": (HooksConfig, "hooks", "list a model's hook points"),
    "inspect": (InspectConfig, "inspect", "describe an activation store and verify its checksums"),
    "sae train": (TrainConfig, "sae_train", "train sparse autoencoders (a sweep in one pass) on a store or a model"),
    "sae eval": (EvalConfig, "sae_eval", "evaluate an SAE spliced into its model, beside its controls"),
    "transcoder train": (CLTTrainConfig, "transcoder_train",
                         "train cross-layer transcoders (a sweep in one pass) on a model's MLP inputs and outputs; "
                         "resumable, data-parallel under torchrun"),
    "transcoder eval": (TranscoderEvalConfig, "transcoder_eval",
                        "evaluate transcoders spliced in place of their MLPs, one layer at a time and all at once "
                        "(with and without error terms), beside ε-random and zero-ablation controls"),
    "perturb": (PerturbConfig, "perturb",
                "activation plateaus: KL and later-layer change along paths from real activations toward targets"),
    "synth bench": (SynthBenchConfig, "synth_bench", "train every SAE architecture on planted-feature generators "
                    "and score each against the truth, beside random and PCA controls"),
    "synth model": (PlantedConfig, "synth_model", "a small transformer whose embedding is a generator's samples: "
                    "run harvest, sae train and sae eval where the truth is known"),
    "synth score": (SynthScoreConfig, "synth_score", "score saved SAEs against a generator's planted truth, beside "
                    "random and PCA controls"),
    "decompose": (DecomposeConfig, "decompose",
                  "stochastic (SPD) or attribution-based (APD) parameter decomposition of a model's weights into "
                  "rank-1 subcomponents, scored against the true mechanisms beside random-model and random-basis "
                  "controls"),
    "synth tms": (TMSRunConfig, "synth_tms",
                  "toy models of superposition: the n=5, m=2 pictures and the n=200, m=20 dimensionality sweep"),
    "toy train": (ToyTrainConfig, "toy_train",
                  "train a toy transformer on a task with the exact answer (ov-coherent, skip-trigram, "
                  "modular-addition, or a Python generator), with phased evaluation logged by step"),
    "toy inspect": (InspectToyConfig, "toy_inspect",
                    "circuit read-outs of a trained toy: attention from the read-off, EQKE and EVOU per head, "
                    "accuracy per pair with each head ablated, the Fourier view of modular addition"),
    "beliefs msp": (MSPConfig, "beliefs_msp",
                    "describe a process exactly: stationary distribution, entropy rate, myopic entropies, "
                    "mixed-state presentation and its spectrum, the belief simplex"),
    "beliefs train": (BeliefTrainConfig, "beliefs_train",
                      "train a toy transformer on a hidden Markov process (Mess3, RRXOR, ...), with its "
                      "per-position loss against the optimum h(L)"),
    "beliefs regress": (BeliefRegressConfig, "beliefs_regress",
                        "regress belief states on a trained run's activations at every checkpoint, with "
                        "cross-validation, a shuffle control and figures"),
    "probe": (ProbeConfig, "probe",
              "difference-of-means, logistic and k-sparse probes for a labelled dataset at one hook, each beside "
              "shuffled-label, random-direction and random-rotation controls"),
    "refusal": (RefusalConfig, "refusal",
                "the refusal direction (Arditi et al. 2024): candidates by difference of means, selection under "
                "ablation and addition, refusal rates before and after, random-direction control, CE change, "
                "orthogonalised weights, report"),
    "weights svd": (SVDConfig, "weights_svd",
                    "a weight matrix's top singular directions (head OV/QK, MLP in/out, embedding, unembedding) "
                    "read through the vocabulary, with interpretability proxies beside random directions"),
    "weights outliers": (OutliersConfig, "weights_outliers",
                         "residual-stream outlier dimensions: massive activations and rogue dims per layer, the "
                         "tokens that carry them, beside the same statistics in a random rotation of the basis"),
    "patch": (PatchConfig, "patch",
              "activation and attribution patching over clean/corrupted prompt pairs (residual stream, layers, "
              "heads, q/k/v, paths), each effect beside its null control and SEM"),
    "dla": (DLAConfig, "dla", "direct logit attribution: the answer − wrong logit difference split into embedding, "
            "heads, MLPs and biases through the frozen final norm, beside a random-direction control"),
    "graph": (GraphConfig, "graph",
              "an attribution graph of a prompt through per-layer transcoders (frozen attention and norms, error "
              "nodes), pruned by influence, scored beside a random-dictionary control; a viewer page and a "
              "Neuronpedia export"),
    "heads": (HeadsConfig, "heads", "head detectors (previous-token, duplicate-token, induction, copying) for every "
              "head, beside shuffled-position and random-weights controls"),
    "lens": (LensConfig, "lens",
             "logit lens and tuned lens: every layer's residual stream decoded to the vocabulary, KL to the final "
             "distribution per layer beside a context-free control, top predictions for a prompt"),
    "dashboard build": (DashboardConfig, "dashboard_build",
                        "one pass over a corpus: per-latent frequency, histograms, top and quantile examples, logit "
                        "effects, correlated latents and neurons; written as a static site (open index.html)"),
    "dashboard serve": (ServeConfig, "dashboard_serve",
                        "serve a dashboard folder on 127.0.0.1 (only files inside it; --host to expose it)"),
    "dashboard neuronpedia": (NeuronpediaConfig, "dashboard_neuronpedia",
                              "export a dashboard site's data to Neuronpedia's import layout (or SAEDashboard's "
                              "batches)"),
    "report runs": (RunReportConfig, "report_runs",
                    "report.html (config, metrics, figures) in every run folder under --root, and one index page "
                    "linking them"),
    "report pareto": (ParetoConfig, "report_pareto",
                      "L0 vs FVU and L0 vs CE-loss-recovered of several evaluated SAEs"),
}
"""Each command: its config dataclass (its fields are the options), the function of `interplab.cli.commands` that
runs it, and its one-line help."""

GROUPS: dict[str, str] = {
    "beliefs": "belief-state geometry (Shai et al. 2024): transformers trained on hidden Markov processes, and "
               "affine maps from their residual streams onto the Bayesian belief states",
    "sae": "sparse autoencoders: train dictionaries on activations, evaluate them with controls",
    "transcoder": "transcoders: train cross-layer transcoders (per-layer ones: `interplab sae train --hook "
                  "blocks.L.mlp.hook_in --target blocks.L.hook_mlp_out`), evaluation with controls",
    "report": "pages from saved results: run reports and their index, Pareto plots",
    "dashboard": "feature dashboards: a static site per SAE (no server needed), served locally, exported to "
                 "Neuronpedia",
    "weights": "reading weights: factored QK/OV circuits and SVD directions through the vocabulary, residual-stream "
               "outlier dimensions",
    "toy": "the toy transformers lab: attention-head tasks and grokking with phased evaluation, and the circuit "
           "read-outs of the trained models",
    "synth": "the ground-truth lab: generators with planted features, and methods scored against them",
}
"""Help of each command group (the first word of a nested COMMANDS key)."""

INTERRUPTED: dict[str, str] = {
    "harvest": "completed shards are kept",
    "demo": "completed shards are kept",
    "sae train": "the last checkpoint is kept",
    "transcoder train": "the last checkpoint is kept",
    "beliefs train": "the last checkpoint is kept",
    "toy train": "the last checkpoint is kept",
}
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (what was wrong, and where the valid options are), exit code 2: the
    same shape as every other bad input, instead of a usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command, generated from COMMANDS and the config dataclasses."""
    parser = OneLineParser(prog="interplab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (config_cls, _, help_text) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            group_parser = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            groups[group] = group_parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
        target = groups[group] if group else sub
        add_dataclass_args(target.add_parser(leaf, help=help_text, description=config_cls.__doc__), config_cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (0, 2 for bad input, 130 when interrupted, 1 when a torchrun peer died)."""
    args = build_parser().parse_args(argv)
    command = f"{args.command} {args.subcommand}" if getattr(args, "subcommand", None) else args.command
    config_cls, runner, _ = COMMANDS[command]
    # Imported only now, so that --help (handled by the parser above) stays free of torch.
    commands = importlib.import_module("interplab.cli.commands")
    try:
        getattr(commands, runner)(dataclass_from_args(config_cls, args))
    except InterplabError as exc:
        sys.stderr.write(f"interplab {command}: error: {exc}\n")  # one write: torchrun ranks share one stderr
        return 2
    except (OSError, UnicodeDecodeError) as exc:
        # A path the user named could not be read or written (missing, a file for a folder, no permission, not
        # text): their input, not our bug, so one line like every other bad input. Checks before work should catch
        # these first; this is the net under them.
        sys.stderr.write(f"interplab {command}: error: {' '.join(str(exc).split())}\n")
        return 2
    except KeyboardInterrupt:
        kept = INTERRUPTED.get(command, "nothing is lost")
        print(f"\ninterplab {command}: interrupted; {kept}, rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ in _CREDENTIAL_ERRORS:  # botocore's, raised on first access to s3:// (never imported)
            sys.stderr.write(f"interplab {command}: error: {exc}; s3:// reads credentials from the environment: "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary ones), "
                             "or AWS_PROFILE (a profile of ~/.aws/credentials); see docs/big-models.md\n")
            return 2
        failure = commands.dist_failure(exc)
        if failure is None:
            raise
        # Another rank of a torchrun job died (killed, out of memory, a bug): this one cannot go on alone.
        rank, cause = failure
        kept = INTERRUPTED.get(command, "nothing is lost")
        print(f"interplab {command} ({rank}): error: another rank of this torchrun job stopped ({cause}); {kept}, "
              "rerun the same torchrun command with --resume to continue", file=sys.stderr)
        return 1
    finally:
        commands.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
