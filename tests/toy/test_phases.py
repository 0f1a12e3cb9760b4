"""Phased evaluation: scripted metrics drive starts, gates, stops and aborts at the steps worked out by hand."""

from __future__ import annotations

import math

import pytest

from interplab.errors import InterplabError
from interplab.toy.phases import Condition, Phase, Schedule, parse_condition


class Scripted:
    """A fake eval: its value at each step comes from a function of the step, and it records when it ran."""

    def __init__(self, clock: dict[str, int], value):
        self.clock, self.value, self.calls = clock, value, []

    def __call__(self) -> float:
        self.calls.append(self.clock["step"])
        return self.value(self.clock["step"])


def grokking_like(clock, stop_after=10):
    """train_acc reaches 0.9 at step 30; test_acc (measured every 5 steps) reaches 0.99 at step 45."""
    train = Scripted(clock, lambda s: min(1.0, s * 3 / 100))       # 0.0, 0.3, 0.6, 0.9 at steps 0, 10, 20, 30
    test = Scripted(clock, lambda s: 1.0 if s >= 45 else 0.1)
    phases = [Phase("qualification", {"train_acc": train}, every=10),
              Phase("thorough", {"test_acc": test}, every=5, starts_when="qualification.train_acc >= 0.9",
                    ends_when="thorough.test_acc >= 0.99", stop_after=stop_after)]
    return phases, train, test


def drive(schedule: Schedule, clock, steps: range, last_step: int | None = None) -> int | None:
    """Evaluate at every step of `steps` (the run's last step: `last_step`, default the last of `steps`)."""
    last_step = steps[-1] if last_step is None else last_step
    for step in steps:
        clock["step"] = step
        if schedule.evaluate(step, last=step == last_step):
            return step
    return None


def test_parse_condition_and_or_clauses():
    a = Condition("qualification", "train_acc", ">=", 0.99)
    assert parse_condition("qualification.train_acc >= 0.99") == ((a,),)
    either = parse_condition("safety.loss_finite < 1 or safety.weight_norm > 1e3")
    finite, norm = Condition("safety", "loss_finite", "<", 1.0), Condition("safety", "weight_norm", ">", 1000.0)
    assert either == ((finite,), (norm,))
    assert str(either[1][0]) == "safety.weight_norm > 1000"


def test_and_binds_tighter_than_or():
    a, b, c = (Condition("q", "x", ">=", 1.0), Condition("s", "y", "<", 2.0), Condition("t", "z", "==", 3.0))
    assert parse_condition("q.x >= 1 and s.y < 2") == ((a, b),)
    # "a and b or c" is "(a and b) or c"; "a or b and c" is "a or (b and c)"
    assert parse_condition("q.x >= 1 and s.y < 2 or t.z == 3") == ((a, b), (c,))
    assert parse_condition("q.x >= 1 or s.y < 2 and t.z == 3") == ((a,), (b, c))


@pytest.mark.parametrize("values, holds", [
    # (q.x, s.y, t.z) → (q.x >= 1 and s.y < 2) or t.z == 3, worked out by hand
    ((1.0, 1.0, 0.0), True),     # both sides of the `and`
    ((1.0, 5.0, 0.0), False),    # s.y fails the `and`, t.z fails the `or`
    ((0.0, 1.0, 0.0), False),    # q.x fails the `and`
    ((0.0, 5.0, 3.0), True),     # the `or` side alone
    ((None, 1.0, 0.0), False),   # q.x NaN (as if never measured): its condition does not hold
])
def test_and_or_conditions_start_a_phase_exactly_when_they_hold(values, holds):
    x, y, z = (math.nan if v is None else v for v in values)
    schedule = Schedule([Phase("q", {"x": lambda: x}, every=1), Phase("s", {"y": lambda: y}, every=1),
                         Phase("t", {"z": lambda: z}, every=1),
                         Phase("late", {"v": lambda: 0.0}, every=1, starts_when="q.x >= 1 and s.y < 2 or t.z == 3")])
    schedule.evaluate(0)
    assert (schedule.started("late") == 0) is holds


def test_the_start_because_names_every_condition_of_the_clause_that_held():
    clock, log = {"step": 0}, []
    acc = Scripted(clock, lambda s: min(1.0, s / 100))               # 0.9 at step 90
    norm = Scripted(clock, lambda s: 50.0 if s < 60 else 5.0)         # below 10 from step 60
    phases = [Phase("qualification", {"train_acc": acc}, every=10),
              Phase("safety", {"weight_norm": norm}, every=20),       # measured at 0, 20, 40, 60, 80, 100
              Phase("thorough", {"test_acc": lambda: 1.0}, every=5,
                    starts_when="qualification.train_acc >= 0.5 and safety.weight_norm < 10")]
    schedule = Schedule(phases, log=log.append)
    drive(schedule, clock, range(0, 100), last_step=1000)
    # train_acc >= 0.5 from step 50, but the norm is first seen below 10 at step 60: the start waits for both
    start = next(r for r in log if r["event"] == "start" and r["phase"] == "thorough")
    assert start["step"] == 60
    assert start["because"] == "qualification.train_acc >= 0.5 (0.6) and safety.weight_norm < 10 (5)"


