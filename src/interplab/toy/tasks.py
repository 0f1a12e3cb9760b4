"""Toy-transformer tasks: seeded generators of token sequences with the exact answer, for circuits one can read.

    ov-coherent                                  [A] … [B] … [readoff] → C({A, B})   (12 inputs, 10 outputs)
    skip-trigram:k=4                             [0] … [b] → C(b); no [0] → "none"
    modular-addition:p=59,train_fraction=0.3     [a] [b] [=] → (a + b) mod p   (grokking; fixed train/test split)
    python:path/to/file.py:function              a user task (see `PythonTask`)
    python:package.module:function

Every task lays its vocabulary out as input tokens then output tokens (modular addition shares them: the outputs
are the numbers), samples `TaskBatch(tokens, targets, mask)`, and says which positions count (`mask`): loss and
accuracy are taken there only. Settings after the colon are the fields of the task's config dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interplab.config import parse_spec_settings
from interplab.errors import InterplabError
from interplab.toy.user_code import check_callable_as, load_python_object


class TaskBatch(NamedTuple):
    """A batch of examples with its exact answers."""

    tokens: Int[Tensor, "batch pos"]
    """Input token ids."""
    targets: Int[Tensor, "batch pos"]
    """The exact answer at each position (meaningless where `mask` is False)."""
    mask: Bool[Tensor, "batch pos"]
    """Where loss and accuracy count (ov-coherent, skip-trigram, modular addition: the last position only)."""


class Task(ABC):
    """A toy task: a vocabulary of d_vocab ids (inputs, then outputs), sequences of n_ctx tokens."""

    name: str
    d_vocab: int
    n_ctx: int

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        """n fresh examples drawn with `generator` (on the CPU: the caller moves them)."""

    @abstractmethod
    def token_names(self) -> list[str]:
        """A short label per token id."""

    @abstractmethod
    def input_tokens(self) -> list[int]:
        """Ids on the input axis of the EQKE / EVOU read-outs."""

    @abstractmethod
    def output_tokens(self) -> list[int]:
        """Ids on the output axis of the read-outs: the possible answers."""

    @abstractmethod
    def spec(self) -> str:
        """The spec string that rebuilds this task with `make_task`."""


TaskFunction = Callable[[int, torch.Generator], Sequence[Tensor | list]]
"""A user task's function: (n, generator) → (tokens, targets, mask), each [n, pos]."""


def _spec_of(name: str, cfg: object) -> str:
    """"name:field=value,..." listing every field that differs from its default."""
    changed = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)  # type: ignore[arg-type]
               if getattr(cfg, f.name) != f.default]
    return name + (":" + ",".join(changed) if changed else "")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise InterplabError(message)


def _answer_last(tokens: Int[Tensor, "n pos"], answer: Int[Tensor, " n"]) -> TaskBatch:
    """The batch whose one counted position, the last, holds `answer`."""
    targets = torch.zeros_like(tokens)
    targets[:, -1] = answer
    return TaskBatch(tokens, targets, torch.arange(tokens.shape[1]).expand_as(tokens) == tokens.shape[1] - 1)


def _random_positions(n: int, n_slots: int, k: int, generator: torch.Generator) -> Int[Tensor, "n k"]:
    """k distinct positions in [0, n_slots) per example, uniformly at random (the first k of a random permutation)."""
    return torch.rand(n, n_slots, generator=generator).argsort(dim=1)[:, :k]


# ---- OV-coherent pairs --------------------------------------------------------------------------------------------
@dataclass
class OVCoherentConfig:
    """[A] … [B] … [0] → C({A, B}): the read-off must copy which unordered pair of signal tokens occurred."""

    n_signal: int = 4
    """Signal tokens S1..S_n (ids 1..n_signal); the outputs are the n(n+1)/2 unordered pairs {A, B}, A = B included."""
    n_noise: int = 7
    """Noise tokens (ids after the signal tokens), filling every other position."""
    n_ctx: int = 8
    """Sequence length: A and B at two distinct random positions among the first n_ctx - 1, read-off [0] last."""


