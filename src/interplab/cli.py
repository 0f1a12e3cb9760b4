"""The `interplab` command: one subcommand per capability, options generated from the config dataclasses.

Commands may be nested one level (`interplab sae train`): a COMMANDS key with a space makes a group (`interplab sae
--help` lists its subcommands). Bad input is an `InterplabError`: one
line on stderr and exit code 2. Ctrl-C during a harvest or a training run leaves it resumable and exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from interplab.activations.harvest import HarvestConfig
from interplab.beliefs.describe import MSPConfig
from interplab.beliefs.regress import BeliefRegressConfig
from interplab.beliefs.train import BeliefTrainConfig
from interplab.config import add_dataclass_args, dataclass_from_args
from interplab.dashboard.data import DashboardConfig
from interplab.dashboard.neuronpedia import NeuronpediaConfig
from interplab.report.run_reports import RunReportConfig
from interplab.dashboard.serve import ServeConfig
from interplab.demo import DemoConfig, run_demo
from interplab.errors import InterplabError
from interplab.evals.perturb import PerturbConfig
from interplab.evals.sae_eval import EvalConfig
from interplab.probes.probe_run import ProbeConfig
from interplab.probes.refusal import RefusalConfig
from interplab.sae.train_config import TrainConfig
from interplab.synth.bench import SynthBenchConfig, SynthScoreConfig
from interplab.synth.planted import PlantedConfig
from interplab.synth.tms_run import TMSRunConfig
from interplab.toy.readouts import InspectToyConfig
from interplab.toy.train import ToyTrainConfig
from interplab.lens.run import LensConfig
from interplab.weights.outliers import OutliersConfig
from interplab.weights.svd_run import SVDConfig

if TYPE_CHECKING:
    from interplab.sae.trainer import TrainResult


@dataclass
class HooksConfig:
    """List a model's hook points."""

    model: str = "smollm2-135m"
    """Model spec."""


@dataclass
class InspectConfig:
    """Describe an activation store and verify its checksums."""

    store: str = "activations"
    """Store folder or fsspec URL."""
    verify: bool = True
    """Read every shard and check its sha256."""


@dataclass
class ParetoConfig:
    """Draw the L0 Pareto plot (FVU and CE-loss-recovered) of several SAEs from their evaluation results."""

    metrics: list[str] = field(default_factory=list)
    """metrics.json files written by `interplab sae eval --out`, comma-separated (one point per SAE)."""
    out: str = "pareto.png"
    """PNG to write (local path or fsspec URL)."""


def run_pareto(cfg: ParetoConfig) -> None:
    from interplab.evals.figures import pareto_from_metrics

    if not cfg.metrics:
        raise InterplabError("--metrics needs at least one metrics.json from `interplab sae eval --out`")
    print(f"wrote {pareto_from_metrics(cfg.metrics, cfg.out)}")


def run_synth_bench(cfg: SynthBenchConfig) -> None:
    from interplab.synth.figures import synth_scores
    from interplab.synth.bench import format_table, run_bench

    result = run_bench(cfg)
    print(format_table(result))
    figure = synth_scores(result["rows"], f"{cfg.out.rstrip('/')}/mmcs_vs_l0.png")
    print(f"table: {cfg.out.rstrip('/')}/bench.md, rows: {cfg.out.rstrip('/')}/bench.json, figure: {figure}")


def run_synth_model(cfg: PlantedConfig) -> None:
    from interplab.synth.planted import build_planted

    info = build_planted(cfg)
    truths = ", ".join(f"{name} {shape[0]}" for name, shape in info["true_features"].items())
    print(f"wrote {info['out']}: generator {info['generator']} planted at {' = '.join(info['exact_hooks'])} "
          f"(d_model {info['d_model']}, {info['n_samples']} table rows; true features: {truths})\n"
          f"next: interplab harvest --model {info['out']} --hooks hook_embed --out STORE; "
          f"interplab sae train --store STORE ...; interplab synth score --sae SAE --generator {info['out']}")