@pytest.mark.parametrize("text", ["train_acc >= 0.9", "qualification.train_acc => 0.9", "q.acc >= high", "q.acc"])
def test_malformed_conditions_are_clear_errors(text):
    with pytest.raises(InterplabError, match=r"is not PHASE.METRIC OP NUMBER .*e.g. 'qualification.train_acc"):
        parse_condition(text)
    with pytest.raises(InterplabError, match="is not PHASE.METRIC OP NUMBER"):
        parse_condition(f"q.x >= 1 and {text}")


def test_conditions_naming_unknown_phases_or_metrics_list_the_valid_ones():
    q = Phase("qualification", {"train_acc": lambda: 1.0, "train_loss": lambda: 0.0}, every=1)
    with pytest.raises(InterplabError, match="unknown phase 'qualifcation'; phases: qualification, thorough"):
        Schedule([q, Phase("thorough", {"test_acc": lambda: 1.0}, every=1,
                           starts_when="qualifcation.train_acc >= 0.9")])
    with pytest.raises(InterplabError, match="has no metric 'acc'; its metrics: train_acc, train_loss"):
        Schedule([q, Phase("thorough", {"test_acc": lambda: 1.0}, every=1, starts_when="qualification.acc >= 0.9")])
    with pytest.raises(InterplabError, match="stop_after needs a gate"):
        Phase("thorough", {"test_acc": lambda: 1.0}, every=1, stop_after=5)


def test_transitions_happen_at_the_hand_computed_steps_and_are_logged():
    clock, log = {"step": 0}, []
    phases, train, test = grokking_like(clock)
    schedule = Schedule(phases, log=log.append)
    stopped = drive(schedule, clock, range(0, 200))
    # Qualification at 0, 10, 20, 30 → 0.9 at 30 starts thorough, evaluated at once and every 5 steps after;
    # its gate passes at 45; stop_after = 10 → training stops at 55, with every active phase evaluated there.
    assert stopped == 55 and schedule.stop_reason == "thorough gate passed at step 45; stopped 10 steps later"
    assert test.calls == [30, 35, 40, 45]
    assert train.calls == [0, 10, 20, 30, 40, 50, 55]
    events = [(r["step"], r["event"], r["phase"]) for r in log if r["event"] != "eval"]
    assert events == [(0, "start", "qualification"), (30, "start", "thorough"), (45, "gate", "thorough"),
                      (55, "stop", None)]
    start = next(r for r in log if r["event"] == "start" and r["phase"] == "thorough")
    assert start["because"] == "qualification.train_acc >= 0.9 (0.9)"
    evals = [(r["step"], r["phase"], r["metrics"]) for r in log if r["event"] == "eval"]
    assert (45, "thorough", {"test_acc": 1.0}) in evals and (30, "qualification", {"train_acc": 0.9}) in evals
    assert schedule.started("thorough") == 30 and schedule.states["thorough"].ended == 45


def test_without_stop_after_the_run_goes_on_and_the_last_step_evaluates_every_active_phase():
    clock, log = {"step": 0}, []
    phases, train, test = grokking_like(clock, stop_after=None)
    phases[1].ends_when = parse_condition("thorough.test_acc >= 2")   # never passes
    schedule = Schedule(phases, log=log.append)
    assert drive(schedule, clock, range(0, 38)) is None
    assert test.calls == [30, 35, 37] and train.calls == [0, 10, 20, 30, 37]


def test_a_safety_condition_aborts_and_nan_never_satisfies_a_comparison():
    clock, log = {"step": 0}, []
    norm = Scripted(clock, lambda s: float("nan") if s >= 20 else 1.0)
    finite = Scripted(clock, lambda s: 0.0 if s >= 40 else 1.0)
    safety = Phase("safety", {"weight_norm": norm, "loss_finite": finite}, every=10,
                   abort_when="safety.weight_norm > 100 or safety.loss_finite < 1")
    schedule = Schedule([safety], log=log.append)
    assert drive(schedule, clock, range(0, 100)) == 40          # NaN at 20, 30 is not "> 100"; 0 < 1 at 40
    assert schedule.stop_reason == "aborted by safety: safety.loss_finite < 1 (0)"
    assert log[-1] == {"step": 40, "event": "abort", "phase": "safety", "because": "safety.loss_finite < 1 (0)"}
    assert math.isnan(schedule.latest["safety"]["weight_norm"])


def test_a_schedule_restored_from_its_state_continues_exactly():
    clock, log_a = {"step": 0}, []
    drive(Schedule(grokking_like(clock)[0], log=log_a.append), clock, range(0, 200))

    log_b: list = []
    first = Schedule(grokking_like(clock)[0], log=log_b.append)
    drive(first, clock, range(0, 37), last_step=199)              # checkpointed after step 36, in the thorough phase
    state = first.state_dict()
    assert state["states"]["thorough"] == [30, None]
    second = Schedule(grokking_like(clock)[0], log=log_b.append)  # a fresh process resumes from the state
    second.load_state_dict(state)
    drive(second, clock, range(37, 200))
    assert log_b == log_a
