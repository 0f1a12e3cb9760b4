"""Hidden Markov processes as token-labelled transition tensors, with built-ins, specs, stationarity and sampling.

A process over S hidden states and X tokens is one tensor (Shai et al. 2024, "Transformers represent belief state
geometry in their residual streams"):

    T[x, s, s'] = P(emit x and go to s' | in s)          T ≥ 0,   Σ_x Σ_s' T[x, s, s'] = 1 for every s

so M = Σ_x T[x] is the state-to-state transition matrix. A token sequence w = x₁…x_L has probability
P(w) = π T[x₁] ⋯ T[x_L] 1, with π the stationary distribution (π M = π, Σ π = 1): every process here is run
stationary, started from π.

Built-ins (`make_process` specs in brackets):

    Mess3(x, a)    [mess3:x=0.05,a=0.85]  3 states, 3 tokens; T[k, s, s'] = (a if s' = k else b)·(y if s' = s else x)
                                          with b = (1 − a)/2, y = 1 − 2x. Non-unifilar: its beliefs form a fractal.
    RRXOR          [rrxor]                5 states, 2 tokens: bits b₁ b₂ uniformly random, then b₁ XOR b₂, repeat.
    Z1R            [z1r]                  3 states, 2 tokens: 0, 1, then a uniformly random bit, repeat.
    Even(p)        [even:p=0.5]           2 states: blocks of 1s have even length, each bounded by 0s.
    Golden Mean(p) [golden_mean:p=0.5]    2 states: no two consecutive 0s (the usual convention in comp. mechanics).
    a file         [path/to/T.npy|.json]  any T; .json holds the nested list T[x][s][s'].

Everything is torch float64 (tokens and states int64).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from jaxtyping import Float, Int
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from interplab.config import parse_spec_settings
from interplab.errors import InterplabError, check_int

ROW_SUM_TOL = 1e-6
"""How far Σ_x Σ_s' T[x, s, s'] may be from 1 for a valid process."""


class Process:
    """A validated process tensor T[x, s, s'] (float64) and a name.

        p = Process(T, name="mine")       # T: tensor, array or nested list; raises InterplabError if invalid
        p.T, p.n_tokens, p.n_states, p.transition_matrix
    """

    def __init__(self, T: Tensor | npt.ArrayLike, name: str = "custom") -> None:
        self.T: Float[Tensor, "x s s"] = validate_transitions(T)
        self.name = name

    @property
    def n_tokens(self) -> int:
        return self.T.shape[0]

    @property
    def n_states(self) -> int:
        return self.T.shape[1]

    @property
    def transition_matrix(self) -> Float[Tensor, "s s"]:
        """M[s, s'] = Σ_x T[x, s, s'] = P(go to s' | in s)."""
        return self.T.sum(0)

    def __repr__(self) -> str:
        return f"Process({self.name}, {self.n_states} states, {self.n_tokens} tokens)"


def validate_transitions(T: Tensor | npt.ArrayLike) -> Float[Tensor, "x s s"]:
    """T as a float64 tensor, or an InterplabError saying which state (or entry) is wrong and what is valid."""
    try:
        T = torch.as_tensor(np.asarray(T, dtype=np.float64) if not isinstance(T, Tensor) else T,
                            dtype=torch.float64).cpu()
    except (TypeError, ValueError) as e:
        raise InterplabError(f"a process tensor must be numeric T[x, s, s'] (tokens × states × states): {e}") from None
    if T.ndim != 3:
        raise InterplabError(f"a process tensor must be 3-D, T[x, s, s'] = P(emit x and go to s' | in s) "
                             f"(tokens × states × states); got shape {tuple(T.shape)}")
    if T.shape[1] != T.shape[2]:
        raise InterplabError(f"each T[x] must be square (states × states); got shape {tuple(T.shape)}, "
                             f"i.e. {T.shape[1]} × {T.shape[2]}")
    if T.shape[0] < 1 or T.shape[1] < 1:
        raise InterplabError(f"a process needs at least one token and one state; got shape {tuple(T.shape)}")
    bad = ~torch.isfinite(T)
    if bad.any():
        x, s, t = (int(i) for i in bad.nonzero()[0])
        raise InterplabError(f"T[{x}, {s}, {t}] = {T[x, s, t].item()} (state {s}) is not finite; "
                             "every entry must be a probability in [0, 1]")
    if (T < 0).any():
        x, s, t = (int(i) for i in (T < 0).nonzero()[0])
        raise InterplabError(f"T[{x}, {s}, {t}] = {T[x, s, t].item():.6g} (state {s}) is negative; "
                             "every entry must be a probability in [0, 1]")
    rows = T.sum((0, 2))
    off = (rows - 1).abs() > ROW_SUM_TOL
    if off.any():
        s = int(off.nonzero()[0])
        raise InterplabError(f"state {s}'s outgoing probabilities Σ_x Σ_s' T[x, {s}, s'] sum to {rows[s].item():.9g}; "
                             f"they must sum to 1 (within {ROW_SUM_TOL:g}) for every state "
                             f"({int(off.sum())} of {T.shape[1]} states do not)")
    return T


# ---------------------------------------------------------------------------------------------------------------
# Built-in processes


def mess3(x: float = 0.05, a: float = 0.85) -> Process:
    """Mess3 (Marzen & Crutchfield 2017; Shai et al. 2024 use x = 0.05, a = 0.85).

    x: in [0, 1/2]; the chance of moving to each other state (y = 1 − 2x stays).
    a: in [0, 1]; how strongly token k signals the destination state k (b = (1 − a)/2 for the other two).
    """
    if not 0 <= x <= 0.5:
        raise InterplabError(f"mess3 x must be in [0, 0.5] (y = 1 − 2x is the chance to stay), got {x}")
    if not 0 <= a <= 1:
        raise InterplabError(f"mess3 a must be in [0, 1], got {a}")
    b, y = (1 - a) / 2, 1 - 2 * x
    eye = torch.eye(3, dtype=torch.float64)
    stay = y * eye + x * (1 - eye)                                  # [s, s']: y on the diagonal, x elsewhere
    emit = a * eye + b * (1 - eye)                                  # [k, s']: a when the token names s'
    return Process(emit[:, None, :] * stay[None, :, :], name=f"mess3(x={x:g}, a={a:g})")


def _unifilar(n_tokens: int, n_states: int, edges: list[tuple[int, int, int, float]]) -> Tensor:
    """T from (state, token, next state, probability) edges."""
    T = torch.zeros(n_tokens, n_states, n_states, dtype=torch.float64)
    for s, x, t, p in edges:
        T[x, s, t] += p
    return T


def rrxor() -> Process:
    """Random-random-XOR: states S (next bit is a triple's first), A0/A1 (first bit was 0/1), X0/X1 (next bit is
    the XOR, 0/1), numbered 0..4. Stationary π = (1/3, 1/6, 1/6, 1/6, 1/6); entropy rate 2/3 bit."""
    S, A0, A1, X0, X1 = range(5)
    return Process(_unifilar(2, 5, [(S, 0, A0, .5), (S, 1, A1, .5), (A0, 0, X0, .5), (A0, 1, X1, .5),
                                    (A1, 0, X1, .5), (A1, 1, X0, .5), (X0, 0, S, 1.), (X1, 1, S, 1.)]), name="rrxor")


def z1r() -> Process:
    """Zero-one-random: state 0 emits 0, state 1 emits 1, state 2 emits a fair random bit, cycling 0 → 1 → 2 → 0.
    π uniform; entropy rate 1/3 bit."""
    return Process(_unifilar(2, 3, [(0, 0, 1, 1.), (1, 1, 2, 1.), (2, 0, 0, .5), (2, 1, 0, .5)]), name="z1r")


def even_process(p: float = 0.5) -> Process:
    """Even process: state 0 emits 0 (probability p, stays) or 1 (1 − p, goes to state 1); state 1 emits 1 and
    returns. Every block of 1s between 0s has even length. π = (1, 1 − p)/(2 − p); entropy rate H(p)/(2 − p).

    p: in [0, 1]; the chance that state 0 emits 0.
    """
    if not 0 <= p <= 1:
        raise InterplabError(f"even p must be in [0, 1], got {p}")
    return Process(_unifilar(2, 2, [(0, 0, 0, p), (0, 1, 1, 1 - p), (1, 1, 0, 1.)]), name=f"even(p={p:g})")


def golden_mean(p: float = 0.5) -> Process:
    """Golden Mean: no two consecutive 0s. State 0 emits 1 (probability 1 − p, stays) or 0 (p, goes to state 1);
    state 1 must emit 1 and return. π = (1, p)/(1 + p); entropy rate H(p)/(1 + p) (2/3 bit at p = 1/2).

    p: in [0, 1]; the chance that state 0 emits 0.
    """
    if not 0 <= p <= 1:
        raise InterplabError(f"golden_mean p must be in [0, 1], got {p}")
    return Process(_unifilar(2, 2, [(0, 1, 0, 1 - p), (0, 0, 1, p), (1, 1, 0, 1.)]), name=f"golden_mean(p={p:g})")


PROCESSES: dict[str, Callable[..., Process]] = {
    "mess3": mess3,
    "rrxor": rrxor,
    "z1r": z1r,
    "even": even_process,
    "golden_mean": golden_mean,
}
"""Spec name → builder; its keyword arguments (all floats) are the spec's fields."""


def load_process(path: str | Path) -> Process:
    """A process from a .npy file (array T[x, s, s']) or a .json file (nested list T[x][s][s'])."""
    path = Path(path)
    if path.suffix not in (".npy", ".json"):
        raise InterplabError(f"a process file must be .npy (an array T[x, s, s']) or .json (a nested list), "
                             f"got {str(path)!r}")
    if not path.is_file():
        raise InterplabError(f"process file {str(path)!r} does not exist")
    try:
        T = np.load(path, allow_pickle=False) if path.suffix == ".npy" else json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise InterplabError(f"could not read process file {str(path)!r}: {e}") from None
    return Process(T, name=path.stem)


def make_process(spec: str) -> Process:
    """The process a spec names: "mess3:x=0.05,a=0.85", "rrxor", "golden_mean:p=0.3" or "path/to/T.npy"/".json"."""
    name = spec.partition(":")[0]
    name = name.strip().replace("-", "_")
    if name not in PROCESSES:
        if Path(spec).suffix in (".npy", ".json"):
            return load_process(spec)
        raise InterplabError(f"unknown process {spec!r}; valid: {', '.join(PROCESSES)} (e.g. mess3:x=0.05,a=0.85), "
                             "or a .npy/.json file holding T[x, s, s']")
    builder = PROCESSES[name]
    kinds = {k: type(v.default) for k, v in inspect.signature(builder).parameters.items()}
    values = parse_spec_settings(spec, "process", kinds)
    return builder(**values)


# ---------------------------------------------------------------------------------------------------------------
# Stationarity and sampling


def stationary_distribution(process: Process) -> Float[Tensor, " s"]:
    """π with π M = π, Σ π = 1: the left eigenvector of M = Σ_x T[x] at eigenvalue 1.

    It is unique exactly when the state graph (s → s' where M[s, s'] > 0) has one closed communicating class; that
    is checked on the graph rather than on eigenvalues near 1, so nearly-decomposable processes (Mess3 with tiny x)
    are accepted. Periodic processes (Z1R) are fine: π is still unique.
    """
    M = process.transition_matrix
    n_classes, labels = connected_components((M > 0).numpy(), directed=True, connection="strong")
    leaves = torch.as_tensor(labels)
    # A class is closed when no edge leaves it.
    closed = [c for c in range(n_classes) if not (M[leaves == c][:, leaves != c] > 0).any()]
    if len(closed) != 1:
        groups = "; ".join(str((leaves == c).nonzero().flatten().tolist()) for c in closed)
        raise InterplabError(f"{process.name} has {len(closed)} closed classes of states ({groups}), so its "
                             "stationary distribution is not unique; a process must be able to reach one closed "
                             "class from every state")
    S = process.n_states
    # π (M − I) = 0 with Σ π = 1, as one consistent (S + 1) × S least-squares system (exact when π is unique).
    A = torch.cat([(M - torch.eye(S, dtype=torch.float64)).T, torch.ones(1, S, dtype=torch.float64)])
    b = torch.zeros(S + 1, dtype=torch.float64)
    b[-1] = 1
    pi = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0].clamp_min(0)
    return pi / pi.sum()


def next_token_probabilities(process: Process, beliefs: Float[Tensor, "*batch s"]) -> Float[Tensor, "*batch x"]:
    """P(next token = x | belief η) = η T[x] 1 = Σ_s η_s Σ_s' T[x, s, s']."""
    return beliefs.to(torch.float64) @ process.T.sum(2).T


def token_distribution(process: Process) -> Float[Tensor, " x"]:
    """The stationary single-token distribution P(X = x) = π T[x] 1."""
    return next_token_probabilities(process, stationary_distribution(process))


class ProcessSample(NamedTuple):
    """Sequences sampled from a process, with the hidden states that emitted them."""

    tokens: Int[Tensor, "n L"]
    """tokens[i, j]: the j-th token of sequence i."""
    states: Int[Tensor, "n L+1"]
    """states[i, 0] ~ π is the starting state; states[i, j + 1] is the state after emitting tokens[i, j]."""


def _inverse_cdf_table(probs: Float[Tensor, "rows k"]) -> Float[Tensor, "rows k"]:
    """Cumulative sums per row, with every entry from the last nonzero one on set to +inf, so that
    #{k: C[k] <= u} for u ∈ [0, 1) is an index of positive probability even when rounding leaves the last
    cumulative sum just below u."""
    C = probs.cumsum(1)
    k = torch.arange(probs.shape[1])
    last = torch.where(probs > 0, k, -1).amax(1, keepdim=True)
    return torch.where(k >= last, math.inf, C)


def sample_with_states(process: Process, n_sequences: int, length: int, seed: int = 0) -> ProcessSample:
    """n_sequences stationary sequences of `length` tokens, and their hidden states; seeded, deterministic.

    Vectorised over sequences, one step per position: each step draws (token, next state) jointly from
    T[:, s, :] by inverting its cumulative distribution with one uniform per sequence.
    """
    check_int("n_sequences", n_sequences, 1)
    check_int("length", length, 0)
    check_int("seed", seed, 0)
    X, S = process.n_tokens, process.n_states
    gen = torch.Generator().manual_seed(seed)
    start = _inverse_cdf_table(stationary_distribution(process)[None])[0]
    joint = _inverse_cdf_table(process.T.permute(1, 0, 2).reshape(S, X * S))        # [s, x·S + s']
    tokens = torch.empty(n_sequences, length, dtype=torch.int64)
    states = torch.empty(n_sequences, length + 1, dtype=torch.int64)
    s = (torch.rand(n_sequences, 1, generator=gen, dtype=torch.float64) >= start).sum(1)
    states[:, 0] = s
    for j in range(length):
        u = torch.rand(n_sequences, 1, generator=gen, dtype=torch.float64)
        k = (u >= joint[s]).sum(1)
        tokens[:, j] = torch.div(k, S, rounding_mode="floor")
        s = k - tokens[:, j] * S
        states[:, j + 1] = s
    return ProcessSample(tokens, states)


def sample(process: Process, n_sequences: int, length: int, seed: int = 0) -> Int[Tensor, "n L"]:
    """n_sequences stationary token sequences [n_sequences, length] (int64); see `sample_with_states`."""
    return sample_with_states(process, n_sequences, length, seed).tokens
