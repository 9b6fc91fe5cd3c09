"""`mllm eval` on a saved tiny model: files written, metrics consistent with predictions, blank images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import mllm.evaluation.runner as runner
from mllm.evaluation import evaluate, vqa_accuracy
from mllm.evaluation.runner import (
    LLAVA_VQA_INSTRUCTION,
    VqaSample,
    load_vqa_samples,
    main,
    majority_baseline,
    question_type_prior,
)
from mllm.models import MllmProcessor
from tests.data_fixtures import save_tiny_lora_run, train_tiny_full_run


@pytest.fixture(scope="module")
def saved_model(tiny_components: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LoRA run saved as `mllm train` saves it (trained.safetensors + adapter + mllm_run.json)."""
    return save_tiny_lora_run(tiny_components, tmp_path_factory.mktemp("tiny-lora-run"))


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic shapes dataset (data_tools.synth), whose vqa_val.jsonl is the main job's eval file."""
    from data_tools.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, num_scenes=40, seed=0, image_size=32, val_fraction=0.2, test_fraction=0.2)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_predictions_and_consistent_metrics(
    saved_model: Path, vqa_dir: Path, tmp_path: Path
) -> None:
    data = vqa_dir / "vqa_val.jsonl"
    metrics = evaluate(
        str(saved_model), "vqa", str(data), output=str(tmp_path), batch_size=4, max_new_tokens=4
    )
    rows = _read_jsonl(tmp_path / "predictions.jsonl")
    expected_n = len(data.read_text().splitlines())
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["num_samples"] == expected_n == len(rows)
    assert set(metrics) - {"vqa_accuracy_normalized"} == {
        "exact_match",
        "vqa_accuracy",
        "num_samples",
        "num_skipped",
        "majority_baseline",
        "question_type_prior",  # the synthetic files carry question_type
        "exact_match_by_type",
    }
    assert set(rows[0]) >= {"question_id", "question", "prompt", "prediction", "answers", "question_type"}
    assert rows[0]["question"] in rows[0]["prompt"] and "<image>" in rows[0]["prompt"]
    for qtype, score in metrics["exact_match_by_type"].items():
        of_type = [r for r in rows if r["question_type"] == qtype]
        assert score == pytest.approx(sum(r["prediction"] == r["answers"][0] for r in of_type) / len(of_type))
    recomputed = sum(vqa_accuracy(r["prediction"], r["answers"]) for r in rows) / len(rows)
    assert metrics["vqa_accuracy"] == pytest.approx(recomputed)
    assert 0.0 < metrics["majority_baseline"] < 1.0
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_blank_images_are_grey_and_same_size(
    saved_model: Path, vqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[tuple[int, int], set]] = []
    import mllm.inference.generate as generate

    real = generate.generate_answers

    def spy(model, processor, prompts, images, **kw):
        seen.extend((im.size, set(im.getdata())) for group in images for im in group)
        return real(model, processor, prompts, images, **kw)

    monkeypatch.setattr(generate, "generate_answers", spy)
    evaluate(
        str(saved_model),
        "vqa",
        str(vqa_dir / "vqa_val.jsonl"),
        output=str(tmp_path),
        limit=3,
        blank_images=True,
    )
    assert len(seen) == 3
    assert all(size == (32, 32) and colors == {(128, 128, 128)} for size, colors in seen)


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[tuple[int, int]]]]:
    """What `mllm eval` sends to the model: (prompt, sizes of its images), generation replaced by ""."""
    import mllm.inference.generate as generate

    seen: list[tuple[str, list[tuple[int, int]]]] = []

    def fake(model, processor, prompts, images, **kw):
        seen.extend((p, [im.size for im in group]) for p, group in zip(prompts, images))
        return [""] * len(prompts)

    monkeypatch.setattr(generate, "generate_answers", fake)
    return seen


