"""Clean/corrupted prompt pairs for patching: indirect object identification, induction, factual and structural
completions, and the user's own pairs from a JSONL file.

Every pair comes with a *null* prompt: another clean prompt of the same template whose metric tokens (`answer`,
`wrong`) are the same, so that patching from it should change nothing the metric measures. Clean, corrupted and null
prompts of a batch all have one token length (sweeps compare positions across pairs); text prompts start with the
tokenizer's BOS when it has one, as in training.

- `ioi`: "When Mary and John went to the store, John gave a drink to" -> " Mary" (answer = the indirect object IO,
  wrong = the subject S). Four sentence frames, each with IO first (ABBA) and S first (BABA): 8 templates. The
  corrupted prompt swaps the two names everywhere ("When John and Mary ..., Mary gave a drink to"), whose right
  answer is `wrong`: the logit difference flips sign. The null keeps the names in their roles and draws another
  place and object. Names, places and objects are kept only when they are one token with a leading space in the
  model's tokenizer.
- `induction`: BOS + R + R[:-1] for L random distinct ids R (L = 20, less when the context or vocabulary is short);
  answer R[-1]. The corrupted prompt replaces the first copy by L other random ids R' (disjoint from R), so the answer
  appears nowhere in it; wrong = R'[-1], the token standing where the answer stood in the first copy: it is in the
  corrupted context exactly as the answer is in the clean one, so the two prompts are symmetric (on SmolLM2 this in-context
  presence barely moves the corrupted logit difference: see below). The null is BOS + Q + Q[:-1] with Q = L-2 fresh ids + R[-2:]: induction predicts the same answer from
  different tokens. Ids come from the model's vocabulary (special ids excluded), so any model works, toys too.
- `factual`: the templates below (same subject, other filler words give the null: no template has two subjects with
  one answer), corrupted by swapping the subject for another with a different answer (wrong = that answer).

Templates kept: all six candidates, since SmolLM2-135M solves each (clean accuracy = fraction with answer logit >
wrong logit at the last position; corrupted accuracy = fraction with wrong > answer), measured over 192 pairs (32 a
template), seed 0 (seed 1 within 0.03), by
`python -c "from interplab.models import load_model; from interplab.circuits.prompts import *;
m = load_model('smollm2-135m', device='cpu'); print(clean_accuracy(m, load_pairs(m, 'factual', 192, 0)))"`:
capitals 1.00 / 1.00, opposites 1.00 / 1.00, counting 1.00 / 0.97, months 1.00 / 0.97, days 0.97 / 0.94,
plurals 0.97 / 0.94; overall 0.99 / 0.97, mean logit difference +5.3 clean, -5.0 corrupted. This is the pairwise
test the metric uses, not top-1: on ", "-separated days and months the model's top token is " and".
Same command with 'ioi', 64 pairs: clean 1.00, corrupted 1.00, logit difference +4.46 / -3.75. With 'induction',
64 pairs: clean 0.98 (logit difference +12.6); corrupted 0.48, -0.26: the corrupted prompt leaves the model at chance
between answer and wrong.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.errors import InterplabError, check_int
from interplab.models.hooked import HookedModel

NAMES = ("Mary John Tom James Dan Sid Martin Amy Paul Kate Anna Lisa Mark Sarah Jack Emma David Laura Alex Lucy Mike "
         "Rose Sam Ben").split()
PLACES = "store park school office house garden station hospital restaurant beach".split()
OBJECTS = "drink book ring bag key ball gift letter pen cake".split()
IOI_FRAMES = {
    "went-gave": "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "got-handed": "When {N1} and {N2} got to the {PLACE}, {S} handed a {OBJECT} to",
    "were-passed": "While {N1} and {N2} were at the {PLACE}, {S} passed a {OBJECT} to",
    "after-gave": "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
}
MIN_WORDS = {"names": 4, "places": 2, "objects": 2}
INDUCTION_LEN = 20


def _sequence(words: str, sep: str) -> tuple[tuple[str, ...], list[tuple[tuple[str, ...], str]]]:
    """Frames "a{sep} b{sep} c{sep}" for each separator, items (three consecutive words, the fourth)."""
    w = words.split()
    frames = tuple("{0}S {1}S {2}S".replace("S", s) for s in sep.split("|"))
    return frames, [((w[i], w[i + 1], w[i + 2]), w[i + 3]) for i in range(len(w) - 3)]


def _pairs(text: str) -> list[tuple[tuple[str, ...], str]]:
    return [((a,), b) for a, b in (item.split(":") for item in text.split())]


FACTUAL_CANDIDATES: dict[str, tuple[tuple[str, ...], list[tuple[tuple[str, ...], str]]]] = {
    "capitals": (("The capital city of {0} is", "The capital of {0} is called"), _pairs(
        "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Japan:Tokyo Russia:Moscow England:London China:Beijing "
        "Greece:Athens Canada:Ottawa Ireland:Dublin Austria:Vienna Norway:Oslo Portugal:Lisbon")),
    "opposites": (("The exact opposite of {0} is", "The true opposite of {0} is"), _pairs(
        "hot:cold big:small up:down good:bad left:right fast:slow day:night black:white open:closed high:low "
        "rich:poor happy:sad light:dark true:false")),
    "plurals": (("I have one {0} and two", "We have one {0} and two", "She saw one {0} and two"), _pairs(
        "cat:cats dog:dogs book:books car:cars tree:trees house:houses bird:birds apple:apples pen:pens girl:girls "
        "boy:boys cup:cups")),
    "counting": _sequence("one two three four five six seven eight nine ten", ",|;| and"),
    "days": _sequence("Monday Tuesday Wednesday Thursday Friday Saturday Sunday", ",|;| and"),
    "months": _sequence("January February March April May June July August September October November December",
                        ",|;| and"),
}
FACTUAL_KEPT = ("capitals", "opposites", "plurals", "counting", "days", "months")
"""The candidates SmolLM2-135M solves (clean accuracy >= 0.8 per template on 192 pairs; see the module docstring)."""


class PairBatch(NamedTuple):
    """Prompt pairs for patching: each row of `clean`, `corrupted` and `null` is one pair's prompt."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    null: Int[Tensor, "n pos"]
    """Another clean prompt of the same template with the same answer and wrong tokens (the null control)."""
    answer: Int[Tensor, " n"]
    """The token the clean prompt should predict at the last position."""
    wrong: Int[Tensor, " n"]
    """The competing token (on ioi, factual and induction: the one the corrupted prompt favours)."""
    template: list[str]


