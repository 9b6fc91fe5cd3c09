"""No recipe key is accepted and then ignored: every mllm argument is read by the code it configures.

`eval_data_path` was once accepted by the config and read by nothing. This guard walks every field of
the mllm argument dataclasses (TrainingArguments' own keys are transformers') and asks that some
module besides `mllm/config.py` reads it; the behaviour of each key is tested where it acts.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mllm.config import DataArguments, ModelArguments, TuningArguments

PACKAGE = Path(__file__).resolve().parents[1] / "mllm"
FIELDS = [
    (cls.__name__, f.name)
    for cls in (ModelArguments, TuningArguments, DataArguments)
    for f in dataclasses.fields(cls)
]


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return {
        str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8")
        for p in PACKAGE.rglob("*.py")
        if p.name != "config.py"
    }


@pytest.mark.parametrize("group,key", FIELDS, ids=[key for _, key in FIELDS])
def test_every_recipe_key_is_read_by_the_code(group: str, key: str, sources: dict[str, str]) -> None:
    read = re.compile(rf"\.{key}\b|[\"']{key}[\"']")
    readers = [name for name, text in sources.items() if read.search(text)]
    assert readers, f"{group}.{key} is accepted in recipes but nothing outside config.py reads it"
