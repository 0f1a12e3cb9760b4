"""Labelled activations: texts (or single tokens) with labels, run through a model and read at one position each.

A `LabelledTexts` holds n examples, each a text with an integer label and optionally a token position; it comes from
a CSV or JSONL file (`load_labelled`), from a Python function over texts (`label_texts`), or from the vocabulary
itself (`vocabulary_dataset`: each example is one token id, labelled by a predicate over its string).

`collect_activations` turns it into `LabelledActivations(acts [n, d], labels [n], texts)`. Each example is
tokenized on its own (no packing, so an example never sees another's tokens), optionally after BOS, and examples
are run in batches of similar length, right-padded. Every model here is causal and `run_with_cache` passes no
attention mask, so position t attends to positions <= t only: padding after an example's last real token cannot
change any activation at or before it, and only positions < the example's length are read. With L_i the number of
the text's own tokens and o = 1 if BOS is prepended (else 0), example i is read at

    "last"     o + L_i − 1                               the last token of the text
    "mean"     mean over o .. o + L_i − 1                 the text's tokens, BOS excluded
    int p      o + p  (p >= 0),  o + L_i + p  (p < 0)     p indexes the text's own tokens: BOS is never counted

so a position means the same token whether or not BOS is prepended. A position with −L_i <= p < L_i is valid.

Reuse: `LabelledActivations.save(url)` writes `activations.safetensors` (acts float32, labels int64) and a
`labelled.json` beside it (texts, how they were collected, the safetensors' sha256), each atomically; `load`
verifies the sha256. This is deliberately not the activation store of `interplab.activations`: that store holds
every position of fixed-length packed contexts for SAE training, while a probe dataset is one vector per
variable-length example plus its label and text — a single small file per dataset is the whole need.
`cached_activations` loads a saved set when it was collected the same way, and collects and saves it otherwise.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, NamedTuple, Sequence, Union

import torch
from jaxtyping import Float, Int
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from interplab.data.files import jsonl_objects
from interplab.errors import InterplabError, check_int
from interplab.fileio import join, read_url, sha256_hex, write_url_atomic
from interplab.models.hooked import HookedModel

Position = Union[Literal["last", "mean"], int]
"""Where each example is read: the last text token, the mean over the text tokens, or a token index."""

FORMAT = "interplab.labelled_activations"
VERSION = 1
TENSORS_NAME = "activations.safetensors"
META_NAME = "labelled.json"
_TRUE, _FALSE = {"true", "yes"}, {"false", "no"}


def _preview(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _as_label(value: Any, where: str) -> int:
    """An int label from an int, a bool, or a string spelling one ("1", "-2", "true", "no")."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE or s in _FALSE:
            return int(s in _TRUE)
        try:
            return int(s)
        except ValueError:
            pass
    raise InterplabError(f"{where}: label {value!r} is not an integer or boolean (valid: 0, 1, -3, true, false, "
                         "yes, no)")