class _Texts(NamedTuple):
    clean: str
    corrupted: str
    null: str
    answer: str
    wrong: str


def load_pairs(model: HookedModel, spec: str, n: int, seed: int) -> PairBatch:
    """`n` prompt pairs of the built-in set `spec` ("ioi", "induction", "factual") or of the JSONL file `spec`,
    seeded by `seed` (a file's first n lines are used)."""
    check_int("n", n, 1)
    if spec == "induction":
        return _induction(model, n, seed)
    if spec not in ("ioi", "factual") and not spec.endswith(".jsonl"):
        raise InterplabError(f"prompt set {spec!r} is not valid; choose from ioi, induction, factual, or a .jsonl file")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InterplabError(f"prompt set {spec!r} is text and {model.info.spec} has no tokenizer; use induction")
    if spec.endswith(".jsonl"):
        return _from_jsonl(tokenizer, Path(spec), n)
    make = _ioi_maker(tokenizer) if spec == "ioi" else _factual_maker(tokenizer)
    return _generate(tokenizer, make, n, random.Random(seed), spec)


# ---- text sets ----------------------------------------------------------------------------------------------------
Maker = dict[str, Callable[[random.Random], _Texts]]
"""One function per template drawing a random pair of it."""


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` after BOS (when the tokenizer has one)."""
    ids = list(tokenizer([text], add_special_tokens=False)["input_ids"][0])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids if bos is None else [bos, *ids]


def _single(tokenizer: Any, text: str) -> int | None:
    """The id of `text` if it is exactly one token, else None."""
    ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
    return int(ids[0]) if len(ids) == 1 else None


def _single_words(tokenizer: Any, words: list[str], what: str) -> list[str]:
    """The words that are one token with a leading space; an error when fewer than MIN_WORDS[what] are."""
    kept = [w for w in words if _single(tokenizer, " " + w) is not None]
    if len(kept) < MIN_WORDS[what]:
        raise InterplabError(f"only {len(kept)} of the {len(words)} ioi {what} are one token with a leading space "
                             f"in this tokenizer ({kept}); ioi needs at least {MIN_WORDS[what]}")
    return kept


def _ioi_maker(tokenizer: Any) -> Maker:
    names = _single_words(tokenizer, NAMES, "names")
    places = _single_words(tokenizer, PLACES, "places")
    objects = _single_words(tokenizer, OBJECTS, "objects")

    def template(frame: str, io_first: bool) -> Callable[[random.Random], _Texts]:
        def draw(rng: random.Random) -> _Texts:
            io, s = rng.sample(names, 2)
            (place, place2), (obj, obj2) = rng.sample(places, 2), rng.sample(objects, 2)

            def text(io: str, s: str, place: str, obj: str) -> str:
                n1, n2 = (io, s) if io_first else (s, io)
                return frame.format(N1=n1, N2=n2, S=s, PLACE=place, OBJECT=obj)

            # corrupted: IO and S swapped everywhere, so its right answer is S; null: same names, other place/object
            return _Texts(text(io, s, place, obj), text(s, io, place, obj), text(io, s, place2, obj2),
                          " " + io, " " + s)
        return draw

    return {f"{key}-{order}": template(frame, order == "ABBA")
            for key, frame in IOI_FRAMES.items() for order in ("ABBA", "BABA")}


def _factual_maker(tokenizer: Any) -> Maker:
    def template(name: str) -> Callable[[random.Random], _Texts]:
        frames, items = FACTUAL_CANDIDATES[name]
        items = [it for it in items if _single(tokenizer, " " + it[1]) is not None]
        if len(items) < 2 or len(frames) < 2:
            raise InterplabError(f"factual template {name!r} has {len(items)} subjects whose answer is one token in "
                                 "this tokenizer; it needs at least 2")

        def draw(rng: random.Random) -> _Texts:
            (subject, answer), (other, wrong) = rng.sample(items, 2)
            frame, frame2 = rng.sample(frames, 2)
            # corrupted: another subject (another answer); null: the same subject in another frame
            return _Texts(frame.format(*subject), frame.format(*other), frame2.format(*subject),
                          " " + answer, " " + wrong)
        return draw

    return {name: template(name) for name in FACTUAL_KEPT}


def _generate(tokenizer: Any, make: Maker, n: int, rng: random.Random, spec: str) -> PairBatch:
    """n pairs, templates taken in turn, all of one token length: the length most templates' prompts have (a
    template whose prompts come out longer or shorter in this tokenizer is left out)."""
    lengths = {name: len(_encode(tokenizer, draw(rng).clean)) for name, draw in make.items()}
    target = max(sorted(set(lengths.values())), key=list(lengths.values()).count)
    kept = [name for name in make if lengths[name] == target]
    rows: list[tuple[list[int], list[int], list[int], int, int, str]] = []
    for i in range(n):
        name = kept[i % len(kept)]
        for _attempt in range(100):  # a draw with a word of another length is redrawn
            t = make[name](rng)
            ids = [_encode(tokenizer, text) for text in (t.clean, t.corrupted, t.null)]
            if all(len(x) == target for x in ids):
                break
        else:
            raise InterplabError(f"{spec} template {name!r}: no prompt of {target} tokens in 100 draws")
        answer, wrong = _single(tokenizer, t.answer), _single(tokenizer, t.wrong)
        assert answer is not None and wrong is not None  # the makers keep one-token answers only
        rows.append((*ids, answer, wrong, name))
    return _batch(rows)


def _batch(rows: list[tuple[list[int], list[int], list[int], int, int, str]]) -> PairBatch:
    clean, corrupted, null, answer, wrong, template = zip(*rows)
    return PairBatch(torch.tensor(clean), torch.tensor(corrupted), torch.tensor(null), torch.tensor(answer),
                     torch.tensor(wrong), list(template))


# ---- induction ----------------------------------------------------------------------------------------------------
def _special_ids(model: HookedModel) -> set[int]:
    tokenizer = model.tokenizer
    if tokenizer is None:
        return set()
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids | ({bos} if bos is not None else set())


def _induction(model: HookedModel, n: int, seed: int) -> PairBatch:
    """Repeated random tokens; see the module docstring for the corrupted, wrong and null choices."""
    tokenizer = model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    n_vocab = model.info.d_vocab
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        n_vocab = min(n_vocab, len(tokenizer))  # rows past the tokenizer's vocabulary are padding
    special = _special_ids(model)
    usable = torch.tensor([i for i in range(n_vocab) if i not in special])
    prefix = [] if bos is None else [bos]
    # the clean prompt has len(prefix) + 2L - 1 tokens; R, R' and the null's fresh ids take 3L - 2 distinct ids
    length = min(INDUCTION_LEN, (model.info.n_ctx - len(prefix) + 1) // 2, (len(usable) + 2) // 3)
    if length < 3:
        raise InterplabError(f"induction needs 3 repeated tokens at least; {model.info.spec} allows {length} "
                             f"(context {model.info.n_ctx}, {len(usable)} usable token ids)")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = usable[torch.randperm(len(usable), generator=gen)[:3 * length - 2]].tolist()
        r, r2, fresh = ids[:length], ids[length:2 * length], ids[2 * length:]
        q = fresh + r[-2:]
        rows.append((prefix + r + r[:-1], prefix + r2 + r[:-1], prefix + q + q[:-1], r[-1], r2[-1], "induction"))
    return _batch(rows)


# ---- JSONL --------------------------------------------------------------------------------------------------------
REQUIRED = ("clean", "corrupted", "answer", "wrong")


def _from_jsonl(tokenizer: Any, path: Path, n: int) -> PairBatch:
    """The first n objects of the file, checked line by line (the error names the line and what is wrong)."""
    if not path.is_file():
        raise InterplabError(f"prompt file {path} does not exist")
    records: list[tuple[int, dict[str, str]]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if len(records) == n:
            break
        if line.strip():
            records.append((number, _parse_line(path, number, line)))
    if len(records) < n:
        raise InterplabError(f"{path} has {len(records)} prompt pairs; {n} were asked for")
    rows = [_tokenize_record(tokenizer, path, number, rec) for number, rec in records]
    target = len(rows[0][0])
    for (number, _rec), row in zip(records, rows):
        if len(row[0]) != target:
            raise InterplabError(f"{path} line {number}: prompts have {len(row[0])} tokens but line "
                                 f"{records[0][0]} has {target}; all pairs need one length")
    # a missing null: another line's clean prompt of the same template and metric tokens, else the pair's own
    for i, (_number, rec) in enumerate(records):
        if "null" not in rec:
            twin = next((rows[j][0] for j, (_k, other) in enumerate(records) if j != i and "null" not in other
                         and rows[j][3:] == rows[i][3:] and rows[j][0] != rows[i][0]), rows[i][0])
            rows[i] = (rows[i][0], rows[i][1], twin, *rows[i][3:])
    return _batch(rows)


def _parse_line(path: Path, number: int, line: str) -> dict[str, str]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InterplabError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise InterplabError(f"{path} line {number}: expected a JSON object, got {type(rec).__name__}")
    missing = [key for key in REQUIRED if key not in rec]
    if missing:
        raise InterplabError(f"{path} line {number}: missing field(s) {', '.join(missing)}; each line needs "
                             f"{', '.join(REQUIRED)} (optional null, template)")
    for key in (*REQUIRED, "null", "template"):
        if key in rec and not isinstance(rec[key], str):
            raise InterplabError(f"{path} line {number}: field {key!r} must be a string, got {rec[key]!r}")
    return rec


def _tokenize_record(tokenizer: Any, path: Path, number: int, rec: dict[str, str]
                     ) -> tuple[list[int], list[int], list[int], int, int, str]:
    metric: list[int] = []
    for key in ("answer", "wrong"):
        ids = tokenizer([rec[key]], add_special_tokens=False)["input_ids"][0]
        if len(ids) != 1:
            raise InterplabError(f"{path} line {number}: {key} {rec[key]!r} is {len(ids)} tokens, not exactly one")
        metric.append(int(ids[0]))
    prompts = {key: _encode(tokenizer, rec[key]) for key in ("clean", "corrupted", "null") if key in rec}
    lengths = {key: len(ids) for key, ids in prompts.items()}
    if len(set(lengths.values())) > 1:
        raise InterplabError(f"{path} line {number}: token lengths differ ({lengths}); clean, corrupted and null "
                             "must have equal length")
    clean = prompts["clean"]
    return clean, prompts["corrupted"], prompts.get("null", clean), metric[0], metric[1], rec.get("template", "jsonl")


# ---- accuracy -----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _last_logit_diff(model: HookedModel, tokens: Int[Tensor, "n pos"], answer: Int[Tensor, " n"],
                     wrong: Int[Tensor, " n"], chunk: int = 32) -> Tensor:
    """logit[answer] − logit[wrong] at the last position, per prompt."""
    out = []
    for i in range(0, len(tokens), chunk):
        last = model.forward(tokens[i:i + chunk].to(model.device))[:, -1].float().cpu()
        rows = torch.arange(len(last))
        out.append(last[rows, answer[i:i + chunk]] - last[rows, wrong[i:i + chunk]])
    return torch.cat(out)


def clean_accuracy(model: HookedModel, batch: PairBatch) -> dict[str, float]:
    """How often the model gets each side right: "clean" = fraction of pairs with logit(answer) > logit(wrong) at the
    last clean position, "corrupted" = fraction with logit(wrong) > logit(answer) on the corrupted prompt; the same per
    template ("clean/<template>", "corrupted/<template>"), "null" as "clean" on the null prompts, and the mean logit
    differences answer − wrong ("clean_logit_diff", "corrupted_logit_diff", "null_logit_diff")."""
    clean = _last_logit_diff(model, batch.clean, batch.answer, batch.wrong)
    corrupted = _last_logit_diff(model, batch.corrupted, batch.answer, batch.wrong)
    null = _last_logit_diff(model, batch.null, batch.answer, batch.wrong)
    out = {"clean": float((clean > 0).float().mean()), "corrupted": float((corrupted < 0).float().mean()),
           "null": float((null > 0).float().mean()), "clean_logit_diff": float(clean.mean()),
           "corrupted_logit_diff": float(corrupted.mean()), "null_logit_diff": float(null.mean())}
    names = torch.tensor([sorted(set(batch.template)).index(t) for t in batch.template])
    for k, name in enumerate(sorted(set(batch.template))):
        rows = names == k
        out[f"clean/{name}"] = float((clean[rows] > 0).float().mean())
        out[f"corrupted/{name}"] = float((corrupted[rows] < 0).float().mean())
    return out
