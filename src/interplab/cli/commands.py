"""What each `interplab` command does once its options are parsed (`cli.COMMANDS` names these functions).

Every function takes the command's config, runs the capability's own entry point, and prints a short summary and
where the files are. This is the top room of the house: it imports every capability, and nothing imports it but the
CLI (lazily, so that `--help` stays light).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TypeVar

from interplab import demo as demo_module
from interplab.activations import harvest as harvest_module
from interplab.activations.configs import HarvestConfig, InspectConfig
from interplab.activations.store import ActivationStore
from interplab.beliefs import describe as beliefs_describe
from interplab.beliefs import regress as beliefs_regress_module
from interplab.beliefs import train as beliefs_train_module
from interplab.beliefs.configs import BeliefRegressConfig
from interplab.circuits import run_dla, run_heads, run_patch
from interplab.dashboard import graph_export, graph_page, neuronpedia, serve, site
from interplab.dashboard.configs import DashboardConfig, ServeConfig
from interplab.decompose import report as decompose_report
from interplab.decompose import run as decompose_run
from interplab.distributed import ranks
from interplab.distributed import shutdown as shutdown_distributed
from interplab.errors import InterplabError
from interplab.evals import perturb as perturb_module
from interplab.evals import sae_eval as sae_eval_module
from interplab.evals import transcoder_eval as transcoder_eval_module
from interplab.evals.configs import EvalConfig, PerturbConfig
from interplab.evals.figures import pareto_from_metrics
from interplab.graphs.run_graph import format_summary as graph_summary
from interplab.graphs.run_graph import run_graph
from interplab.graphs.configs import GraphConfig
from interplab.lens import run as lens_run
from interplab.models.configs import HooksConfig
from interplab.models.load import load_model
from interplab.probes import probe_run, refusal as refusal_module
from interplab.report import run_reports
from interplab.report.configs import ParetoConfig
from interplab.runs import read_json_object
from interplab.sae.crosslayer_config import CLTTrainConfig
from interplab.sae.crosslayer_train import train_clt
from interplab.sae.per_hook import hook_run_config, train_hooks
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import TrainResult, train
from interplab.synth import bench, planted, tms_run
from interplab.synth.configs import PlantedConfig, SynthBenchConfig, SynthScoreConfig
from interplab.synth.sources import synthetic_source
from interplab.toy import readouts as toy_readouts
from interplab.toy import train as toy_train_module
from interplab.weights import outliers as outliers_module
from interplab.weights import svd_run

C = TypeVar("C")


def summarised(run: Callable[[C], object], summary: Callable[[object], str], outputs: str) -> Callable[[C], None]:
    """A command that runs `run(cfg)`, prints `summary` of its result, then where its files are (`outputs`, with
    {OUT} standing for cfg.out without a trailing slash)."""

    def command(cfg: C) -> None:
        print(summary(run(cfg)))
        print(outputs.format(OUT=cfg.out.rstrip("/")))  # type: ignore[attr-defined]

    return command


# ---- activations, SAEs and their evaluation ----------------------------------------------------------------------
def demo(cfg: demo_module.DemoConfig) -> None:
    demo_module.run_demo(cfg)


def harvest(cfg: HarvestConfig) -> None:
    result = harvest_module.harvest(cfg)
    if not ranks().is_main:  # torchrun: every rank holds the same result
        return
    if result.already_complete:
        print(f"{cfg.out} already holds this complete harvest ({result.n_tokens:,} tokens); nothing to do")
    elif result.n_tokens_added < result.n_tokens:  # resumed: say what this run did, and what the store holds
        print(f"harvested {result.n_tokens_added:,} more tokens at {','.join(cfg.hooks)} into {cfg.out} "
              f"({result.tokens_per_s:,.0f} tokens/s); the store now holds {result.n_tokens:,} tokens")
    else:
        print(f"harvested {result.n_tokens:,} tokens at {','.join(cfg.hooks)} into {cfg.out} "
              f"({result.tokens_per_s:,.0f} tokens/s)")


def hooks(cfg: HooksConfig) -> None:
    model = load_model(cfg.model)
    print(json.dumps(model.info.to_dict()))
    print("\n".join(model.hook_names))


def inspect(cfg: InspectConfig) -> None:
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


def sae_train(cfg: TrainConfig) -> None:
    source = synthetic_source(cfg) if cfg.synthetic else None  # the trainer reads stores and models itself
    if cfg.hooks:
        for hook, result in train_hooks(cfg).items():
            _print_train_result(hook_run_config(cfg, hook), result)
        return
    result = train(cfg, source=source)
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


def transcoder_train(cfg: CLTTrainConfig) -> None:
    result = train_clt(cfg)
    if not ranks().is_main:  # data-parallel: every rank holds the same result
        return
    if result.already_complete:
        print(f"{cfg.out} already holds this complete run ({len(result.names)} CLTs); nothing to do")
        return
    for name, m in result.metrics.items():
        per_layer = "/".join(f"{v:.3f}" for v in m["fvu_per_layer"])
        print(f"{name}: fvu {m['fvu']:.4f} (per layer {per_layer})  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}")
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    print(f"trained {len(result.names)} CLT(s) on {result.tokens:,} tokens into {cfg.out} "
          f"({result.tokens_per_s:,.0f} tokens/s{resumed})")


def sae_eval(cfg: EvalConfig) -> None:
    print(sae_eval_module.format_summary(sae_eval_module.evaluate(cfg)))
    if cfg.out:
        print(f"metrics written to {cfg.out}")


def perturb(cfg: PerturbConfig) -> None:
    result = perturb_module.perturbation_sweep(cfg)
    print(perturb_module.format_summary(result))
    if cfg.out:
        print(f"results written to {cfg.out}")
    for path in result.get("figures", {}).values():
        print(f"figure written to {path}")


# ---- the planted-truth and toy labs ------------------------------------------------------------------------------
def synth_bench(cfg: SynthBenchConfig) -> None:
    result = bench.run_bench(cfg)
    print(bench.format_table(result))
    out = cfg.out.rstrip("/")
    print(f"table: {out}/bench.md, numbers: {out}/metrics.json, figure: {result['figures']['mmcs_vs_l0']}")


def synth_model(cfg: PlantedConfig) -> None:
    info = planted.build_planted(cfg)
    truths = ", ".join(f"{name} {shape[0]}" for name, shape in info["true_features"].items())
    done = "already holds this planted model; nothing written" if info["already_built"] else "written"
    print(f"{info['out']}: {done}: generator {info['generator']} planted at {' = '.join(info['exact_hooks'])} "
          f"(d_model {info['d_model']}, {info['n_samples']} table rows; true features: {truths})\n"
          f"next: interplab harvest --model {info['out']} --hooks hook_embed --out STORE; "
          f"interplab sae train --store STORE ...; interplab synth score --sae SAE --generator {info['out']}")


def synth_score(cfg: SynthScoreConfig) -> None:
    rows = bench.score_saved(cfg)
    print(bench.format_table({"config": vars(cfg), "rows": rows, "summary": bench.summarise(rows)}))


decompose = summarised(decompose_run.run_decompose, decompose_report.format_summary,
                      "numbers: {OUT}/metrics.json, report: {OUT}/report.md, figures: {OUT}/figures/")
synth_tms = summarised(tms_run.run_tms, tms_run.format_summary, "numbers: {OUT}/metrics.json, figures: {OUT}/figures/")
toy_train = summarised(toy_train_module.run_toy_train, toy_train_module.format_summary,
                       "numbers: {OUT}/metrics.json, log: {OUT}/log.jsonl; next: interplab toy inspect --run {OUT}")
toy_inspect = summarised(toy_readouts.run_toy_inspect, toy_readouts.format_summary,
                         "numbers: {OUT}/metrics.json, report: {OUT}/report.md, figures: {OUT}/figures/")
beliefs_msp = summarised(beliefs_describe.describe_process, beliefs_describe.format_summary,
                         "numbers: {OUT}/metrics.json, figure: {OUT}/figures/simplex.png")
beliefs_train = summarised(beliefs_train_module.train_beliefs, beliefs_train_module.format_summary,
                           "numbers: {OUT}/metrics.json; next: interplab beliefs regress --run {OUT}")


def beliefs_regress(cfg: BeliefRegressConfig) -> None:
    result = beliefs_regress_module.run_regress(cfg)  # its JSON goes to --out, or into the run folder by default
    print(beliefs_regress_module.format_summary(result))
    print(f"numbers: {result['out']}")


# ---- directions and weights --------------------------------------------------------------------------------------
probe = summarised(probe_run.run_probe, probe_run.format_summary, "numbers: {OUT}/metrics.json")
refusal = summarised(refusal_module.run_refusal, refusal_module.format_summary,
                     "numbers: {OUT}/metrics.json, report: {OUT}/report.md")
weights_svd = summarised(svd_run.run_svd, svd_run.format_summary,
                         "numbers: {OUT}/metrics.json, figures: {OUT}/figures/")
weights_outliers = summarised(outliers_module.run_outliers, outliers_module.format_summary,
                              "numbers: {OUT}/metrics.json")
patch = summarised(run_patch.run_patch, run_patch.format_summary,
                   "numbers: {OUT}/metrics.json, report: {OUT}/report.md, figures: {OUT}/figures/")
dla = summarised(run_dla.run_dla, run_dla.format_summary, "numbers: {OUT}/metrics.json, report: {OUT}/report.md")
transcoder_eval = summarised(transcoder_eval_module.run_transcoder_eval, transcoder_eval_module.format_summary,
                             "numbers: {OUT}/metrics.json, report: {OUT}/report.md")


def graph(cfg: GraphConfig) -> None:
    """The graph's run folder, then its viewer page (OUT/page/index.html) and Neuronpedia file beside it."""
    result = run_graph(cfg)
    out = cfg.out.rstrip("/")
    graph_json = read_json_object(f"{out}/graph.json")
    page = graph_page.write_graph_page(graph_json, f"{out}/page")
    graph_export.export_neuronpedia_graph(graph_json, f"{out}/neuronpedia-graph.json")
    print(graph_summary(result))
    print(f"numbers: {out}/metrics.json, graph: {out}/graph.json, report: {out}/report.md, viewer: {page}, "
          f"Neuronpedia: {out}/neuronpedia-graph.json")


