"""Shared pytest fixtures: tiny offline components, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.build_tiny_components import build_tiny_components


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> folder of the tiny clip-vision, siglip-vision, llama, qwen2 and gpt2 components."""
    return build_tiny_components(tmp_path_factory.mktemp("tiny-components"))


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50-scene synthetic dataset (data_tools.synth): images/, stage1_*.json, stage2_*.json, ..."""
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth-small")
    generate_dataset(out, num_scenes=50, seed=0)
    return out