def _as_position(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise InterplabError(f"{where}: position {value!r} is not an integer token index")
    return value


@dataclass
class LabelledTexts:
    """n labelled examples; built by `load_labelled`, `label_texts` or `vocabulary_dataset`."""

    texts: list[str]
    """The examples' texts (for token-level examples, the decoded tokens: they name the example)."""
    labels: list[int]
    """One integer label per example (bools become 0/1). The probes of `linear` need exactly the classes {0, 1}."""
    positions: list[int] | None = None
    """Optional token index per example into the text's own tokens (BOS not counted; negative counts from the end),
    used by `collect_activations` when it is given no explicit position."""
    token_ids: list[list[int]] | None = None
    """Optional pre-tokenized examples (BOS not included): used instead of tokenizing the texts."""

    def __post_init__(self) -> None:
        n = len(self.texts)
        if n == 0:
            raise InterplabError("a labelled dataset needs at least one example, got none")
        self.texts = [str(t) for t in self.texts]
        self.labels = [_as_label(v, f"example {i}") for i, v in enumerate(self.labels)]
        for name in ("labels", "positions", "token_ids"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise InterplabError(f"{name} has {len(values)} entries but there are {n} texts; give one per text")
        if self.positions is not None:
            self.positions = [_as_position(p, f"example {i}") for i, p in enumerate(self.positions)]
        if self.token_ids is not None:
            self.token_ids = [[int(t) for t in ids] for ids in self.token_ids]

    def __len__(self) -> int:
        return len(self.texts)


def label_texts(texts: Iterable[str], label_fn: Callable[[str], int | bool],
                positions: Sequence[int] | None = None) -> LabelledTexts:
    """LabelledTexts with labels[i] = int(label_fn(texts[i]))."""
    texts = list(texts)
    return LabelledTexts(texts, [label_fn(t) for t in texts], None if positions is None else list(positions))


def vocabulary_dataset(tokenizer: Any, predicate: Callable[[str], bool], *, ids: Iterable[int] | None = None,
                       include_special: bool = False) -> LabelledTexts:
    """One example per token id: its text is `tokenizer.decode([id])` and its label `predicate(text)`.

    E.g. `vocabulary_dataset(tok, lambda s: s.strip()[:1].isupper())`. `ids` restricts the vocabulary (default: all
    of it); special tokens (BOS, EOS, PAD, ...) are left out unless `include_special`. Read the activations with
    `collect_activations(..., hook="hook_embed")` for the embedding rows W_E[id], or any later hook to see the
    token run alone (after BOS if prepend_bos).
    """
    if tokenizer is None:
        raise InterplabError("vocabulary_dataset needs a tokenizer; this model has token ids only")
    vocab = len(tokenizer)
    ids = list(range(vocab)) if ids is None else [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InterplabError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in ids if include_special or i not in special]
    texts = [tokenizer.decode([i]) for i in ids]
    return LabelledTexts(texts, [bool(predicate(t)) for t in texts], token_ids=[[i] for i in ids])


def load_labelled(path: str, text_field: str = "text", label_field: str = "label",
                  position_field: str | None = None) -> LabelledTexts:
    """Read a `.csv` (with a header row) or `.jsonl` file (one JSON object per line; blank lines skipped).

    Labels may be integers, booleans or strings spelling either; positions integers. A local path or fsspec URL.
    """
    data = read_url(path)
    if data is None:
        raise InterplabError(f"labelled data file {path} does not exist")
    suffix = posixpath.splitext(path.lower())[1]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        present = list(reader.fieldnames or [])
        for field in (text_field, label_field, position_field):
            if field is not None and field not in present:
                raise InterplabError(f"{path} has no column '{field}'; its columns are {present}")
        rows = [(f"{path} row {i + 2}", r) for i, r in enumerate(reader)]  # row 1 is the header
    elif suffix in (".jsonl", ".ndjson"):
        rows = jsonl_objects(data.decode("utf-8"), path)
        for where, row in rows:
            for field in (text_field, label_field, position_field):
                if field is not None and field not in row:
                    raise InterplabError(f"{where} has no field '{field}'; its fields are {sorted(row)}")
    else:
        raise InterplabError(f"cannot tell the format of {path}: use a .csv or .jsonl (.ndjson) file")
    if not rows:
        raise InterplabError(f"{path} holds no examples")
    for where, row in rows:
        if not isinstance(row[text_field], str):
            raise InterplabError(f"{where}: field '{text_field}' is a {type(row[text_field]).__name__}, not a text")
    return LabelledTexts(
        [r[text_field] for _, r in rows],
        [_as_label(r[label_field], w) for w, r in rows],
        None if position_field is None else [_as_position(r[position_field], w) for w, r in rows],
    )


class LabelledActivations(NamedTuple):
    """One activation vector per labelled example."""

    acts: Float[Tensor, "n d"]
    """float32, on the CPU."""
    labels: Int[Tensor, " n"]
    """int64."""
    texts: list[str]
    """The examples' texts, so that every row can be traced back."""
    meta: dict[str, Any] | None = None
    """How the activations were collected (model spec, hook, position, prepend_bos); JSON-able."""

    def save(self, url: str) -> str:
        """Write `url/activations.safetensors` then `url/labelled.json` (which commits it: it records the sha256)."""
        n = len(self.texts)
        if self.acts.ndim != 2 or self.acts.shape[0] != n or tuple(self.labels.shape) != (n,):
            raise InterplabError(f"acts [n, d] and labels [n] must match the {n} texts, got "
                                 f"{tuple(self.acts.shape)} and {tuple(self.labels.shape)}")
        data = save_safetensors({"acts": self.acts.detach().float().cpu().contiguous(),
                                 "labels": self.labels.detach().long().cpu().contiguous()})
        write_url_atomic(join(url, TENSORS_NAME), data)
        meta = {"format": FORMAT, "version": VERSION, "sha256": sha256_hex(data), "n": n,
                "d": int(self.acts.shape[1]), "meta": self.meta or {}, "texts": list(self.texts)}
        write_url_atomic(join(url, META_NAME), json.dumps(meta, ensure_ascii=False).encode())
        return url

    @classmethod
    def load(cls, url: str) -> "LabelledActivations":
        """Read what `save` wrote, checking the tensors against the recorded sha256."""
        raw = read_url(join(url, META_NAME))
        if raw is None:
            raise InterplabError(f"{url} holds no saved labelled activations ({META_NAME} is missing)")
        try:
            meta = json.loads(raw)
            ok = meta.get("format") == FORMAT and meta.get("version") == VERSION
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise InterplabError(f"{join(url, META_NAME)} is not a version-{VERSION} {FORMAT} file")
        data = read_url(join(url, TENSORS_NAME))
        if data is None or sha256_hex(data) != meta["sha256"]:
            raise InterplabError(f"{join(url, TENSORS_NAME)} is missing or does not match the sha256 recorded in "
                                 f"{META_NAME}; collect the activations again")
        tensors = load_safetensors(data)
        return cls(tensors["acts"], tensors["labels"], list(meta["texts"]), meta["meta"])


def _resolve(position: Position, length: int, offset: int, i: int, text: str) -> int | slice:
    """Index (or slice, for "mean") into example i's token sequence of `offset` BOS + `length` text tokens."""
    if position == "last":
        return offset + length - 1
    if position == "mean":
        return slice(offset, offset + length)
    if isinstance(position, bool) or not isinstance(position, int):
        raise InterplabError(f"position {position!r} is not valid; use 'last', 'mean' or an integer token index")
    if not -length <= position < length:
        raise InterplabError(f"position {position} is outside example {i} ({_preview(text)}), which has {length} "
                             f"tokens; valid positions are {-length}..{length - 1}")
    return offset + position % length


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad batches with: any valid id serves, since right padding is never attended to by the positions
    that are read, and left padding (refusal prompts) is masked out."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def collect_activations(model: HookedModel, data: LabelledTexts, hook: str, position: Position | None = None, *,
                        batch_size: int = 32, prepend_bos: bool | None = None) -> LabelledActivations:
    """Run each example through `model` (a HookedModel) and read `hook` at `position` (see the module docstring).

    position None: the dataset's own per-example positions if it has them, else "last". prepend_bos None: iff the
    model's tokenizer has a BOS token.
    """
    if not isinstance(data, LabelledTexts):
        raise InterplabError(f"data must be a LabelledTexts, got {type(data).__name__}")
    check_int("batch_size", batch_size, 1)
    model.check_hook_names([hook])
    if model.hook_dim(hook) is None:
        raise InterplabError(f"hook '{hook}' is not a per-token vector; probe a hook of shape [batch, pos, d]")
    tokenizer = model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise InterplabError("prepend_bos=True but the model's tokenizer has no BOS token; pass prepend_bos=False")
    if data.token_ids is not None:
        ids = data.token_ids
    elif tokenizer is None:
        raise InterplabError("the model has no tokenizer, so texts cannot be tokenized; give token_ids instead")
    else:
        ids = tokenizer(data.texts, add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"]
    offset = int(prepend_bos)
    seqs = [([bos] if prepend_bos else []) + list(t) for t in ids]
    where: list[int | slice] = []
    for i, (t, text) in enumerate(zip(ids, data.texts)):
        if not t:
            raise InterplabError(f"example {i} ({_preview(text)}) has no tokens; remove it or give it some text")
        if len(seqs[i]) > model.info.n_ctx:
            raise InterplabError(f"example {i} ({_preview(text)}) has {len(seqs[i])} tokens, more than the model's "
                                 f"context of {model.info.n_ctx}")
        p = position if position is not None else (data.positions[i] if data.positions is not None else "last")
        where.append(_resolve(p, len(t), offset, i, text))

    pad = pad_id_of(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    out: list[Tensor | None] = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        width = len(seqs[batch[-1]])
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        act = model.run_with_cache(tokens, [hook]).cache[hook]                          # [b pos d]
        for row, i in enumerate(batch):
            w = where[i]
            out[i] = (act[row, w].mean(0) if isinstance(w, slice) else act[row, w]).float().cpu()
    meta = _collection_meta(model, data, hook, position, bool(prepend_bos))
    return LabelledActivations(torch.stack(out), torch.tensor(data.labels, dtype=torch.long),  # type: ignore[arg-type]
                               list(data.texts), meta)


def _collection_meta(model: HookedModel, data: LabelledTexts, hook: str, position: Position | None,
                     prepend_bos: bool) -> dict[str, Any]:
    """What decides the activations besides the texts and labels (JSON-able, compared by `cached_activations`)."""
    meta: dict[str, Any] = {"model": model.info.spec, "hook": hook, "prepend_bos": prepend_bos}
    if position is None and data.positions is not None:
        meta["position"], meta["positions"] = "per-example", list(data.positions)
    else:
        meta["position"] = "last" if position is None else position
    if data.token_ids is not None:
        meta["token_ids_sha256"] = sha256_hex(json.dumps(data.token_ids).encode())
    return meta


def cached_activations(url: str, model: HookedModel, data: LabelledTexts, hook: str, position: Position | None = None, *,
                       batch_size: int = 32, prepend_bos: bool | None = None) -> LabelledActivations:
    """`LabelledActivations.load(url)` if it was collected from the same model, hook, position, BOS choice, texts
    and labels; otherwise `collect_activations(...)`, saved to `url` (replacing what was there)."""
    if read_url(join(url, META_NAME)) is not None:
        saved = LabelledActivations.load(url)
        if prepend_bos is None:
            prepend_bos = getattr(model.tokenizer, "bos_token_id", None) is not None
        if (saved.meta == _collection_meta(model, data, hook, position, bool(prepend_bos))
                and saved.texts == data.texts and saved.labels.tolist() == data.labels):
            return saved
    acts = collect_activations(model, data, hook, position, batch_size=batch_size, prepend_bos=prepend_bos)
    acts.save(url)
    return acts
