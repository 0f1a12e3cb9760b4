"""`interplab beliefs msp`: a process described exactly, before any transformer is trained on it.

    stationary π, the stationary token distribution, the entropy rate h_μ (bracketed, bits), the myopic entropies
    h(1..n) (bits and nats: the per-position optimum of a next-token loss), the mixed-state presentation to a depth
    (distinct belief states per depth, closed or not, the leading eigenvalues of its transition matrix), and the
    belief-state geometry as a figure: every belief of the MSP tree in the simplex (PCA plane for > 3 states)

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (every number above) and
OUT/figures/simplex.png. A rerun with the same config into OUT reports the saved numbers; another config is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from interplab.beliefs.configs import MSPConfig
from interplab.beliefs.figures import simplex
from interplab.beliefs.msp import entropy_rate, mixed_state_presentation, msp_tree, myopic_entropy, spectrum
from interplab.beliefs.process import make_process, stationary_distribution, token_distribution
from interplab.runs import JSONDict, Run

KIND = "beliefs msp"
"""The command, as recorded in config.json and metrics.json."""
SPECTRUM_MAX_STATES = 4000
"""The MSP's eigenvalues are computed only up to this many distinct states (a dense eigendecomposition)."""


def describe_process(cfg: MSPConfig) -> JSONDict:
    """Compute everything `MSPConfig` names, write OUT/metrics.json and OUT/figures/simplex.png, and return the
    metrics. A complete run with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    process = make_process(cfg.process)  # a bad spec or file fails before --out is touched
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        rate = entropy_rate(process)
        h_bits = myopic_entropy(process, cfg.entropy_length, base=2.0)
        msp = mixed_state_presentation(process, cfg.depth)
        per_depth = [int((msp.depth == d).sum()) for d in range(int(msp.depth.max()) + 1)]
        out: dict[str, Any] = {
            "config": asdict(cfg), "process": process.name, "n_states": process.n_states,
            "n_tokens": process.n_tokens, "stationary": stationary_distribution(process).tolist(),
            "token_distribution": token_distribution(process).tolist(),
            "entropy_rate_bits": rate._asdict(),
            "myopic_entropy_bits": h_bits.tolist(), "myopic_entropy_nats": (h_bits * math.log(2)).tolist(),
            "msp": {"distinct_states": len(msp.beliefs), "new_states_per_depth": per_depth, "closed": msp.closed},
        }
        # A truncated MSP (Mess3's never closes) has all-zero rows for its last depth, so its matrix is nilpotent
        # and its eigenvalues say nothing; only a closed MSP has a spectrum worth reporting.
        if msp.closed and len(msp.beliefs) <= SPECTRUM_MAX_STATES:
            eig = spectrum(msp)[: cfg.eigenvalues]
            out["msp"]["eigenvalues"] = [[float(e.real), float(e.imag)] for e in eig]
        tree = msp_tree(process, min(cfg.depth, _tree_depth(process.n_tokens)))
        out["figures"] = {"simplex": simplex(tree.beliefs, None, tree.probs, run.figure("simplex"),
                                             title=f"{process.name}: belief states to depth {int(tree.depth.max())}")}
        run.write_metrics(out)
        return {"kind": KIND, **out}


def _tree_depth(n_tokens: int, max_points: int = 200_000) -> int:
    """The deepest tree whose last level has at most max_points nodes (the figure draws each node)."""
    return max(1, int(math.log(max_points) / math.log(max(n_tokens, 2))))


def format_summary(out: JSONDict) -> str:
    """A few lines for the terminal: π, the entropy rate, h(L), the MSP's size and spectrum, the figure."""
    rate, msp = out["entropy_rate_bits"], out["msp"]
    lines = [f"{out['process']}: {out['n_states']} states, {out['n_tokens']} tokens; π = "
             + ", ".join(f"{p:.4f}" for p in out["stationary"]),
             f"entropy rate {rate['value']:.6f} bits (bounds {rate['lower']:.6f} .. {rate['upper']:.6f})",
             "h(L), bits: " + ", ".join(f"{h:.4f}" for h in out["myopic_entropy_bits"]),
             f"MSP to depth {out['config']['depth']}: {msp['distinct_states']} distinct belief states "
             f"(new per depth {msp['new_states_per_depth']}), " + ("closed" if msp["closed"] else "not closed")]
    if "eigenvalues" in msp:
        lines.append("leading eigenvalues: " + ", ".join(f"{complex(*e):.4f}" for e in msp["eigenvalues"]))
    lines += [f"figure: {path}" for path in out["figures"].values()]
    return "\n".join(lines)