def run_synth_score(cfg: SynthScoreConfig) -> None:
    from interplab.synth.bench import format_table, score_saved, summarise

    rows = score_saved(cfg)
    print(format_table({"config": asdict(cfg), "rows": rows, "summary": summarise(rows)}))


def summarised(module: str, run: str, outputs: str) -> Callable[[Any], None]:
    """A command that calls `interplab.<module>.<run>(cfg)`, prints the module's `format_summary` of the result,
    then where its files are (`outputs`, formatted with OUT = cfg.out without a trailing slash). The module is
    imported only when the command runs, so `interplab --help` stays light."""

    def command(cfg: Any) -> None:
        mod = importlib.import_module(f"interplab.{module}")
        print(mod.format_summary(getattr(mod, run)(cfg)))
        print(outputs.format(OUT=cfg.out.rstrip("/")))

    return command


def run_dashboard_build(cfg: DashboardConfig) -> None:
    from interplab.dashboard.site import build_site, format_build

    print(format_build(build_site(cfg)))


def run_dashboard_serve(cfg: ServeConfig) -> None:
    from interplab.dashboard.serve import serve

    serve(cfg)


def run_beliefs_regress(cfg: BeliefRegressConfig) -> None:
    from interplab.beliefs.regress import format_summary, run_regress

    result = run_regress(cfg)  # its JSON goes to --out, or into the run folder by default
    print(format_summary(result))
    print(f"numbers: {result['out']}")


def run_harvest(cfg: HarvestConfig) -> None:
    from interplab.activations.harvest import harvest
    from interplab.distributed import ranks

    result = harvest(cfg)
    if not ranks().is_main:  # torchrun: every rank holds the same result
        return
    if result.already_complete:
        print(f"{cfg.out} already holds this complete harvest ({result.n_tokens:,} tokens); nothing to do")
    else:
        print(f"harvested {result.n_tokens:,} tokens at {','.join(cfg.hooks)} into {cfg.out} "
              f"({result.tokens_per_s:,.0f} tokens/s)")


def run_hooks(cfg: HooksConfig) -> None:
    from interplab.models import load_model

    model = load_model(cfg.model)
    print(json.dumps(model.info.to_dict()))
    print("\n".join(model.hook_names))


def run_inspect(cfg: InspectConfig) -> None:
    from interplab.activations.store import ActivationStore

    store = ActivationStore(cfg.store)
    m = store.manifest
    print(f"{cfg.store}: {m['n_tokens']:,} tokens in {len(m['shards'])} shards, ctx_len {m['ctx_len']}, "
          f"dtype {m['dtype']}, {'complete' if m['complete'] else 'INCOMPLETE (resume the harvest)'}")
    for hook in store.hooks:
        print(f"  {hook}: d={store.d(hook)}")
    print("  config: " + json.dumps(m["config"]))
    if cfg.verify:
        for i in range(len(m["shards"])):
            store.load_shard(i)
        print(f"  all {len(m['shards'])} shard checksums verified")


def run_sae_train(cfg: TrainConfig) -> None:
    from interplab.distributed import ranks
    from interplab.sae.per_hook import hook_run_config, train_hooks
    from interplab.sae.trainer import train

    if cfg.hooks:
        for hook, result in train_hooks(cfg).items():
            _print_train_result(hook_run_config(cfg, hook), result)
        return
    result = train(cfg)
    if ranks().is_main:  # data-parallel: every rank holds the same result
        _print_train_result(cfg, result)


def _print_train_result(cfg: TrainConfig, result: TrainResult) -> None:
    if result.already_complete:
        print(f"{cfg.out} already holds this complete run ({len(result.names)} SAEs); nothing to do")
        return
    for name, m in result.metrics.items():
        print(f"{name}: fvu {m['fvu']:.4f}  mse {m['mse']:.4g}  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}")
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    print(f"trained {len(result.names)} SAE(s) on {result.tokens:,} tokens into {cfg.out} "
          f"({result.tokens_per_s:,.0f} tokens/s{resumed})")


def run_sae_eval(cfg: EvalConfig) -> None:
    from interplab.evals.sae_eval import evaluate, format_summary

    result = evaluate(cfg)
    print(format_summary(result))
    if cfg.out:
        print(f"metrics written to {cfg.out}")