heads = summarised(run_heads.run_heads, run_heads.format_summary,
                   "numbers: {OUT}/metrics.json, report: {OUT}/report.md, figures: {OUT}/figures/")
lens = summarised(lens_run.run_lens, lens_run.format_summary, "numbers: {OUT}/metrics.json, figures: {OUT}/figures/")


# ---- pages -------------------------------------------------------------------------------------------------------
def dashboard_build(cfg: DashboardConfig) -> None:
    print(site.format_build(site.build_site(cfg)))


def dashboard_serve(cfg: ServeConfig) -> None:
    serve.serve(cfg)


dashboard_neuronpedia = summarised(neuronpedia.export_neuronpedia, neuronpedia.format_summary, "files: {OUT}/")
report_runs = summarised(run_reports.write_run_reports, run_reports.format_summary,
                         "each run's page: RUN/report.html")


def report_pareto(cfg: ParetoConfig) -> None:
    if not cfg.metrics:
        raise InterplabError("--metrics needs at least one metrics.json from `interplab sae eval --out`")
    print(f"wrote {pareto_from_metrics(cfg.metrics, cfg.out)}")


# ---- failures of a torchrun job ----------------------------------------------------------------------------------
def dist_failure(exc: BaseException) -> tuple[str, str] | None:
    """("rank r of n", "Type: first line") if `exc` is a torch.distributed failure (a peer rank gone, a collective
    timed out), else None. Gloo reports a dead peer as a plain RuntimeError naming its transport, hence the markers."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    markers = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "timed out")
    is_dist = isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in markers))
    if not is_dist:
        return None
    r = ranks()
    reason = (str(exc).strip().splitlines() or ["no message"])[0][:200]
    return f"rank {r.rank} of {r.world_size}", f"{type(exc).__name__}: {reason}"


def shutdown() -> None:
    """Leave the torchrun process group, if one was joined."""
    shutdown_distributed()