def test_prompt_is_the_question_as_in_the_data_unless_an_instruction_is_given(
    saved_model: Path, vqa_dir: Path, tmp_path: Path, sent: list
) -> None:
    data = str(vqa_dir / "vqa_val.jsonl")
    first = load_vqa_samples(data, limit=1)[0]
    evaluate(str(saved_model), "vqa", data, output=str(tmp_path), limit=2)
    assert len(sent) == 2
    own_template = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert sent[0][0].endswith(f"<image>\n{first.question}<|eot_id|>{own_template}")  # nothing added
    assert LLAVA_VQA_INSTRUCTION not in sent[0][0]
    sent.clear()
    evaluate(str(saved_model), "vqa", data, output=str(tmp_path), limit=1, instruction=LLAVA_VQA_INSTRUCTION)
    assert sent[0][0].endswith(f"<image>\n{first.question}\n{LLAVA_VQA_INSTRUCTION}<|eot_id|>{own_template}")
    sent.clear()
    evaluate(str(saved_model), "vqa", data, output=str(tmp_path), limit=1, template="vicuna_v1")
    assert sent[0][0].endswith(f"USER: <image>\n{first.question} ASSISTANT:")
    sent.clear()
    evaluate(
        str(saved_model), "vqa", data, output=str(tmp_path), limit=1, template="vicuna_v1",
        image_position="after",
    )  # fmt: skip
    assert sent[0][0].endswith(f"USER: {first.question}\n<image> ASSISTANT:")
    rows = _read_jsonl(tmp_path / "predictions.jsonl")
    assert rows[0]["prompt"] == sent[0][0]  # predictions.jsonl shows what the model was asked
    with pytest.raises(ValueError, match=r"image_position `middle`.*before, after"):
        evaluate(str(saved_model), "vqa", str(vqa_dir / "vqa_val.jsonl"), image_position="middle")


def test_reads_json_variants(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {"id": 7, "image": "a.png", "question": "q1", "answer": "yes"},
        {
            "question_id": "x",
            "image": "a.png",
            "question": "q2",
            "answers": [{"answer": "2", "answer_id": 1}],
        },
    ]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    samples = load_vqa_samples(tmp_path / "q.json", image_folder=tmp_path)
    assert [(s.question_id, s.answers) for s in samples] == [("7", ("yes",)), ("x", ("2",))]
    assert samples[0].images == (str(tmp_path / "a.png"),)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl#1.*answers"):
        load_vqa_samples(tmp_path / "bad.jsonl")


def test_majority_baseline() -> None:
    answer, score = majority_baseline([["yes"] * 10, ["yes"] * 10, ["no"] * 10, ["2"] * 10])
    assert answer == "yes" and score == pytest.approx(0.5)
    # the official accuracy scores "yes" 0 against ten "Yes": the vote counts answers as written
    answer, score = majority_baseline([["Yes"] * 10, ["Yes"] * 10, ["yes"] * 10, ["no"] * 10])
    assert answer == "Yes" and score == pytest.approx(0.5)


def test_question_type_prior_takes_the_majority_answer_of_each_type() -> None:
    def sample(qtype, answer):
        return VqaSample("q", "?", (), (answer,), "f#0", qtype)

    samples = [sample("exist", "yes"), sample("exist", "yes"), sample("exist", "no"), sample("count", "2")]
    assert question_type_prior(samples) == pytest.approx(0.75)  # "yes" for exist, "2" for count
    assert majority_baseline([s.answers for s in samples])[1] == pytest.approx(0.5)


def test_unknown_task_lists_supported(saved_model: Path, vqa_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"caption, mcq, vqa, yesno, retrieval"):
        evaluate(str(saved_model), "ocr", str(vqa_dir / "vqa_val.jsonl"))
    with pytest.raises(SystemExit):
        main([str(saved_model), "--task", "ocr", "--data", "x.jsonl"])