def run_perturb(cfg: PerturbConfig) -> None:
    from interplab.evals.perturb import format_summary, perturbation_sweep

    result = perturbation_sweep(cfg)
    print(format_summary(result))
    if cfg.out:
        print(f"results written to {cfg.out}")
    for path in result.get("figures", {}).values():
        print(f"figure written to {path}")


COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "demo": (DemoConfig, run_demo, "the main job on the defaults: harvest, train SAEs, evaluate them with controls, "
             "perturbation sweep, figures and report"),
    "harvest": (HarvestConfig, run_harvest, "harvest activations at hook points into an on-disk store"),
    "hooks": (HooksConfig, run_hooks, "list a model's hook points"),
    "report runs": (RunReportConfig,
                    summarised("dashboard.run_reports", "write_run_reports", "each run's page: RUN/report.html"),
                    "report.html (config, metrics, figures) in every run folder under --root, and one index page "
                    "linking them"),
    "dashboard build": (DashboardConfig, run_dashboard_build,
                        "one pass over a corpus: per-latent frequency, histograms, top and quantile examples, logit "
                        "effects, correlated latents and neurons; written as a static site (open index.html)"),
    "dashboard serve": (ServeConfig, run_dashboard_serve,
                        "serve a dashboard folder on 127.0.0.1 (only files inside it; --host to expose it)"),
    "dashboard neuronpedia": (NeuronpediaConfig,
                              summarised("dashboard.neuronpedia", "export_neuronpedia", "files: {OUT}/"),
                              "export a dashboard site's data to Neuronpedia's import layout (or SAEDashboard's "
                              "batches)"),
    "inspect": (InspectConfig, run_inspect, "describe an activation store and verify its checksums"),
    "sae train": (TrainConfig, run_sae_train, "train sparse autoencoders (a sweep in one pass) on a store or a model"),
    "sae eval": (EvalConfig, run_sae_eval, "evaluate an SAE spliced into its model, beside its controls"),
    "synth bench": (SynthBenchConfig, run_synth_bench, "train every SAE architecture on planted-feature generators "
                    "and score each against the truth, beside random and PCA controls"),
    "synth model": (PlantedConfig, run_synth_model, "a small transformer whose embedding is a generator's samples: "
                    "run harvest, sae train and sae eval where the truth is known"),
    "synth score": (SynthScoreConfig, run_synth_score, "score saved SAEs against a generator's planted truth, beside "
                    "random and PCA controls"),
    "synth tms": (TMSRunConfig, summarised("synthetic.tms_run", "run_tms", "numbers: {OUT}/tms.json"),
                  "toy models of superposition: the n=5, m=2 pictures and the n=200, m=20 dimensionality sweep"),
    "toy train": (ToyTrainConfig,
                  summarised("synthetic.toy_train", "run_toy_train",
                             "numbers: {OUT}/train.json, log: {OUT}/log.jsonl; "
                             "next: interplab toy inspect --run {OUT}"),
                  "train a toy transformer on a task with the exact answer (ov-coherent, skip-trigram, "
                  "modular-addition, or a Python generator), with phased evaluation logged by step"),
    "toy inspect": (InspectToyConfig,
                    summarised("synthetic.toy_inspect", "run_toy_inspect",
                               "numbers: {OUT}/inspect.json, report: {OUT}/report.md, figures: {OUT}/figures/"),
                    "circuit read-outs of a trained toy: attention from the read-off, EQKE and EVOU per head, "
                    "accuracy per pair with each head ablated, the Fourier view of modular addition"),
    "report pareto": (ParetoConfig, run_pareto, "L0 vs FVU and L0 vs CE-loss-recovered of several evaluated SAEs"),
    "beliefs msp": (MSPConfig, summarised("beliefs.describe", "describe_process", "numbers: {OUT}/msp.json"),
                    "describe a process exactly: stationary distribution, entropy rate, myopic entropies, "
                    "mixed-state presentation and its spectrum, the belief simplex"),
    "beliefs train": (BeliefTrainConfig,
                      summarised("beliefs.train", "train_beliefs",
                                 "numbers: {OUT}/train.json; next: interplab beliefs regress --run {OUT}"),
                      "train a toy transformer on a hidden Markov process (Mess3, RRXOR, ...), with its "
                      "per-position loss against the optimum h(L)"),
    "beliefs regress": (BeliefRegressConfig, run_beliefs_regress,
                        "regress belief states on a trained run's activations at every checkpoint, with "
                        "cross-validation, a shuffle control and figures"),
    "probe": (ProbeConfig, summarised("probes.probe_run", "run_probe", "numbers: {OUT}/probe.json"),
              "difference-of-means, logistic and k-sparse probes for a labelled dataset at one hook, each beside "
              "shuffled-label, random-direction and random-rotation controls"),
    "refusal": (RefusalConfig,
                summarised("probes.refusal", "run_refusal", "numbers: {OUT}/refusal.json, report: {OUT}/report.md"),
                "the refusal direction (Arditi et al. 2024): candidates by difference of means, selection under "
                "ablation and addition, refusal rates before and after, random-direction control, CE change, "
                "orthogonalised weights, report"),
    "weights svd": (SVDConfig,
                    summarised("weights.svd_run", "run_svd", "numbers: {OUT}/svd.json, figures: {OUT}/figures/"),
                    "a weight matrix's top singular directions (head OV/QK, MLP in/out, embedding, unembedding) "
                    "read through the vocabulary, with interpretability proxies beside random directions"),
    "weights outliers": (OutliersConfig,
                         summarised("weights.outliers", "run_outliers", "numbers: {OUT}/outliers.json"),
                         "residual-stream outlier dimensions: massive activations and rogue dims per layer, the "
                         "tokens that carry them, beside the same statistics in a random rotation of the basis"),
    "lens": (LensConfig,
             summarised("weights.lens_run", "run_lens", "numbers: {OUT}/lens.json, figures: {OUT}/figures/"),
             "logit lens and tuned lens: every layer's residual stream decoded to the vocabulary, KL to the final "
             "distribution per layer beside a context-free control, top predictions for a prompt"),
    "perturb": (PerturbConfig, run_perturb,
                "activation plateaus: KL and later-layer change along paths from real activations toward targets"),
}

