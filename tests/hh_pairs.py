"""The first HH pairs of tests/data, tokenised as the data pipeline does, for tests that need real
preference pairs without running the Ray Data pipeline."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from raypo.config import DataConfig
from raypo.data.formats import split_hh
from raypo.data.records import PreferencePair
from raypo.data.tokenize import tokenize_pairs

HH_GZ = Path(__file__).parent / "data" / "hh_harmless_1800.jsonl.gz"
"""1,800 raw Anthropic HH harmless pairs (MIT, tests/data/hh_LICENSE)."""


def hh_columns(
    tokenizer: Any, count: int = 8, max_length: int = 96, max_prompt_length: int = 64
) -> dict[str, list]:
    """The first ``count`` pairs tokenised, as the column lists Ray Data hands a worker."""
    lines = gzip.decompress(HH_GZ.read_bytes()).decode().splitlines()[:count]
    pairs = []
    for row, line in enumerate(lines, start=1):
        record = json.loads(line)
        prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        pairs.append(PreferencePair(f"hh:{row}", prompt, chosen, rejected, None, "hh", row))
    data = DataConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    rows = [pair.to_row() for pair in tokenize_pairs(pairs, tokenizer, data)]
    return {name: [row[name] for row in rows] for name in rows[0]}
