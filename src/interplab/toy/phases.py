"""Phased evaluation of a training run: cheap evals all the time, thorough ones only once the model qualifies.

After Chan's phased testing: a run carries named phases, each a set of evals with a cadence. A phase may wait for
a condition before it starts (the thorough phase waits until the model qualifies), end at a gate (a condition
that, once it holds, means the phase's question is answered), stop training some steps after its gate, or abort
training when a safety condition holds. For example, for grokking:

    qualification = Phase("qualification", {"train_acc": train_acc, "train_loss": train_loss}, every=50)
    safety = Phase("safety", {"loss_finite": finite, "weight_norm": norm}, every=50,
                   abort_when="safety.loss_finite < 1 or safety.weight_norm > 1000")
    thorough = Phase("thorough", {"test_acc": test_acc, "test_loss": test_loss}, every=50,
                     starts_when="qualification.train_acc >= 0.99", ends_when="thorough.test_acc >= 0.99",
                     stop_after=500)
    schedule = Schedule([qualification, safety, thorough], log=write_jsonl_line)
    for step in range(1, steps + 1):
        train_one_step()
        if schedule.evaluate(step, last=step == steps):
            break                                   # schedule.stop_reason says why

Conditions are strings "PHASE.METRIC OP NUMBER" (OP one of >=, >, <=, <, ==, !=), joined by " and " when all must
hold and by " or " when one side suffices; `and` binds tighter, as in Python: "a and b or c" is "(a and b) or c".
There are no parentheses: any combination can be written as an `or` of `and`s. A condition reads the latest value
of the metric; one never measured (or NaN) does not hold.

Each eval is a function of no arguments returning one float (close over the model). Every eval round logs
{"step", "event": "eval", "phase", "metrics": {...}}; every transition logs {"step", "event": "start" | "gate" |
"stop" | "abort", "phase", "because"}.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from interplab.errors import InterplabError

EvalFn = Callable[[], float]
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    """PHASE.METRIC OP VALUE: holds when the latest measured value of the metric compares true."""

    phase: str
    metric: str
    op: str
    value: float

    def holds(self, latest: dict[str, dict[str, float]]) -> bool:
        measured = latest.get(self.phase, {}).get(self.metric)
        return measured is not None and not math.isnan(measured) and OPERATORS[self.op](measured, self.value)

    def __str__(self) -> str:
        return f"{self.phase}.{self.metric} {self.op} {self.value:g}"


Clause = tuple[Condition, ...]
"""Conditions that must all hold (joined by `and`)."""
Either = tuple[Clause, ...]
"""Clauses of which one must hold (joined by `or`); empty: never holds."""


def _parse_one(text: str) -> Condition:
    match = _CONDITION.match(text)
    value = None
    if match:
        try:
            value = float(match.group(4))
        except ValueError:
            value = None
    if match is None or value is None:
        raise InterplabError(f"condition {text.strip()!r} is not PHASE.METRIC OP NUMBER with OP one of "
                             f"{', '.join(OPERATORS)} (e.g. 'qualification.train_acc >= 0.99'; join several "
                             "with ' and ' or ' or ')")
    return Condition(match.group(1), match.group(2), match.group(3), value)


def parse_condition(text: str) -> Either:
    """'a and b or c' → ((a, b), (c,)): the clauses joined by ' or ', each the conditions joined by ' and ' (`and`
    binds tighter than `or`)."""
    return tuple(tuple(_parse_one(part) for part in clause.split(" and ")) for clause in text.split(" or "))


Conditions = str | Condition | Sequence[Condition | Clause] | None
"""A condition as Phase accepts it: a string, one Condition, or a sequence whose items are alternatives (`or`),
each a Condition or a Clause of Conditions that must all hold."""


def _as_conditions(when: Conditions) -> Either:
    if when is None:
        return ()
    if isinstance(when, str):
        return parse_condition(when)
    if isinstance(when, Condition):
        return ((when,),)
    return tuple((item,) if isinstance(item, Condition) else tuple(item) for item in when)


@dataclass
class Phase:
    """A named set of evals run every `every` steps while the phase is active."""

    name: str
    evals: dict[str, EvalFn]
    """Metric name → a function of no arguments returning its value."""
    every: int
    """Steps between eval rounds, counted from the step the phase started."""
    starts_when: Conditions = None
    """The phase waits until this holds (None: active from step 0)."""
    ends_when: Conditions = None
    """Its gate: once this holds the phase ends (its evals stop)."""
    stop_after: int | None = None
    """Stop training this many steps after the gate passed (None: train on)."""
    abort_when: Conditions = None
    """Stop training at once, as a failure, when this holds (a safety gate)."""

    def __post_init__(self) -> None:
        self.starts_when, self.ends_when, self.abort_when = (
            _as_conditions(self.starts_when), _as_conditions(self.ends_when), _as_conditions(self.abort_when))
        if self.every < 1:
            raise InterplabError(f"phase {self.name!r}: every must be >= 1, got {self.every}")
        if self.stop_after is not None and (self.stop_after < 0 or not self.ends_when):
            raise InterplabError(f"phase {self.name!r}: stop_after needs a gate (ends_when) and must be >= 0")


@dataclass
class PhaseState:
    """Where a phase is: waiting, active (since `started`), or done (gate passed at `ended`)."""

    started: int | None = None
    ended: int | None = None

    @property
    def active(self) -> bool:
        return self.started is not None and self.ended is None


@dataclass
class Schedule:
    """Runs the phases' evals at their steps, moves phases along, and says when training should stop."""

    phases: list[Phase]
    log: Callable[[dict[str, Any]], None] = lambda record: None
    """Receives every eval result and transition (toy_train writes them to log.jsonl)."""
    states: dict[str, PhaseState] = field(default_factory=dict)
    latest: dict[str, dict[str, float]] = field(default_factory=dict)
    """Phase → metric → its latest value."""
    stop_at: int | None = None
    """The step at which a passed gate ends training."""
    stop_note: str | None = None
    """What the stop at `stop_at` will say."""
    stop_reason: str | None = None
    """Why training stopped (set when `evaluate` returns True)."""

    def __post_init__(self) -> None:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise InterplabError(f"phase names must be distinct, got {names}")
        metrics = {p.name: sorted(p.evals) for p in self.phases}
        for phase in self.phases:
            for cond in (c for clause in (*phase.starts_when, *phase.ends_when, *phase.abort_when) for c in clause):
                if cond.phase not in metrics:
                    raise InterplabError(f"condition '{cond}' names unknown phase {cond.phase!r}; phases: "
                                         f"{', '.join(names)}")
                if cond.metric not in metrics[cond.phase]:
                    raise InterplabError(f"condition '{cond}': phase {cond.phase} has no metric {cond.metric!r}; "
                                         f"its metrics: {', '.join(metrics[cond.phase])}")
        for name in names:
            self.states.setdefault(name, PhaseState())

    def evaluate(self, step: int, last: bool = False) -> bool:
        """Run what is due at `step` (after `step` updates; `last` runs every active phase), log it, and move the
        phases along; True when training should stop now."""
        if not any(s.started is not None for s in self.states.values()):
            self._start_unconditional(step)
        last = last or (self.stop_at is not None and step >= self.stop_at)
        ran: set[str] = set()
        while True:  # a phase that starts is evaluated at once; that may pass a gate, start another phase, …
            for phase in self.phases:
                state = self.states[phase.name]
                if state.active and phase.name not in ran and (last or (step - state.started) % phase.every == 0):
                    self._run(phase, step)
                    ran.add(phase.name)
            if not self._transitions(step):
                break
        if self.stop_reason is None and self.stop_at is not None and step >= self.stop_at:
            self.stop_reason = self.stop_note
            self.log({"step": step, "event": "stop", "phase": None, "because": self.stop_reason})
        return self.stop_reason is not None

    def started(self, name: str) -> int | None:
        """The step at which phase `name` started (None: it has not)."""
        return self.states[name].started

    def _start_unconditional(self, step: int) -> None:
        for phase in self.phases:
            if not phase.starts_when and self.states[phase.name].started is None:
                self.states[phase.name].started = step
                self.log({"step": step, "event": "start", "phase": phase.name, "because": "always on"})

    def _run(self, phase: Phase, step: int) -> None:
        values = {name: float(fn()) for name, fn in phase.evals.items()}
        self.latest[phase.name] = values
        self.log({"step": step, "event": "eval", "phase": phase.name, "metrics": values})

    def _because(self, either: Either) -> str | None:
        """The first clause that holds, each of its conditions with the value that made it hold."""
        for clause in either:
            if all(cond.holds(self.latest) for cond in clause):
                return " and ".join(f"{cond} ({self.latest[cond.phase][cond.metric]:.6g})" for cond in clause)
        return None

    def _transitions(self, step: int) -> bool:
        """Apply every start, gate and abort that holds now; True if a phase started (it must be evaluated)."""
        started = False
        for phase in self.phases:
            state = self.states[phase.name]
            if self.stop_reason is None and (why := self._because(phase.abort_when)):
                self.stop_reason = f"aborted by {phase.name}: {why}"
                self.log({"step": step, "event": "abort", "phase": phase.name, "because": why})
            if state.started is None and (why := self._because(phase.starts_when)):
                state.started, started = step, True
                self.log({"step": step, "event": "start", "phase": phase.name, "because": why})
            elif state.active and (why := self._because(phase.ends_when)):
                state.ended = step
                self.log({"step": step, "event": "gate", "phase": phase.name, "because": why})
                if phase.stop_after is not None and self.stop_at is None:
                    self.stop_at = step + phase.stop_after
                    self.stop_note = f"{phase.name} gate passed at step {step}; stopped {phase.stop_after} steps later"
        return started

    # ---- resume --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"states": {n: [s.started, s.ended] for n, s in self.states.items()}, "latest": self.latest,
                "stop_at": self.stop_at, "stop_note": self.stop_note, "stop_reason": self.stop_reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.states = {n: PhaseState(*state["states"][n]) for n in self.states}
        self.latest = {k: dict(v) for k, v in state["latest"].items()}
        self.stop_at, self.stop_note, self.stop_reason = state["stop_at"], state["stop_note"], state["stop_reason"]