class OVCoherentTask(Task):
    """Ids: 0 = read-off [0], 1..n_signal = S1.., then noise N.., then one output per pair (A ≤ B, lexicographic).

    A and B are two independent uniform draws of a signal token (so A = B with probability 1/n_signal), placed at
    distinct random positions; the target at the read-off (the last position) is C({A, B}); nothing else counts."""

    name = "ov-coherent"

    def __init__(self, cfg: OVCoherentConfig | None = None):
        self.cfg = cfg = cfg or OVCoherentConfig()
        _need(cfg.n_signal >= 1, f"ov-coherent needs n_signal >= 1, got {cfg.n_signal}")
        _need(cfg.n_ctx >= 3, f"ov-coherent needs n_ctx >= 3 (A, B and the read-off), got {cfg.n_ctx}")
        _need(cfg.n_noise >= (1 if cfg.n_ctx > 3 else 0),
              f"ov-coherent with n_ctx {cfg.n_ctx} > 3 needs n_noise >= 1 to fill the other positions, "
              f"got {cfg.n_noise}")
        self.n_inputs = 1 + cfg.n_signal + cfg.n_noise
        self._pairs = [(a, b) for a in range(1, cfg.n_signal + 1) for b in range(a, cfg.n_signal + 1)]
        self.d_vocab = self.n_inputs + len(self._pairs)
        self.n_ctx = cfg.n_ctx
        # output_of[a, b] = the output id of the pair {a, b}, symmetric.
        self._output_of = torch.zeros(cfg.n_signal + 1, cfg.n_signal + 1, dtype=torch.long)
        for i, (a, b) in enumerate(self._pairs):
            self._output_of[a, b] = self._output_of[b, a] = self.n_inputs + i

    def pairs(self) -> list[tuple[int, int]]:
        """(A, B) with A ≤ B for each output id, in output-id order."""
        return list(self._pairs)

    def pair_of(self, batch: TaskBatch) -> Int[Tensor, "batch 2"]:
        """Each example's sorted (A, B), read from its tokens."""
        signal = (batch.tokens >= 1) & (batch.tokens <= self.cfg.n_signal)
        _need(bool((signal.sum(1) == 2).all()), "pair_of needs a batch of ov-coherent sequences (two signal tokens)")
        values = batch.tokens[signal].view(-1, 2)
        return values.sort(dim=1).values

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        c = self.cfg
        tokens = torch.randint(1 + c.n_signal, self.n_inputs, (n, c.n_ctx), generator=generator) if c.n_noise \
            else torch.zeros(n, c.n_ctx, dtype=torch.long)
        ab = torch.randint(1, c.n_signal + 1, (n, 2), generator=generator)
        tokens.scatter_(1, _random_positions(n, c.n_ctx - 1, 2, generator), ab)
        tokens[:, -1] = 0
        return _answer_last(tokens, self._output_of[ab[:, 0], ab[:, 1]])

    def token_names(self) -> list[str]:
        c = self.cfg
        return (["[0]"] + [f"S{i}" for i in range(1, c.n_signal + 1)]
                + [f"N{i}" for i in range(1 + c.n_signal, self.n_inputs)] + [f"C({a},{b})" for a, b in self._pairs])

    def input_tokens(self) -> list[int]:
        return list(range(self.n_inputs))

    def output_tokens(self) -> list[int]:
        return list(range(self.n_inputs, self.d_vocab))

    def spec(self) -> str:
        return _spec_of(self.name, self.cfg)


# ---- OV-incoherent skip-trigrams -----------------------------------------------------------------------------------
@dataclass
class SkipTrigramConfig:
    """[0] … [b] → C(b): the answer names the destination b, but only if the source [0] occurred earlier."""

    k: int = 4
    """Destination tokens [1]..[k] (ids 1..k); outputs C(1)..C(k) and "none"."""
    n_inputs: int = 12
    """Input vocabulary: [0], the k destinations, and n_inputs - k - 1 noise tokens (at least one)."""
    n_ctx: int = 8
    """Sequence length; the destination b is always the last token."""
    p_source: float = 0.5
    """Probability that a sequence holds [0] (at one random earlier position)."""


