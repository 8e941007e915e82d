"""Tests of raypo.data readers, formats and validation: every source kind reads the same rows,
every bad row is rejected at its line with its reason, and the summary guards the run."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypo.config import ConfigError, DataConfig
from raypo.data import readers
from raypo.data.formats import HH_ASSISTANT, split_hh
from raypo.data.readers import iter_pairs, list_sources, read_pairs
from raypo.data.records import REJECT_REASONS, PreferencePair, Rejection, Source
from raypo.data.validate import DataQualityError, DataSummary

DATA_DIR = Path(__file__).parent / "data"
HH_FILE = DATA_DIR / "hh_harmless_1800.jsonl.gz"

HH_EMPTY_CHOSEN_LINES = [317, 448, 1174, 1206]
"""Lines whose chosen dialogue ends with an empty last Assistant turn ("...Assistant: "); found
by reading the file with json + str.rfind, independently of the reader."""
HH_EARLY_SPLIT_LINES = [1003, 1011, 1087]
"""Lines whose dialogues diverge before the last Assistant turn (same independent scan)."""
READER_REASONS = {
    "undecodable_bytes",
    "blank_line",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "non_text_value",
    "invalid_messages",
    "empty_prompt",
    "empty_completion",
    "identical_completions",
    "hh_unsplittable",
    "duplicate_id",
    "non_text_content",
}
"""The reasons the readers give (raypo.data.tokenize adds its own to REJECT_REASONS)."""


def _pairs_rows(count: int) -> list[dict[str, Any]]:
    """Distinct prompt/chosen/rejected rows under user column names, with an int group."""
    return [
        {"question": f"q{i}?", "good": f"yes {i}", "bad": f"no {i}", "annotator": i % 3}
        for i in range(count)
    ]


USER_FIELDS = {
    "prompt_field": "question",
    "chosen_field": "good",
    "rejected_field": "bad",
    "group_field": "annotator",
}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _outcome(record: PreferencePair | Rejection) -> Any:
    """A rejection's reason, or a pair's id and texts."""
    if isinstance(record, Rejection):
        return record.reason
    return (record.id, record.prompt, record.chosen, record.rejected)


def _texts(records: list[PreferencePair | Rejection]) -> list[tuple[Any, ...]]:
    assert all(isinstance(r, PreferencePair) for r in records), records
    return [(r.prompt, r.chosen, r.rejected, r.group) for r in records]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets``' cache inside tmp_path instead of ~/.cache."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


# --- the real HH pairs -------------------------------------------------------------------------


def test_hh_1800_every_row_accepted_or_explained() -> None:
    records = list(iter_pairs(DataConfig(path=str(HH_FILE))))
    rejections = [r for r in records if isinstance(r, Rejection)]
    pairs = [r for r in records if isinstance(r, PreferencePair)]
    assert len(records) == 1800
    assert [(r.row, r.reason) for r in rejections] == [
        (line, "empty_completion") for line in HH_EMPTY_CHOSEN_LINES
    ]
    assert all("chosen" in r.detail and r.raw.startswith('{"chosen"') for r in rejections)
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        raw = {n: json.loads(line) for n, line in enumerate(handle, start=1)}
    early = []
    for pair in pairs:
        row = raw[pair.row]
        assert pair.prompt.endswith(HH_ASSISTANT)
        assert pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
        # Longest: the completions share no further prefix ending at an Assistant marker.
        assert HH_ASSISTANT not in _common_prefix(pair.chosen, pair.rejected)
        if pair.prompt != row["chosen"][: row["chosen"].rfind(HH_ASSISTANT) + len(HH_ASSISTANT)]:
            early.append(pair.row)
    assert early == HH_EARLY_SPLIT_LINES


def _common_prefix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return a[:size]


def test_hh_ids_unique_and_stable() -> None:
    cfg = DataConfig(path=str(HH_FILE))
    first = [r.id for r in iter_pairs(cfg) if isinstance(r, PreferencePair)]
    second = [r.id for r in iter_pairs(cfg) if isinstance(r, PreferencePair)]
    assert first == second
    assert len(set(first)) == len(first) == 1800 - len(HH_EMPTY_CHOSEN_LINES)
    assert first[0] == f"{HH_FILE}:1"


def test_builtin_sample_is_first_400_hh_rows() -> None:
    builtin = list(iter_pairs(DataConfig()))
    full = list(iter_pairs(DataConfig(path=str(HH_FILE), max_rows=400)))
    assert len(builtin) == len(full) == 400
    assert [(r.row, _outcome(r)[1:]) for r in builtin] == [(r.row, _outcome(r)[1:]) for r in full]
    # Named by what the config says, not by where the package is installed: the ids, and with
    # them the hash-assigned held-out split, are the same on every machine.
    assert {r.source for r in builtin} == {"builtin:hh_sample"}
    pair_ids = [r.id for r in builtin if hasattr(r, "id")]
    assert pair_ids[0] == "builtin:hh_sample:1" and len(pair_ids) > 390


def test_split_hh_falls_back_to_earlier_turn() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao"
    rejected = "\n\nHuman: hi\n\nAssistant: go away"
    assert split_hh(chosen, rejected) == (
        "\n\nHuman: hi\n\nAssistant:",
        " hello\n\nHuman: bye\n\nAssistant: ciao",
        " go away",
    )


# --- the seeded bad file -----------------------------------------------------------------------

GOOD_CONVERSATION = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "go away"}],
}
SEEDED_LINES: list[tuple[bytes, str | None]] = [
    (b'\xef\xbb\xbf{"prompt": "p1", "chosen": "c1", "rejected": "r1"}', None),
    (b'{"prompt": "p", "chosen": "c"', "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', "undecodable_bytes"),
    (b"   ", "blank_line"),
    (b'{"prompt": "p", "chosen": "c"}', "missing_field"),
    (b'{"prompt": "p", "chosen": null, "rejected": "r"}', "missing_field"),
    (b'{"prompt": "p", "chosen": 3, "rejected": "r"}', "non_text_value"),
    (b'{"prompt": "p", "chosen": {"text": "c"}, "rejected": "r"}', "non_text_value"),
    (
        b'{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "c"}], '
        b'"rejected": [{"role": "assistant", "content": "r"}]}',
        "invalid_messages",
    ),
    (
        b'{"prompt": "hi", "chosen": [{"role": "user", "content": "other"}, '
        b'{"role": "assistant", "content": "c"}], "rejected": "r"}',
        "invalid_messages",
    ),
    (b'{"prompt": " \\n ", "chosen": "c", "rejected": "r"}', "empty_prompt"),
    (b'{"prompt": "p", "chosen": "c", "rejected": ""}', "empty_completion"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical_completions"),
    (
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
        b'"rejected": "\\n\\nHuman: x\\n\\nAssistant: b"}',
        "hh_unsplittable",
    ),
    (b'{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}', None),
    (
        b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
        b'"rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}',
        None,
    ),
    (json.dumps(GOOD_CONVERSATION).encode(), None),
    (b"", "blank_line"),
    ('{"prompt": "p\u00e9", "chosen": "c", "rejected": "r"}'.encode(), None),
    (
        b'{"prompt": [{"role": "user", "content": [{"type": "image"}, '
        b'{"type": "text", "text": "what is it?"}]}], "chosen": "a cat", "rejected": "a dog"}',
        "non_text_content",
    ),
    (b'{"chosen": "yes", "rejected": "no"}', "empty_prompt"),
    (
        b'{"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, '
        b'{"type": "text", "text": " there"}]}], "chosen": "a", "rejected": "b"}',
        None,
    ),
]
"""(line bytes, expected reason or None = accepted); line n of the file is entry n - 1."""


def test_seeded_bad_rows_rejected_at_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad_rows.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in SEEDED_LINES) + b"\n")
    records = list(iter_pairs(DataConfig(path=str(path))))
    got = [(r.row, r.reason if isinstance(r, Rejection) else None) for r in records]
    assert got == [(n, reason) for n, (_, reason) in enumerate(SEEDED_LINES, start=1)]
    assert all(r.source == str(path) for r in records)
    by_line = {r.row: r for r in records}
    assert "'rejected'" in by_line[6].detail and "the row has: prompt, chosen" in by_line[6].detail
    assert "null" in by_line[7].detail
    assert "0xe9" in by_line[4].detail and "caf\\xe9" in by_line[4].raw
    assert "prompt[0].content" in by_line[10].detail
    assert by_line[1].prompt == "p1"
    assert by_line[20].prompt == "p\u00e9"
    assert (by_line[16].prompt, by_line[16].chosen) == ("Q: 2+2? A:", " 4")
    assert "prompt[0].content[0] is a 'image' part" in by_line[21].detail
    assert by_line[23].prompt == [{"role": "user", "content": "Hi there"}]
    assert all(json.dumps(r.to_json()) for r in records if isinstance(r, Rejection))


def test_seeded_reasons_cover_every_reader_reason() -> None:
    seeded = {reason for _, reason in SEEDED_LINES if reason is not None}
    assert READER_REASONS <= set(REJECT_REASONS)
    assert seeded | {"duplicate_id"} == READER_REASONS


def test_duplicate_ids_rejected_and_named(tmp_path: Path) -> None:
    rows = [
        {"key": k, "prompt": "p", "chosen": f"c{n}", "rejected": "r"} for n, k in enumerate("abab")
    ]
    rows.append({"key": 7, "prompt": "p", "chosen": "c", "rejected": "r"})
    rows.append({"key": 1.5, "prompt": "p", "chosen": "c", "rejected": "r"})
    rows.append({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = _write_jsonl(tmp_path / "ids.jsonl", rows)
    records = list(iter_pairs(DataConfig(path=str(path), id_field="key")))
    got = [(r.row, r.reason if isinstance(r, Rejection) else r.id) for r in records]
    assert got == [
        (1, "a"),
        (2, "b"),
        (3, "duplicate_id"),
        (4, "duplicate_id"),
        (5, "7"),
        (6, "non_text_value"),
        (7, "missing_field"),
    ]
    assert "row 1" in records[2].detail and "id_field" in records[6].detail


def test_trailing_newline_makes_no_row_and_crlf_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    line = b'{"prompt": "p", "chosen": "c", "rejected": "r"}'
    path.write_bytes(line + b"\r\n" + line + b"\r\n")
    assert [r.prompt for r in iter_pairs(DataConfig(path=str(path)))] == ["p", "p"]


# --- every source kind reads the same rows -----------------------------------------------------


def test_every_source_kind_reads_the_same_rows(
    tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _pairs_rows(23)
    expected = [(r["question"], r["good"], r["bad"], str(r["annotator"])) for r in rows]
    jsonl = _write_jsonl(tmp_path / "one.jsonl", rows)
    gz = tmp_path / "one.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    parquet = _write_parquet(tmp_path / "one.parquet", rows)
    shards = tmp_path / "shards"
    for index, start in enumerate(range(0, 23, 5)):
        writer = _write_parquet if index % 2 else _write_jsonl
        suffix = "parquet" if index % 2 else "jsonl"
        writer(shards / f"part-{index:03d}.{suffix}", rows[start : start + 5])
    (shards / "README.md").write_text("not data")
    (shards / "_SUCCESS").write_text("")
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    configs = {
        "jsonl": {"path": str(jsonl)},
        "jsonl.gz": {"path": str(gz)},
        "parquet": {"path": str(parquet)},
        "directory": {"path": str(shards)},
        "glob": {"path": str(shards / "part-*")},
        "save_to_disk": {"path": str(tmp_path / "saved")},
        "save_to_disk dict": {"path": str(tmp_path / "saved_dict"), "format": "hf_disk"},
        "load_dataset json": {"path": str(jsonl), "format": "hf", "hf_name": "json"},
        "load_dataset parquet": {"path": str(parquet), "format": "hf"},
    }
    # Small shards so that Parquet row groups and datasets splits are read by several tasks.
    monkeypatch.setattr(readers, "SHARD_ROWS", 7)
    for name, settings in configs.items():
        cfg = DataConfig(**settings, **USER_FIELDS)
        sources = list_sources(cfg)
        records = [r for source in sources for r in read_pairs(source, cfg)]
        assert _texts(records) == expected, name
        assert len({r.id for r in records}) == 23, name
        if name in ("parquet", "save_to_disk", "load_dataset json"):
            assert len(sources) == 4 and [r.row for r in records] == list(range(23)), name
    assert len(list_sources(DataConfig(path=str(shards)))) == 5


def test_sharding_keeps_row_numbers_and_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parquet = _write_parquet(tmp_path / "x.parquet", _pairs_rows(10), row_group_size=2)
    cfg = DataConfig(path=str(parquet), **USER_FIELDS)
    whole = [r.id for r in iter_pairs(cfg)]
    monkeypatch.setattr(readers, "SHARD_ROWS", 3)
    sources = list_sources(cfg)
    assert [s.description for s in sources][-1] == f"{parquet} shard 4/4"
    assert [r.id for s in sources for r in read_pairs(s, cfg)] == whole
    assert whole[0] == f"{parquet}:0"


def test_dataset_dict_split_selection(tmp_path: Path) -> None:
    rows = _pairs_rows(6)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:4]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(path=str(tmp_path / "dd"), **USER_FIELDS)
    (source,) = list_sources(cfg)
    assert source.label == f"{tmp_path / 'dd'}[train]"
    test_rows = list(read_pairs(source, cfg, split="test"))
    assert [r.prompt for r in test_rows] == ["q4?", "q5?"]
    assert test_rows[0].id == f"{tmp_path / 'dd'}[test]:0"
    with pytest.raises(ConfigError, match="has no split 'validation'"):
        list_sources(DataConfig(path=str(tmp_path / "dd"), split="validation"))


def test_user_columns_and_groups(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "u.jsonl", _pairs_rows(4))
    pairs = list(iter_pairs(DataConfig(path=str(path), **USER_FIELDS)))
    assert [p.group for p in pairs] == ["0", "1", "2", "0"]
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("q1?", "yes 1", "no 1")
    without = list(iter_pairs(DataConfig(path=str(path))))
    assert {r.reason for r in without} == {"missing_field"}
    assert "set data.chosen_field" in without[0].detail


# --- conversational rows -----------------------------------------------------------------------

USER = {"role": "user", "content": "What is 2+2?"}
SYSTEM = {"role": "system", "content": "Be brief."}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}


def test_ultrafeedback_style_full_conversations(tmp_path: Path) -> None:
    rows = [
        # UltraFeedback binarized: prompt text, full conversations, extra keys and columns.
        {
            "prompt": USER["content"],
            "prompt_id": "x",
            "chosen": [USER, {**GOOD, "name": "bot"}],
            "rejected": [USER, BAD],
            "score_chosen": 9.0,
        },
        # Completions given as the assistant messages only.
        {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD, USER, GOOD]},
        # No prompt column: the shared start before an assistant reply is the prompt.
        {"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]},
        {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, USER, BAD]},
        {"chosen": [USER, GOOD], "rejected": [SYSTEM, USER, BAD]},
    ]
    path = _write_parquet(tmp_path / "uf.parquet", rows[:1], row_group_size=1)
    rest = _write_jsonl(tmp_path / "rest.jsonl", rows[1:])
    records = [
        *iter_pairs(DataConfig(path=str(path))),
        *iter_pairs(DataConfig(path=str(rest), schema="conversational")),
    ]
    assert [(r.prompt, r.chosen, r.rejected) for r in records[:4]] == [
        ([USER], [GOOD], [BAD]),
        ([SYSTEM, USER], [GOOD], [BAD, USER, GOOD]),
        ([SYSTEM, USER], [GOOD], [BAD]),
        ([USER, GOOD, USER], [GOOD], [BAD]),
    ]
    assert records[4].reason == "empty_prompt" and "prompt_field" in records[4].detail


def test_conversation_with_identical_or_empty_completions(tmp_path: Path) -> None:
    rows = [
        {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, GOOD], "rejected": [GOOD]},
        {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}], "rejected": [BAD]},
        {"prompt": "hi", "chosen": [{"role": "assistant", "content": " "}], "rejected": [BAD]},
        {"prompt": "hi", "chosen": "plain", "rejected": [BAD]},
    ]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    got = [
        r.reason if isinstance(r, Rejection) else "ok"
        for r in iter_pairs(DataConfig(path=str(path)))
    ]
    assert got == ["identical_completions", "empty_completion", "empty_completion", "ok"]


# --- rows with one completion, read for raypo sft ----------------------------------------------

SFT_LINES: list[tuple[object, str | None, str]] = [
    ({"prompt": "What is 2+2?", "completion": " 4"}, None, "missing_field"),
    ({"messages": [SYSTEM, USER, GOOD]}, None, "missing_field"),
    ({"messages": [USER, GOOD, USER, BAD]}, None, "missing_field"),
    ({"prompt": [USER], "completion": [GOOD]}, None, "missing_field"),
    ('{"prompt": "p", "completion": ', "malformed_json", "malformed_json"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, None, "identical_completions"),
    ({"messages": [USER]}, "invalid_messages", "missing_field"),
    ({"messages": [GOOD]}, "empty_prompt", "missing_field"),
    ({"messages": "hi"}, "non_text_value", "missing_field"),
    ({"prompt": "p", "completion": [USER, GOOD]}, "invalid_messages", "missing_field"),
    ({"prompt": "p", "completion": " "}, "empty_completion", "missing_field"),
    ({"completion": "c"}, "missing_field", "missing_field"),
]
"""(row or raw line, reason read for SFT, reason read for preference training); None = accepted;
line n of the file is entry n - 1."""


def test_sft_rows_are_read_for_sft_and_rejected_at_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    lines = [row if isinstance(row, str) else json.dumps(row) for row, _, _ in SFT_LINES]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for sft, column in ((True, 1), (False, 2)):
        records = list(iter_pairs(DataConfig(path=str(path)), sft=sft))
        got = [(r.row, r.reason if isinstance(r, Rejection) else None) for r in records]
        assert got == [(n, entry[column]) for n, entry in enumerate(SFT_LINES, start=1)], sft
    sft_records = list(iter_pairs(DataConfig(path=str(path)), sft=True))
    accepted = [
        (r.prompt, r.chosen, r.rejected) for r in sft_records if isinstance(r, PreferencePair)
    ]
    assert accepted == [
        ("What is 2+2?", " 4", None),
        ([SYSTEM, USER], [GOOD], None),  # the last assistant message is the completion
        ([USER, GOOD, USER], [BAD], None),
        ([USER], [GOOD], None),
        ("p", "same", None),  # a pair keeps its chosen completion; identical ones do not matter
    ]
    preference = list(iter_pairs(DataConfig(path=str(path))))
    assert "raypo sft" in preference[0].detail and "'chosen'" in preference[0].detail
    assert "last message" in sft_records[6].detail and "no prompt" in sft_records[7].detail


def test_sft_rows_under_user_columns_and_an_explicit_schema(tmp_path: Path) -> None:
    rows = [
        {"question": "q?", "answer": " a", "dialogue": [USER, GOOD]},
        {"question": "q?", "answer": " a", "dialogue": [USER, GOOD]},
    ]
    path = _write_jsonl(tmp_path / "u.jsonl", rows)
    fields = {"prompt_field": "question", "completion_field": "answer"}
    (first, _) = iter_pairs(DataConfig(path=str(path), **fields), sft=True)
    # auto: no messages column by that name, so the completion column decides.
    assert (first.prompt, first.chosen, first.rejected) == ("q?", " a", None)
    cfg = DataConfig(path=str(path), schema="messages", messages_field="dialogue")
    (first, _) = iter_pairs(cfg, sft=True)
    assert (first.prompt, first.chosen) == ([USER], [GOOD])
    hh = list(iter_pairs(DataConfig(path=str(HH_FILE), max_rows=5), sft=True))
    assert all(isinstance(r, PreferencePair) and r.rejected is None for r in hh)


# --- subsets: several sources, each its pairs' group -------------------------------------------


def test_subsets_are_sources_whose_name_is_the_group(tmp_path: Path) -> None:
    for name, count in (("helpful-base", 3), ("harmless-base", 2)):
        _write_jsonl(tmp_path / "hh" / name / "train.jsonl", _pairs_rows(count))
    fields = {k: v for k, v in USER_FIELDS.items() if k != "group_field"}
    cfg = DataConfig(path=str(tmp_path / "hh"), subsets=["helpful-base", "harmless-base"], **fields)
    assert [s.subset for s in list_sources(cfg)] == ["helpful-base", "harmless-base"]
    pairs = list(iter_pairs(cfg))
    assert [p.group for p in pairs] == ["helpful-base"] * 3 + ["harmless-base"] * 2
    assert len({p.id for p in pairs}) == 5  # the same rows in both subsets, distinct ids
    by_column = list(iter_pairs(dataclasses.replace(cfg, group_field="annotator")))
    assert [p.group for p in by_column] == ["0", "1", "2", "0", "1"]


def test_hub_subsets_are_data_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(path: str, split: str, name: str | None, data_dir: str | None) -> list[int]:
        calls.append(data_dir)
        return [0] * 5

    monkeypatch.setattr(readers, "_load_hub_or_files", fake_load)
    cfg = DataConfig(path="Anthropic/hh-rlhf", subsets=["helpful-base", "harmless-base"])
    sources = list_sources(cfg)
    assert calls == ["helpful-base", "harmless-base"]
    assert [s.label for s in sources] == [
        "hf:Anthropic/hh-rlhf/helpful-base[train]",
        "hf:Anthropic/hh-rlhf/harmless-base[train]",
    ]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"subsets": ["a", "a"]}, "data.subsets"),
        ({"subsets": ["a", " "]}, "data.subsets"),
        ({"subsets": ["a"], "hf_data_dir": "b"}, "data.hf_data_dir"),
        ({"subsets": ["a"], "path": "builtin:hh_sample"}, "data.subsets"),
    ],
)
def test_bad_subsets_name_the_key(settings: dict[str, Any], key: str) -> None:
    settings = {"path": "Anthropic/hh-rlhf", **settings}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DataConfig(**settings)


# --- source errors -----------------------------------------------------------------------------


def test_source_errors_name_the_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        list_sources(DataConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"no data files \(\*\.jsonl"):
        list_sources(DataConfig(path=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="no data files"):
        list_sources(DataConfig(path=str(tmp_path / "*.parquet")))
    array = tmp_path / "array.json"
    array.write_text('[{"prompt": "p"}]')
    with pytest.raises(ConfigError, match="JSON array, not JSON Lines"):
        list_sources(DataConfig(path=str(array)))
    text = tmp_path / "pairs.txt"
    text.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(ConfigError, match="set data.format jsonl or parquet"):
        list_sources(DataConfig(path=str(text)))
    assert [r.prompt for r in iter_pairs(DataConfig(path=str(text), format="jsonl"))] == ["p"]
    with pytest.raises(ConfigError, match="builtin data"):
        list_sources(DataConfig(format="parquet"))
    with pytest.raises(ConfigError, match="unknown builtin data"):
        list_sources(DataConfig(path="builtin:nope"))


def test_hub_style_name_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(path: str, split: str, name: str | None, data_dir: str | None) -> list[int]:
        calls.append((path, split, name, data_dir))
        return [0] * 5

    monkeypatch.setattr(readers, "_load_hub_or_files", fake_load)
    cfg = DataConfig(path="Anthropic/hh-rlhf", hf_data_dir="harmless-base", split="test")
    assert list_sources(cfg) == [Source("hf", "Anthropic/hh-rlhf", 0, 1, "test")]
    assert calls == [("Anthropic/hh-rlhf", "test", None, "harmless-base")]
    assert list_sources(cfg)[0].label == "hf:Anthropic/hh-rlhf[test]"


# --- the summary -------------------------------------------------------------------------------


def _summary(accepted: int, reasons: dict[str, int], source: str = "a.jsonl") -> DataSummary:
    records: list[Any] = [
        PreferencePair(str(n), "p", "c", "r", None, source, n) for n in range(accepted)
    ]
    for reason, count in reasons.items():
        records += [Rejection(source, n, reason, "d", "raw") for n in range(count)]
    return DataSummary.of(records)


def test_summary_merge_and_json_round_trip() -> None:
    left = _summary(10, {"malformed_json": 2}, "a.jsonl")
    right = _summary(5, {"malformed_json": 1, "empty_prompt": 3}, "b.jsonl")
    merged = left.merge(right)
    assert (merged.total, merged.accepted, merged.rejected) == (21, 15, 6)
    assert merged.per_reason == {"malformed_json": 3, "empty_prompt": 3}
    assert merged.per_source["b.jsonl"] == {"total": 9, "accepted": 5, "rejected": 4}
    assert (left.total, left.rejected) == (12, 2)
    assert DataSummary.from_json(merged.to_json()) == merged
    table = merged.format_table()
    assert "rows read          21" in table and "empty_prompt" in table and "b.jsonl" in table


def test_summary_check_threshold_message() -> None:
    summary = _summary(163, {"empty_completion": 20, "malformed_json": 12, "blank_line": 5})
    with pytest.raises(DataQualityError) as raised:
        summary.check(0.1, "runs/x/rejects.jsonl")
    assert str(raised.value) == (
        "37 of 200 rows (18.5%) were rejected, above data.max_reject_fraction = 0.1; "
        "see runs/x/rejects.jsonl; top reasons: empty_completion 20, malformed_json 12, "
        "blank_line 5"
    )
    summary.check(0.2)
    with pytest.raises(DataQualityError, match="no rows were read"):
        DataSummary().check(0.5)
    with pytest.raises(DataQualityError, match="none of the 3 rows read was accepted"):
        _summary(0, {"malformed_json": 3}).check(1.0)


def test_rejection_reason_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        Rejection("a", 1, "bad_vibes", "", "")