def test_cli_main(saved_model: Path, vqa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        str(saved_model),
        "--task",
        "vqa",
        "--data",
        str(vqa_dir / "vqa_val.jsonl"),
        "--output",
        str(tmp_path),
    ]
    argv += ["--image-folder", str(vqa_dir), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == 2
    table = capsys.readouterr().out
    assert "| vqa_accuracy " in table and f"| {metrics['vqa_accuracy']:.4f} |" in table  # the results table
    assert main([*argv, "--json"]) == 0  # resumed: nothing left to ask, the same metrics as JSON
    printed = capsys.readouterr()
    assert "2 of 2 samples already predicted" in printed.err
    assert json.loads(printed.out) == metrics  # stdout is the JSON alone
    assert runner.TASKS.names() == ["caption", "mcq", "vqa", "yesno"]


def test_template_defaults_to_the_trained_one(
    saved_model: Path, vqa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run recorded with `template: vicuna_v1` is prompted in Vicuna form unless told otherwise."""
    import shutil

    import mllm.inference.generate as generate

    run = shutil.copytree(saved_model, tmp_path / "run")
    record = json.loads((run / "mllm_run.json").read_text())
    record["config"] = {**record.get("config", {}), "template": "vicuna_v1"}
    (run / "mllm_run.json").write_text(json.dumps(record))
    prompts: list[str] = []
    monkeypatch.setattr(
        generate,
        "generate_answers",
        lambda m, p, texts, images, **kw: prompts.extend(texts) or [""] * len(texts),
    )
    data = str(vqa_dir / "vqa_val.jsonl")
    evaluate(str(run), "vqa", data, output=str(tmp_path / "a"), limit=1)
    evaluate(str(run), "vqa", data, output=str(tmp_path / "b"), limit=1, template="auto")
    assert prompts[0].endswith("ASSISTANT:")
    assert prompts[1].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def _write_images(folder: Path, *sizes: tuple[int, int]) -> list[str]:
    names = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 0, 0)).save(folder / f"im{i}.png")
        names.append(f"im{i}.png")
    return names


def _training_prefix(turns, tokenizer, template: str | None) -> str:
    """What `mllm train` shows the model before the last assistant answer of ``turns``."""
    from mllm.data.templates import render

    rendered = render(list(turns), tokenizer, template)
    return rendered.text[: rendered.spans[-1][0]]


def test_llava_record_keeps_its_placeholder_where_it_stands(
    saved_model: Path, tmp_path: Path, sent: list
) -> None:
    (name,) = _write_images(tmp_path, (20, 16))
    record = {
        "id": "r1",
        "image": name,
        "conversations": [
            {"from": "human", "value": "What color is it?\n<image>"},
            {"from": "gpt", "value": "red"},
        ],
    }
    (tmp_path / "test.json").write_text(json.dumps([record]))
    metrics = evaluate(
        str(saved_model), "vqa", str(tmp_path / "test.json"), output=str(tmp_path / "out"),
        template="vicuna_v1",
    )  # fmt: skip
    assert sent == [(sent[0][0], [(20, 16)])]
    assert sent[0][0].endswith("USER: What color is it?\n<image> ASSISTANT:")  # not moved before it
    assert metrics["num_samples"] == 1
    (row,) = _read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert (row["question_id"], row["question"], row["answers"]) == (
        "r1",
        "What color is it?\n<image>",
        ["red"],
    )
    assert row["image"] == str(tmp_path / name)


def test_messages_record_with_content_parts(saved_model: Path, tmp_path: Path, sent: list) -> None:
    (name,) = _write_images(tmp_path, (24, 24))
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Is it red?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        ],
        "images": [name],
    }
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    evaluate(str(saved_model), "vqa", str(tmp_path / "test.jsonl"), output=str(tmp_path / "out"))
    ((prompt, sizes),) = sent
    assert "Is it red?\n<image><|eot_id|>" in prompt and sizes == [(24, 24)]
    (sample,) = load_vqa_samples(tmp_path / "test.jsonl")
    assert sample.answers == ("yes",) and sample.question_id == "test.jsonl#1"  # no id: its source


@pytest.mark.parametrize("template", [None, "vicuna_v1", "chatml"])
def test_multi_turn_record_asks_the_last_turn_with_the_earlier_ones_as_context(
    saved_model: Path, tmp_path: Path, sent: list, template: str | None
) -> None:
    """Two images, a system prompt and an earlier exchange: the prompt is exactly what training showed
    the model before the last answer, and both images go in placeholder order."""
    from mllm.data.formats import load_records

    first, second = _write_images(tmp_path, (16, 16), (32, 24))
    record = {
        "id": "chat",
        "image": [first, second],
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "<image>\nWhat shape is this?"},
            {"from": "gpt", "value": "circle"},
            {"from": "human", "value": "And here?\n<image>\nSame color?"},
            {"from": "gpt", "value": "no"},
        ],
    }
    (tmp_path / "chat.json").write_text(json.dumps([record]))
    evaluate(
        str(saved_model), "vqa", str(tmp_path / "chat.json"), output=str(tmp_path / "out"), template=template
    )
    ((prompt, sizes),) = sent
    assert sizes == [(16, 16), (32, 24)]
    (trained,) = load_records(tmp_path / "chat.json", bad_data="strict")[0]
    tokenizer = MllmProcessor.from_pretrained(str(saved_model)).tokenizer
    assert prompt == _training_prefix(trained.turns, tokenizer, template).rstrip(" ")
    assert "Answer briefly." in prompt and "circle" in prompt and prompt.count("<image>") == 2
    (sample,) = load_vqa_samples(tmp_path / "chat.json")
    assert sample.answers == ("no",) and [t.role for t in sample.context] == ["system", "user", "assistant"]


def test_reads_parquet_and_rejects_records_without_an_answer(tmp_path: Path) -> None:
    import datasets

    (name,) = _write_images(tmp_path, (8, 8))
    conversations = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    datasets.Dataset.from_list([{"id": "p0", "image": name, "conversations": conversations}]).to_parquet(
        tmp_path / "test.parquet"
    )
    (sample,) = load_vqa_samples(tmp_path / "test.parquet")
    assert (sample.question, sample.answers, sample.images) == ("<image>\nq", ("a",), (str(tmp_path / name),))
    (tmp_path / "open.json").write_text(json.dumps([{"id": "x", "conversations": conversations[:1]}]))
    with pytest.raises(ValueError, match=r"open.json#0.*last turn is 'user'"):
        load_vqa_samples(tmp_path / "open.json")
    (tmp_path / "neither.json").write_text(json.dumps([{"id": "x", "text": "q"}]))
    with pytest.raises(ValueError, match=r"neither.json#0.*`question`.*conversations"):
        load_vqa_samples(tmp_path / "neither.json")


def test_instruction_flag_defaults_to_none() -> None:
    parser = runner._parser()
    assert parser.parse_args(["run", "--task", "vqa", "--data", "x.json"]).instruction is None
    given = parser.parse_args(
        ["run", "--task", "vqa", "--data", "x.json", "--instruction", LLAVA_VQA_INSTRUCTION]
    )
    assert given.instruction == LLAVA_VQA_INSTRUCTION
    assert "LLaVA-1.5" in parser.format_help()


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def _colour_records(folder: Path, n: int, seed: int) -> list[dict]:
    """LLaVA records about one-colour pictures, the image after the question as data_tools.synth puts
    it; every other record goes on with a yes/no question that needs the picture and the first turn."""
    import random

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        color = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[name])
        Image.new("RGB", (48, 48), color).save(folder / "images" / f"{seed}-{i}.png")
        turns = [("What color is the picture?\n<image>", name)]
        if i % 2:
            asked = rng.choice(sorted(COLORS))
            turns.append((f"Is it {asked}?", "yes" if asked == name else "no"))
        conversations = [{"from": w, "value": v} for q, a in turns for w, v in (("human", q), ("gpt", a))]
        records.append(
            {"id": f"{seed}-{i}", "image": f"images/{seed}-{i}.png", "conversations": conversations}
        )
    return records


def test_eval_of_a_model_trained_on_llava_records_scores_what_its_answers_deserve(
    tiny_components: dict[str, Path], tmp_path: Path
) -> None:
    """`mllm train` on a LLaVA file, then `mllm eval RUN --task vqa --data TEST.json` typed with its
    defaults on the same format: every prompt is what training showed before the last answer (no
    suffix, earlier turns as context), and the accuracy is the exact-match rate of its answers."""
    import subprocess
    import sys

    from mllm.data.formats import load_records
    from mllm.data.templates import render

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train.json").write_text(json.dumps(_colour_records(data, 64, seed=0)))
    (data / "test.json").write_text(json.dumps(_colour_records(data, 24, seed=1)))
    run = train_tiny_full_run(tiny_components, data / "train.json", tmp_path / "run", max_steps=60)

    out = tmp_path / "eval"
    command = [
        sys.executable,
        "-m",
        "mllm",
        "eval",
        str(run),
        "--task",
        "vqa",
        "--data",
        str(data / "test.json"),
        "--json",
    ]
    done = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(done.stdout[done.stdout.index("{") :]) == metrics

    records = load_records(data / "test.json", bad_data="strict")[0]
    rows = _read_jsonl(out / "predictions.jsonl")
    assert [r["question_id"] for r in rows] == [r.id for r in records]
    tokenizer = MllmProcessor.from_pretrained(str(run)).tokenizer
    for row, record in zip(rows, records):
        trained = render(record.turns, tokenizer, None)  # the run recorded template: null
        assert row["prompt"] == trained.text[: trained.spans[-1][0]].rstrip(" ")
        assert row["answers"] == [record.turns[-1].content]
    assert sum(len(r.turns) == 4 for r in records) == 12  # half the answers need the earlier turns

    deserved = sum(r["prediction"] == r["answers"][0] for r in rows) / len(rows)
    assert metrics["num_samples"] == 24
    assert metrics["exact_match"] == pytest.approx(deserved)
    assert metrics["vqa_accuracy"] == pytest.approx(deserved)  # one reference answer: exact match
    print(f"exact match {deserved:.3f}, majority baseline {metrics['majority_baseline']:.3f}")
    assert deserved >= 0.6 and metrics["majority_baseline"] < deserved - 0.2, metrics


def _rows_with_bad_images(vqa_dir: Path, tmp_path: Path) -> Path:
    """The first 6 questions of vqa_val.jsonl with a missing and an unreadable image among them."""
    rows = _read_jsonl(vqa_dir / "vqa_val.jsonl")[:6]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[1]["image"] = str(vqa_dir / "no-such-image.png")
    rows[3]["image"] = str(tmp_path / "broken.png")
    for row in rows:
        if not Path(row["image"]).is_absolute():
            row["image"] = str(vqa_dir / row["image"])
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data


def test_missing_and_broken_images_are_skipped_counted_and_named(
    saved_model: Path, vqa_dir: Path, tmp_path: Path
) -> None:
    data = _rows_with_bad_images(vqa_dir, tmp_path)
    metrics = evaluate(str(saved_model), "vqa", str(data), output=str(tmp_path / "out"), max_new_tokens=2)
    assert metrics["num_samples"] == 4 and metrics["num_skipped"] == 2
    assert metrics["skipped"] == {"missing_image": 1, "unreadable_image": 1}
    ids = [row["question_id"] for row in _read_jsonl(data)]
    assert [q["question_id"] for q in metrics["skipped_questions"]] == [ids[1], ids[3]]
    assert len(_read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 4


def test_strict_stops_at_the_first_bad_image(saved_model: Path, vqa_dir: Path, tmp_path: Path) -> None:
    """As a user types it: `mllm eval ... --strict` exits non-zero naming the file."""
    import subprocess
    import sys

    data = _rows_with_bad_images(vqa_dir, tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "mllm", "eval", str(saved_model), "--task", "vqa", "--data", str(data),
         "--output", str(tmp_path / "out"), "--max-new-tokens", "2", "--strict"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "no-such-image.png" in done.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_image_paths_cannot_leave_the_image_folder(vqa_dir: Path, tmp_path: Path) -> None:
    row = _read_jsonl(vqa_dir / "vqa_val.jsonl")[0]
    row["image"] = "../" + Path(vqa_dir).name + "/" + row["image"]
    data = tmp_path / "escape.jsonl"
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(ValueError, match="outside --image-folder"):
        load_vqa_samples(data, image_folder=folder)