class SkipTrigramTask(Task):
    """Ids: 0 = source [0], 1..k = destinations, k+1..n_inputs-1 = noise, then C(1)..C(k), then "none".

    Every sequence is noise with a uniform destination b at the last position; with probability p_source one
    random earlier position holds [0]. The target at the last position is C(b) if [0] occurred, else "none". The
    "none" case is what makes it a skip-trigram: without it C(b) would be a bigram of the current token, while here
    the answer needs attention from [b] back to [0] (whose OV output alone cannot say which b)."""

    name = "skip-trigram"

    def __init__(self, cfg: SkipTrigramConfig | None = None):
        self.cfg = cfg = cfg or SkipTrigramConfig()
        _need(cfg.k >= 1, f"skip-trigram needs k >= 1, got {cfg.k}")
        _need(cfg.k <= cfg.n_inputs - 2,
              f"skip-trigram k = {cfg.k} destination tokens do not fit an input vocabulary of n_inputs = "
              f"{cfg.n_inputs}: [0], the k destinations and at least one noise token need k <= n_inputs - 2 = "
              f"{cfg.n_inputs - 2}")
        _need(cfg.n_ctx >= 2, f"skip-trigram needs n_ctx >= 2 ([0] then [b]), got {cfg.n_ctx}")
        _need(0 <= cfg.p_source <= 1, f"skip-trigram p_source must be in [0, 1], got {cfg.p_source}")
        self.d_vocab = cfg.n_inputs + cfg.k + 1
        self.n_ctx = cfg.n_ctx
        self.none_id = self.d_vocab - 1

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        c = self.cfg
        tokens = torch.randint(c.k + 1, c.n_inputs, (n, c.n_ctx), generator=generator)
        b = torch.randint(1, c.k + 1, (n,), generator=generator)
        tokens[:, -1] = b
        has_source = torch.rand(n, generator=generator) < c.p_source
        where = torch.randint(0, c.n_ctx - 1, (n,), generator=generator)
        rows = has_source.nonzero().squeeze(1)
        tokens[rows, where[rows]] = 0
        return _answer_last(tokens, torch.where(has_source, c.n_inputs + b - 1, self.none_id))

    def token_names(self) -> list[str]:
        c = self.cfg
        return (["[0]"] + [f"[{i}]" for i in range(1, c.k + 1)] + [f"N{i}" for i in range(c.k + 1, c.n_inputs)]
                + [f"C({i})" for i in range(1, c.k + 1)] + ["none"])

    def input_tokens(self) -> list[int]:
        return list(range(self.cfg.n_inputs))

    def output_tokens(self) -> list[int]:
        return list(range(self.cfg.n_inputs, self.d_vocab))

    def spec(self) -> str:
        return _spec_of(self.name, self.cfg)


# ---- modular addition ----------------------------------------------------------------------------------------------
@dataclass
class ModularAdditionConfig:
    """[a] [b] [=] → (a + b) mod p, trained on a fixed fraction of the p² pairs (grokking, Power et al. 2022)."""

    p: int = 59
    """The modulus; the numbers 0..p-1 are ids 0..p-1 and "=" is id p."""
    train_fraction: float = 0.35
    """Fraction of the p² pairs (a, b) in the train split; the rest is the test split (0.3 in Nanda et al. 2023
    with p = 113; with p = 59, 0.35 groks within minutes on a CPU)."""
    split_seed: int = 0
    """Seed of the random split."""


