"""Toy tasks: every sampled answer checked against an independent formula, the vocabulary layouts, the errors."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.toy.tasks import (
    ModularAdditionTask,
    OVCoherentTask,
    SkipTrigramTask,
    TaskBatch,
    make_task,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair_output_id(a: int, b: int, n_signal: int = 4, n_inputs: int = 12) -> int:
    """C({a, b}) by counting: the pairs (x, y), x ≤ y, listed row by row; row x holds n_signal - x + 1 pairs."""
    a, b = min(a, b), max(a, b)
    return n_inputs + sum(n_signal - x + 1 for x in range(1, a)) + (b - a)


def only_last_counts(batch: TaskBatch) -> bool:
    expected = torch.zeros_like(batch.mask)
    expected[:, -1] = True
    return bool((batch.mask == expected).all())


def test_ov_coherent_layout_matches_the_issue():
    task = make_task("ov-coherent")
    assert isinstance(task, OVCoherentTask)
    assert (task.d_vocab, task.n_ctx) == (22, 8)
    names = task.token_names()
    assert names[:6] == ["[0]", "S1", "S2", "S3", "S4", "N5"] and names[11] == "N11"
    assert names[12:17] == ["C(1,1)", "C(1,2)", "C(1,3)", "C(1,4)", "C(2,2)"] and names[21] == "C(4,4)"
    assert task.input_tokens() == list(range(12)) and task.output_tokens() == list(range(12, 22))
    assert task.pairs() == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4), (3, 3), (3, 4), (4, 4)]
    assert [pair_output_id(a, b) for a, b in [(1, 1), (2, 1), (2, 2), (4, 3), (4, 4)]] == [12, 13, 16, 20, 21]
    assert task.spec() == "ov-coherent"


def test_ov_coherent_targets_are_the_output_of_the_pair_of_signal_tokens():
    task = make_task("ov-coherent")
    batch = task.sample(3000, gen())
    assert only_last_counts(batch)
    assert (batch.tokens[:, -1] == 0).all() and (batch.tokens[:, :-1] != 0).all()   # read-off last, only there
    is_signal = (batch.tokens >= 1) & (batch.tokens <= 4)
    assert (is_signal.sum(1) == 2).all()                                              # exactly two signal tokens
    assert ((batch.tokens >= 5) | is_signal | (batch.tokens == 0)).all()              # noise elsewhere (ids 5..11)
    assert (batch.tokens <= 11).all()
    expected = [pair_output_id(*row[(row >= 1) & (row <= 4)].tolist()) for row in batch.tokens]
    assert batch.targets[:, -1].tolist() == expected
    pairs = task.pair_of(batch)
    assert (pairs[:, 0] <= pairs[:, 1]).all()
    assert [task.pairs()[t - 12] for t in expected] == [tuple(p) for p in pairs.tolist()]
    # Two independent uniform draws: each of the 10 outputs occurs; A = B a quarter of the time.
    assert set(expected) == set(range(12, 22))
    assert (pairs[:, 0] == pairs[:, 1]).float().mean() == pytest.approx(0.25, abs=0.03)
    # Signal positions uniform over the first 7: the last noise slot also holds a signal token sometimes.
    assert is_signal[:, 6].any() and is_signal[:, 0].any()


def test_sampling_is_reproducible_from_the_generator():
    task = make_task("ov-coherent")
    a, b, c = task.sample(50, gen(1)), task.sample(50, gen(1)), task.sample(50, gen(2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_skip_trigram_answers_c_of_b_only_when_the_source_occurred():
    task = make_task("skip-trigram:k=4")
    assert isinstance(task, SkipTrigramTask)
    assert task.d_vocab == 12 + 4 + 1 and task.none_id == 16
    assert task.token_names()[:6] == ["[0]", "[1]", "[2]", "[3]", "[4]", "N5"]
    assert task.token_names()[12:] == ["C(1)", "C(2)", "C(3)", "C(4)", "none"]
    assert task.output_tokens() == [12, 13, 14, 15, 16]
    batch = task.sample(4000, gen())
    assert only_last_counts(batch)
    last = batch.tokens[:, -1]
    assert ((last >= 1) & (last <= 4)).all()
    body = batch.tokens[:, :-1]
    n_source = (body == 0).sum(1)
    assert (n_source <= 1).all() and ((body == 0) | (body >= 5)).all()            # [0] at most once, else noise
    expected = [12 + b - 1 if s else 16 for b, s in zip(last.tolist(), n_source.tolist())]
    assert batch.targets[:, -1].tolist() == expected
    assert n_source.float().mean() == pytest.approx(0.5, abs=0.03)
    # The none-case: the same destination gives both answers, so the current token alone cannot tell.
    for b in range(1, 5):
        assert {t for t, d in zip(expected, last.tolist()) if d == b} == {12 + b - 1, 16}


def test_modular_addition_split_is_disjoint_complete_and_seeded():
    task = make_task("modular-addition:p=7,train_fraction=0.3")
    assert isinstance(task, ModularAdditionTask)
    assert (task.d_vocab, task.n_ctx) == (8, 3) and task.token_names()[-1] == "="
    train, test = task.train_batch(), task.test_batch()
    assert len(train.tokens) == 15 and len(test.tokens) == 34          # round(0.3 · 49) = 15
    pairs = lambda b: {tuple(r) for r in b.tokens[:, :2].tolist()}  # noqa: E731
    assert pairs(train).isdisjoint(pairs(test))
    assert pairs(train) | pairs(test) == {(a, b) for a in range(7) for b in range(7)}
    for batch in (train, test):
        assert only_last_counts(batch) and (batch.tokens[:, 2] == 7).all()
        assert batch.targets[:, -1].tolist() == [(a + b) % 7 for a, b in batch.tokens[:, :2].tolist()]
    again = make_task("modular-addition:p=7,train_fraction=0.3")
    other = make_task("modular-addition:p=7,train_fraction=0.3,split_seed=1")
    assert pairs(again.train_batch()) == pairs(train) and pairs(other.train_batch()) != pairs(train)
    assert pairs(task.sample(200, gen())) <= pairs(train)
    rebuilt = make_task(task.spec())
    assert rebuilt.spec() == task.spec() and pairs(rebuilt.train_batch()) == pairs(train)


@pytest.mark.parametrize("spec, message", [
    ("skip-trigram:k=11", r"k = 11 destination tokens do not fit .* n_inputs = 12"),
    ("skip-trigram:k=0", "k >= 1"),
    ("modular-addition:p=1", "p >= 2"),
    ("modular-addition:p=5,train_fraction=1.0", "both splits must be non-empty"),
    ("ov-coherent:n_ctx=2", "n_ctx >= 3"),
    ("ov-coherent:n_noise=0", "n_noise >= 1"),
    ("ov-coherent:n_signal=x", "takes a int"),
    ("modular-addition:q=3", "fields: p, split_seed, train_fraction"),
    ("grokking", "unknown task 'grokking'; valid: ov-coherent, skip-trigram, modular-addition"),
    ("python:missing_file.py:f", "no file missing_file.py"),
    ("python:nofunction", "is not python:path/to/file.py:function"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(InterplabError, match=message):
        make_task(spec)


USER_TASK = '''
import torch

def copy_first(n, generator):
    """The last position must name the first token (ids 0..4)."""
    tokens = torch.randint(0, 5, (n, 4), generator=generator)
    targets = torch.zeros_like(tokens)
    targets[:, -1] = tokens[:, 0]
    mask = torch.zeros(n, 4, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, targets, mask

copy_first.d_vocab = 6

def ragged(n, generator):
    return torch.zeros(n, 3, dtype=torch.long), torch.zeros(n, 4, dtype=torch.long), torch.ones(n, 3)
'''


def test_user_task_from_a_python_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(USER_TASK)
    task = make_task(f"python:{path}:copy_first")
    assert (task.d_vocab, task.n_ctx) == (6, 4) and task.spec() == f"python:{path}:copy_first"
    batch = task.sample(100, gen())
    assert torch.equal(batch.targets[:, -1], batch.tokens[:, 0]) and only_last_counts(batch)
    assert task.output_tokens() == [0, 1, 2, 3, 4] and task.input_tokens() == list(range(6))
    with pytest.raises(InterplabError, match="same shape"):
        make_task(f"python:{path}:ragged")
    with pytest.raises(InterplabError, match="has no attribute 'nope'"):
        make_task(f"python:{path}:nope")


def test_user_task_from_a_module_may_be_a_task_object():
    task = make_task("python:interplab.toy.tasks:SkipTrigramTask")
    assert isinstance(task, SkipTrigramTask) and task.d_vocab == 17


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", "just some words\n", r"notes.txt is not a Python file \(\.py\)"),
    ("broken.py", "def f(n, generator:\n    return 1\n", r"broken.py is not valid Python \(line 1"),
    ("binary.py", b"\xff\xfe\x00\x01garbage", r"binary.py is not valid Python"),
    ("fails.py", "import no_such_module_for_interplab\n", r"running .*fails.py raised ModuleNotFoundError"),
    ("ok.py", USER_TASK, r"has no attribute 'missing'"),
    ("args.py", "def f():\n    return 1\n", r"f\(\) cannot be called as f\(n, generator\)"),
    ("value.py", "f = 3\n", r"f is neither a Task nor a function"),
    ("raises.py", "def f(n, generator):\n    raise RuntimeError('boom')\n", r"raised RuntimeError .*: boom"),
])
def test_a_user_task_that_is_not_a_task_function_is_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    attr = "missing" if name == "ok.py" else "f"
    with pytest.raises(InterplabError, match=message) as info:
        make_task(f"python:{path}:{attr}")
    assert "\n" not in str(info.value)
