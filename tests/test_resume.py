"""Resuming from checkpoint-N gives the same loss at every later step as the uninterrupted run."""

from __future__ import annotations

import pytest

from tests.test_trainer import make_run, step_losses


@pytest.mark.parametrize("tune_llm", ["full", "lora", "qlora"])
def test_resume_gives_identical_losses(tiny_components, tmp_path, tune_llm):
    modes = {"tune_llm": tune_llm, "lora_dropout": 0.1}  # dropout: the RNG state must be restored too
    straight = make_run(tiny_components, tmp_path / "straight", max_steps=6, save_steps=3, **modes)
    straight.train()
    expected = step_losses(straight)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    # Another seed: whatever the checkpoint does not restore differs from the straight run.
    resumed = make_run(tiny_components, tmp_path / "resumed", seed=123, max_steps=6, save_steps=3, **modes)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = step_losses(resumed)
    assert resumed.state.global_step == 6
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, got, expected)