class ModularAdditionTask(Task):
    """Tokens [a, b, =], target (a + b) mod p at "=" (the last position), vocabulary p + 1.

    The split is a seeded random permutation of all p² ordered pairs, the first round(train_fraction · p²) being
    train; `train_batch()` / `test_batch()` return every pair of a split (full batch), `sample` draws train pairs."""

    name = "modular-addition"

    def __init__(self, cfg: ModularAdditionConfig | None = None):
        self.cfg = cfg = cfg or ModularAdditionConfig()
        _need(cfg.p >= 2, f"modular-addition needs p >= 2, got {cfg.p}")
        n_train = round(cfg.train_fraction * cfg.p ** 2)
        _need(0 < n_train < cfg.p ** 2,
              f"modular-addition train_fraction {cfg.train_fraction} leaves {n_train} of {cfg.p ** 2} pairs for "
              "training; both splits must be non-empty (0 < train_fraction < 1)")
        self.p, self.d_vocab, self.n_ctx = cfg.p, cfg.p + 1, 3
        order = torch.randperm(cfg.p ** 2, generator=torch.Generator().manual_seed(cfg.split_seed))
        self.train_pairs, self.test_pairs = order[:n_train], order[n_train:]   # pair (a, b) is index a · p + b

    def _batch(self, index: Int[Tensor, " n"]) -> TaskBatch:
        a, b = index // self.p, index % self.p
        return _answer_last(torch.stack([a, b, torch.full_like(a, self.p)], dim=1), (a + b) % self.p)

    def train_batch(self) -> TaskBatch:
        return self._batch(self.train_pairs)

    def test_batch(self) -> TaskBatch:
        return self._batch(self.test_pairs)

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        pick = torch.randint(0, len(self.train_pairs), (n,), generator=generator)
        return self._batch(self.train_pairs[pick])

    def token_names(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["="]

    def input_tokens(self) -> list[int]:
        return list(range(self.p + 1))

    def output_tokens(self) -> list[int]:
        return list(range(self.p))

    def spec(self) -> str:
        return _spec_of(self.name, self.cfg)


# ---- user tasks ----------------------------------------------------------------------------------------------------
class PythonTask(Task):
    """A user task: a function `fn(n, generator) -> (tokens, targets, mask)`, each [n, pos] (tensors or lists).

    Optional attributes on the function: `d_vocab` (else 1 + the largest id in 4096 probe examples),
    `token_names`, `input_tokens`, `output_tokens` (else every id / the targets seen at the mask)."""

    def __init__(self, fn: TaskFunction, spec: str):
        self.fn, self._spec, self.name = fn, spec, f"python:{getattr(fn, '__name__', 'task')}"
        probe = self._call(4096, torch.Generator().manual_seed(0), check_vocab=False)
        self.n_ctx = probe.tokens.shape[1]
        seen = max(int(probe.tokens.max()), int(probe.targets[probe.mask].max()))
        self.d_vocab = int(getattr(fn, "d_vocab", seen + 1))
        _need(seen < self.d_vocab, f"{spec}: token id {seen} >= its d_vocab {self.d_vocab}")
        self._outputs = sorted(set(probe.targets[probe.mask].tolist()))

    def _call(self, n: int, generator: torch.Generator, check_vocab: bool = True) -> TaskBatch:
        try:
            out = self.fn(n, generator)
        except Exception as err:  # the user's function failed: say which, in one line
            raise InterplabError(f"{self._spec} raised {type(err).__name__} when called with (n={n}, generator): "
                                 f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
        if not (isinstance(out, tuple | list) and len(out) == 3):
            raise InterplabError(f"{self._spec} must return (tokens, targets, mask), got {type(out).__name__}")
        tokens, targets, mask = (torch.as_tensor(x) for x in out)
        if tokens.ndim != 2 or tokens.shape != targets.shape or tokens.shape != mask.shape or len(tokens) != n:
            raise InterplabError(f"{self._spec} must return tokens, targets and mask of the same shape [n={n}, pos]; "
                                 f"got {list(tokens.shape)}, {list(targets.shape)}, {list(mask.shape)}")
        if tokens.is_floating_point() or targets.is_floating_point():
            raise InterplabError(f"{self._spec} must return integer tokens and targets")
        mask = mask.bool()
        if not bool(mask.any(1).all()):
            raise InterplabError(f"{self._spec}: every example needs at least one position in its mask")
        if check_vocab and (int(tokens.max()) >= self.d_vocab or int(targets[mask].max()) >= self.d_vocab):
            raise InterplabError(f"{self._spec} produced a token id >= d_vocab {self.d_vocab}; give the function a "
                                 "d_vocab attribute covering every id")
        if int(tokens.min()) < 0 or int(targets[mask].min()) < 0:
            raise InterplabError(f"{self._spec} produced a negative token id")
        return TaskBatch(tokens.long(), targets.long(), mask)

    def sample(self, n: int, generator: torch.Generator) -> TaskBatch:
        return self._call(n, generator)

    def token_names(self) -> list[str]:
        return list(getattr(self.fn, "token_names", [str(i) for i in range(self.d_vocab)]))

    def input_tokens(self) -> list[int]:
        return list(getattr(self.fn, "input_tokens", range(self.d_vocab)))

    def output_tokens(self) -> list[int]:
        return list(getattr(self.fn, "output_tokens", self._outputs))

    def spec(self) -> str:
        return self._spec


def _load_python(spec: str) -> Task:
    """The object "python:path/file.py:function" or "python:package.module:function" names, as a Task."""
    where, _, attr = spec[len("python:"):].rpartition(":")
    if not where or not attr:
        raise InterplabError(f"task spec {spec!r} is not python:path/to/file.py:function or "
                             "python:package.module:function")
    obj = load_python_object(f"task spec {spec!r}", where, attr)
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, type) and issubclass(obj, Task):
        return obj()
    _need(callable(obj), f"task spec {spec!r}: {attr} is neither a Task nor a function (n, generator)")
    check_callable_as(f"task spec {spec!r}", obj, attr, ("n", "generator"), (4096, torch.Generator()))
    return PythonTask(obj, spec)


TASKS: dict[str, tuple[type, type]] = {
    "ov-coherent": (OVCoherentConfig, OVCoherentTask),
    "skip-trigram": (SkipTrigramConfig, SkipTrigramTask),
    "modular-addition": (ModularAdditionConfig, ModularAdditionTask),
}
"""Task name → (config dataclass, task class)."""


def make_task(spec: str) -> Task:
    """Build the task a spec names, e.g. make_task("skip-trigram:k=4") (see the module docstring)."""
    if spec.startswith("python:"):
        return _load_python(spec)
    name = spec.partition(":")[0]
    if name not in TASKS:
        raise InterplabError(f"unknown task {name!r}; valid: {', '.join(TASKS)}, or python:FILE.py:FUNCTION "
                             "(e.g. skip-trigram:k=4)")
    config_cls, task_cls = TASKS[name]
    hints = typing.get_type_hints(config_cls)
    kinds = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    return task_cls(config_cls(**parse_spec_settings(spec, "task", kinds)))
