"""iter_documents: every corpus format reads back what was written; split and shuffle; bad input -> InterplabError."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interplab.data import CORPUS_SPEC_HELP, iter_documents
from interplab.errors import InterplabError

DOCS = ["The first document.", "A second, longer document\nwith two lines.", "Third: ünïcödé and emoji 🐍."]


def read_all(corpus: str | Path, **kwargs) -> list[str]:
    return list(iter_documents(str(corpus), split="all", **kwargs))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# --- formats --------------------------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "one.txt").write_text(DOCS[1], encoding="utf-8")
    assert read_all(tmp_path / "one.txt") == [DOCS[1]]


def test_folder_of_txt_is_one_document_per_file_recursive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.txt").write_text(DOCS[2], encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a corpus file")
    (tmp_path / ".hidden.txt").write_text("a dotfile")
    assert sorted(read_all(tmp_path)) == sorted(DOCS)


def test_jsonl_reads_text_field_and_skips_blank_lines_and_empty_texts(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"text": DOCS[0], "id": 1}) + "\n\n"
        + json.dumps({"text": "", "id": 2}) + "\n"
        + json.dumps({"text": DOCS[1], "id": 3}) + "\n",
        encoding="utf-8",
    )
    assert sorted(read_all(path)) == sorted(DOCS[:2])


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": d, "text": "decoy"} for d in DOCS])
    assert sorted(read_all(path, text_field="body")) == sorted(DOCS)


def test_parquet_reads_text_column(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", {"text": DOCS + [None], "n": [1, 2, 3, 4]})
    assert sorted(read_all(path)) == sorted(DOCS)  # the null row is skipped


def test_mixed_folder_reads_every_format(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": DOCS[1]}])
    write_parquet(tmp_path / "c.parquet", {"text": [DOCS[2]]})
    assert sorted(read_all(tmp_path)) == sorted(DOCS)


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    assert sorted(read_all(tmp_path / "ds")) == sorted(DOCS)


def test_saved_dataset_dict_uses_train_unless_a_split_is_named(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
            "validation": datasets.Dataset.from_dict({"text": DOCS[2:]}),
        }
    ).save_to_disk(str(folder))
    assert sorted(read_all(folder)) == sorted(DOCS[:2])
    assert read_all(f"{folder}:validation") == DOCS[2:]
    with pytest.raises(InterplabError, match=r"no split 'nope'.*\['train', 'validation'\]"):
        read_all(f"{folder}:nope")


def test_python_docs_spec(python_docs):
    assert sorted(read_all("python-docs")) == sorted(python_docs)


# --- split and shuffle ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("many") / "many.jsonl"
    return write_jsonl(path, [{"text": f"document number {i}"} for i in range(2000)])


def test_split_is_disjoint_covering_and_close_to_the_fraction(many_docs):
    train = list(iter_documents(str(many_docs), split="train", test_fraction=0.2))
    test = list(iter_documents(str(many_docs), split="test", test_fraction=0.2))
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == sorted(f"document number {i}" for i in range(2000))
    # Binomial(2000, 0.2) has sd 18 documents; 0.04 is about 4.5 sd.
    assert abs(len(test) / 2000 - 0.2) < 0.04


def test_split_follows_the_sha256_of_the_text(tmp_path):
    text = "a document whose hash decides its split"
    # Hex digits -> integer, a different route from the library's int.from_bytes.
    position = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    corpus = str(tmp_path / "doc.txt")
    if position < 0.999:
        assert list(iter_documents(corpus, split="test", test_fraction=position + 0.001)) == [text]
        assert list(iter_documents(corpus, split="train", test_fraction=position + 0.001)) == []
    if position > 0.001:
        assert list(iter_documents(corpus, split="test", test_fraction=position - 0.001)) == []
        assert list(iter_documents(corpus, split="train", test_fraction=position - 0.001)) == [text]


def test_split_does_not_depend_on_seed(many_docs):
    test_0 = set(iter_documents(str(many_docs), split="test", seed=0))
    test_1 = set(iter_documents(str(many_docs), split="test", seed=1))
    assert test_0 == test_1 and test_0


def test_zero_test_fraction_puts_everything_in_train(many_docs):
    assert list(iter_documents(str(many_docs), split="test", test_fraction=0.0)) == []
    assert len(list(iter_documents(str(many_docs), split="train", test_fraction=0.0))) == 2000


def test_shuffle_is_deterministic_and_seeded(many_docs):
    in_file_order = [f"document number {i}" for i in range(2000)]
    run_1 = read_all(many_docs, seed=0)
    run_2 = read_all(many_docs, seed=0)
    other_seed = read_all(many_docs, seed=1)
    assert run_1 == run_2
    assert run_1 != other_seed and sorted(run_1) == sorted(other_seed)
    assert run_1 != in_file_order


# --- Hugging Face hub (offline: load_dataset is replaced) ----------------------------------------------------


def test_hub_spec_is_parsed_and_streamed(monkeypatch):
    calls = []
    rows = [{"text": f"hub doc {i}", "id": i} for i in range(50)]

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(iter_documents("hf:org/name:cfg:validation", split="all"))
    assert calls == [("org/name", "cfg", "validation", True)]
    assert sorted(docs) == sorted(row["text"] for row in rows)
    assert docs == list(iter_documents("hf:org/name", split="all"))  # same seed, same order
    assert calls[1] == ("org/name", None, "train", True)
    assert docs != list(iter_documents("hf:org/name", split="all", seed=1))


def test_hub_failure_is_a_user_error(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(InterplabError, match=r"^could not load HF dataset 'org/name': Couldn't reach .*\)$"):
        iter_documents("hf:org/name")


def test_hub_missing_field_lists_fields(monkeypatch):
    rows = [{"content": "x", "id": 1}]
    fake_load_dataset = lambda *args, **kwargs: datasets.Dataset.from_list(rows).to_iterable_dataset()  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(InterplabError, match="no field 'text'; fields present: content, id"):
        list(iter_documents("hf:org/name", split="all"))


@pytest.mark.parametrize("spec", ["hf:", "hf::cfg", "hf:a:b:c:d"])
def test_bad_hub_spec(spec):
    with pytest.raises(InterplabError, match="hf:NAME:CONFIG:SPLIT"):
        iter_documents(spec)


# --- bad input --------------------------------------------------------------------------------------------------


def test_missing_path_explains_valid_specs(tmp_path):
    missing = tmp_path / "foo.txt"
    with pytest.raises(InterplabError) as error:
        iter_documents(str(missing))  # raised at the call, before iteration
    message = str(error.value)
    assert f"corpus path '{missing}' does not exist" in message
    assert all(form in message for form in ("python-docs", ".jsonl", ".parquet", "save_to_disk", "hf:NAME"))
    assert "\n" not in message


def test_unknown_extension(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(InterplabError, match=r"unknown extension '\.csv'; valid: \.txt, \.jsonl, \.parquet"):
        iter_documents(str(tmp_path / "data.csv"))


def test_folder_without_corpus_files(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(InterplabError, match="holds no .txt, .jsonl or .parquet files"):
        iter_documents(str(tmp_path))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InterplabError, match="holds no documents"):
        iter_documents(str(tmp_path / "empty.txt"))


def test_jsonl_missing_field_names_file_and_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"title": "t", "body": "b"}])
    with pytest.raises(InterplabError, match=r"docs\.jsonl' line 1 has no field 'text'; fields present: title, body"):
        iter_documents(str(path))


def test_parquet_missing_field_names_file_and_lists_fields(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", {"content": ["x"], "id": [1]})
    with pytest.raises(InterplabError, match=r"docs\.parquet has no field 'text'; fields present: content, id"):
        iter_documents(str(path))


def test_saved_dataset_missing_field_lists_fields(tmp_path):
    datasets.Dataset.from_dict({"content": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InterplabError, match="no field 'text'; fields present: content"):
        iter_documents(str(tmp_path / "ds"))


def test_jsonl_bad_line_and_non_text_values(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(InterplabError, match="line 2 is not valid JSON"):
        iter_documents(str(bad_json))
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 3}])
    with pytest.raises(InterplabError, match="field 'text' in .* holds int values"):
        iter_documents(str(numbers))


def test_corrupt_parquet(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InterplabError, match="could not read parquet file"):
        iter_documents(str(tmp_path / "broken.parquet"))


@pytest.mark.parametrize("split", ["validation", "TRAIN", ""])
def test_bad_split(split):
    with pytest.raises(InterplabError, match=f"split '{split}' is not valid; valid splits: train, test, all"):
        iter_documents("python-docs", split=split)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 2])
def test_bad_test_fraction(fraction):
    with pytest.raises(InterplabError, match="test_fraction .* 0 <= f < 1"):
        iter_documents("python-docs", test_fraction=fraction)


def test_spec_help_is_one_sentence_naming_every_form():
    assert CORPUS_SPEC_HELP.count(". ") == 0 and CORPUS_SPEC_HELP.endswith(".")
    for form in ("python-docs", ".txt", ".jsonl", ".parquet", "save_to_disk", "hf:NAME[:CONFIG[:SPLIT]]"):
        assert form in CORPUS_SPEC_HELP


def test_import_is_light():
    code = "import sys, interplab.data; print(sorted({'datasets', 'pyarrow', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
