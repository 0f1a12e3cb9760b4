"""Reading documents from local files: .txt, .jsonl, .parquet, folders of them, and `save_to_disk` folders.

Every reader returns the documents as a list of strings, in file order. Local corpora are read whole into memory
(the shuffle needs them all anyway); for corpora that do not fit, stream an HF dataset instead.
`pyarrow` and `datasets` are imported inside the readers that need them, so that `import interplab.data` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from interplab.errors import InterplabError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")

# `save_to_disk` writes `state.json` + `dataset_info.json` for a Dataset and `dataset_dict.json` for a DatasetDict.
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` looks like the output of `datasets.Dataset(Dict).save_to_disk`."""
    return folder.is_dir() and any((folder / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def read_path(path: Path, text_field: str) -> list[str]:
    """Documents of one corpus file or of every corpus file under a folder (recursive, sorted by relative path)."""
    if path.is_file():
        return read_file(path, text_field)
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES and not _is_hidden(p, path)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise InterplabError(f"corpus folder '{path}' holds no .txt, .jsonl or .parquet files")
    docs: list[str] = []
    for file in files:
        docs.extend(read_file(file, text_field))
    return docs


def read_file(path: Path, text_field: str) -> list[str]:
    """Documents of one file: a whole .txt file is one document; .jsonl and .parquet hold one per row."""
    if path.suffix == ".txt":
        return [doc for doc in [_read_text(path)] if doc]
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field)
    raise InterplabError(f"corpus file '{path}' has unknown extension '{path.suffix}'; valid: .txt, .jsonl, .parquet")


def read_saved_dataset(folder: Path, text_field: str, dataset_split: str | None) -> list[str]:
    """Documents of a `save_to_disk` folder; for a DatasetDict, of `dataset_split` (default 'train')."""
    import datasets  # heavy (~0.6 s) and needed by saved datasets only: the package promises a light import

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises a variety of types for a damaged folder
        raise InterplabError(f"could not load saved dataset '{folder}': {_first_line(e)}") from e

    if isinstance(dataset, datasets.DatasetDict):
        name = dataset_split or "train"
        if name not in dataset:
            raise InterplabError(
                f"saved dataset '{folder}' has no split '{name}'; its splits are {sorted(dataset)} "
                f"(pick one with '{folder}:SPLIT')"
            )
        dataset = dataset[name]
    elif dataset_split is not None:
        raise InterplabError(f"saved dataset '{folder}' is a single Dataset with no splits; drop ':{dataset_split}'")

    if text_field not in dataset.column_names:
        raise InterplabError(_missing_field(folder, text_field, dataset.column_names))
    return _strings(dataset[text_field], folder, text_field)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InterplabError(f"corpus file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from e


def jsonl_objects(text: str, source: object) -> list[tuple[str, dict]]:
    """(where, object) for every non-blank line of JSONL text, `where` naming "SOURCE line N" for error messages;
    a line that is not a JSON object is an InterplabError saying so."""
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InterplabError(f"{where} is not valid JSON ({e.msg}); a .jsonl file holds one object per line") from e
        if not isinstance(row, dict):
            raise InterplabError(f"{where} is a JSON {type(row).__name__}, not an object with fields")
        rows.append((where, row))
    return rows


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for where, row in jsonl_objects(_read_text(path), f"'{path}'"):
        if text_field not in row:
            raise InterplabError(_missing_field(where, text_field, list(row)))
        docs.extend(_strings([row[text_field]], where, text_field))
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    # Needed by .parquet files only; imported here like `datasets`, which the package does not import up front.
    import pyarrow
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            raise InterplabError(_missing_field(path, text_field, names))
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except pyarrow.ArrowException as e:
        raise InterplabError(f"could not read parquet file '{path}': {_first_line(e)}") from e
    return _strings(column.to_pylist(), path, text_field)


def _strings(values: object, where: object, text_field: str) -> list[str]:
    """Keep the non-empty strings; nulls and empty texts are skipped, any other type is an error."""
    docs = []
    for value in values:  # type: ignore[attr-defined]
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            kind = type(value).__name__
            raise InterplabError(f"field '{text_field}' in {where} holds {kind} values; it must hold text")
        docs.append(value)
    return docs


def _missing_field(where: object, text_field: str, present: list[str]) -> str:
    return (
        f"{where} has no field '{text_field}'; fields present: {', '.join(map(str, present)) or '(none)'} "
        f"(choose one with text_field)"
    )


def _is_hidden(path: Path, root: Path) -> bool:
    # Skip dotfiles and dot-folders (.git, .cache) that tools leave inside data folders.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