GROUPS: dict[str, str] = {
    "beliefs": "belief-state geometry (Shai et al. 2024): transformers trained on hidden Markov processes, and "
               "affine maps from their residual streams onto the Bayesian belief states",
    "sae": "sparse autoencoders: train dictionaries on activations, evaluate them with controls",
    "report": "figures and reports from saved results",
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
    "beliefs train": "the last checkpoint is kept",
    "toy train": "the last checkpoint is kept",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interplab", description=__doc__.split("\n")[0])
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
    args = build_parser().parse_args(argv)
    command = f"{args.command} {args.subcommand}" if getattr(args, "subcommand", None) else args.command
    config_cls, run, _ = COMMANDS[command]
    try:
        run(dataclass_from_args(config_cls, args))
    except InterplabError as exc:
        sys.stderr.write(f"interplab {command}: error: {exc}\n")  # one write: torchrun ranks share one stderr
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
        if not _is_dist_error(exc):
            raise
        # Another rank of a torchrun job died (killed, out of memory, a bug): this one cannot go on alone.
        from interplab.distributed import ranks

        kept, r = INTERRUPTED.get(command, "nothing is lost"), ranks()
        reason = (str(exc).strip().splitlines() or ["no message"])[0][:200]
        print(f"interplab {command} (rank {r.rank} of {r.world_size}): error: another rank of this torchrun job "
              f"stopped ({type(exc).__name__}: {reason}); {kept}, rerun the same torchrun command with --resume "
              "to continue", file=sys.stderr)
        return 1
    finally:
        from interplab.distributed import shutdown

        shutdown()
    return 0


_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError")


def _is_dist_error(exc: BaseException) -> bool:
    """Whether `exc` is a torch.distributed failure (a peer rank gone, a collective timed out). Gloo reports a
    dead peer as a plain RuntimeError naming its transport, hence the markers."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "timed out")
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in markers)


if __name__ == "__main__":
    sys.exit(main())
