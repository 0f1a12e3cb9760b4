"""The `interplab` command: one subcommand per capability, options generated from the config dataclasses.

Commands may be nested one level (`interplab sae train`): a COMMANDS key with a space makes a group (`interplab sae
--help` lists its subcommands). Bad input is an `InterplabError`: one
line on stderr and exit code 2. Ctrl-C during a harvest or a training run leaves it resumable and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from interplab.activations.harvest import HarvestConfig
from interplab.config import add_dataclass_args, dataclass_from_args
from interplab.errors import InterplabError
from interplab.evals.sae_eval import EvalConfig
from interplab.sae.train_config import TrainConfig


@dataclass
class DemoConfig:
    """The main job on the defaults: SmolLM2-135M on the Python-docs corpus."""

    model: str = "smollm2-135m"
    """Model spec: 'smollm2-135m', a .gguf file, a local HF or toy-model folder, or an HF hub id."""
    corpus: str = "python-docs"
    """Text corpus (see `interplab harvest --help`)."""
    hook: str = "blocks.6.hook_resid_post"
    """The hook point to harvest."""
    tokens: int = 131_072
    """Tokens to harvest."""
    ctx_len: int = 128
    """Tokens per context."""
    batch_size: int = 16
    """Contexts per forward pass."""
    k: int = 32
    """Active latents per token of the demo's TopK SAE."""
    expansion: int = 16
    """Width of the demo's SAE as a multiple of the activation width."""
    sae_batch_size: int = 1024
    """Activations per SAE training step."""
    out: str = "interplab-demo"
    """Run directory: the store goes to OUT/activations, the SAE to OUT/saes (an interrupted demo resumes)."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""


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


def run_harvest(cfg: HarvestConfig) -> None:
    from interplab.activations.harvest import harvest

    result = harvest(cfg)
    if result.already_complete:
        print(f"{cfg.out} already holds this complete harvest ({result.n_tokens:,} tokens); nothing to do")
    else:
        print(f"harvested {result.n_tokens:,} tokens at {','.join(cfg.hooks)} into {cfg.out} "
              f"({result.tokens_per_s:,.0f} tokens/s)")


def run_demo(cfg: DemoConfig) -> None:
    from interplab.activations.harvest import harvest
    from interplab.activations.store import ActivationStore
    from interplab.activations.summary import format_summary, summarize
    from interplab.sae import TrainConfig, train

    root = cfg.out.rstrip("/")
    store = f"{root}/activations"
    print(f"interplab demo: harvesting {cfg.hook} of {cfg.model} on {cfg.corpus} ({cfg.tokens:,} tokens) -> {store}")
    result = harvest(HarvestConfig(model=cfg.model, hooks=[cfg.hook], corpus=cfg.corpus, tokens=cfg.tokens,
                                   ctx_len=cfg.ctx_len, batch_size=cfg.batch_size, out=store, device=cfg.device,
                                   resume=True))
    if not result.already_complete:
        print(f"harvested at {result.tokens_per_s:,.0f} tokens/s (forward pass and writes)")
    print(format_summary(summarize(ActivationStore(store))))

    print(f"training a TopK SAE (k={cfg.k}, {cfg.expansion}x) on the store -> {root}/saes")
    trained = train(TrainConfig(store=store, arch="topk", k=[cfg.k], expansion=[cfg.expansion],
                                batch_size=cfg.sae_batch_size, out=f"{root}/saes", device=cfg.device, resume=True))
    for name, m in trained.metrics.items():
        print(f"{name}: training FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%} "
              f"-> {root}/saes/{name}")
    print("next: evaluate the SAE with its controls (coming in the evaluation capability)")


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
    from interplab.sae.trainer import train

    result = train(cfg)
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


COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "demo": (DemoConfig, run_demo, "the main job on the defaults: harvest SmolLM2 on python-docs and summarise"),
    "harvest": (HarvestConfig, run_harvest, "harvest activations at hook points into an on-disk store"),
    "hooks": (HooksConfig, run_hooks, "list a model's hook points"),
    "inspect": (InspectConfig, run_inspect, "describe an activation store and verify its checksums"),
    "sae train": (TrainConfig, run_sae_train, "train sparse autoencoders (a sweep in one pass) on a store or a model"),
    "sae eval": (EvalConfig, run_sae_eval, "evaluate an SAE spliced into its model, beside its controls"),
}

GROUPS: dict[str, str] = {"sae": "sparse autoencoders: train dictionaries on activations"}
"""Help of each command group (the first word of a nested COMMANDS key)."""

INTERRUPTED: dict[str, str] = {
    "harvest": "completed shards are kept",
    "demo": "completed shards are kept",
    "sae train": "the last checkpoint is kept",
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
        print(f"interplab {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = INTERRUPTED.get(command, "nothing is lost")
        print(f"\ninterplab {command}: interrupted; {kept}, rerun with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
