"""SupervisedDataset: items, drops by reason, truncation, bad images in workers, skip reports."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from mllm.data.collator import MllmCollator
from mllm.data.dataset import SkipReport, SupervisedDataset, build_dataset, write_skip_report
from mllm.data.errors import BadRecordError
from mllm.data.formats import Record, Turn
from mllm.data.templates import IGNORE_INDEX
from scripts.build_tiny_components import TinySizes
from tests.data_fixtures import NUM_IMAGE_TOKENS, image, make_processor, record

SIDE = TinySizes().image_size  # the tiny vision towers' input resolution


@pytest.fixture(scope="module")
def processor(tiny_components):
    return make_processor(tiny_components, "qwen2")


def _image_runs(ids: torch.Tensor, image_id: int) -> list[int]:
    """Lengths of the maximal runs of image tokens."""
    runs, n = [], 0
    for t in ids.tolist() + [None]:
        if t == image_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_item_has_expanded_image_tokens_and_masked_labels(processor):
    ds = SupervisedDataset(
        [record("a", ("<image>\nWhat color?", "red"), images=(image(),))], processor, "qwen2", 512
    )
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
    assert _image_runs(ids, processor.image_token_id) == [NUM_IMAGE_TOKENS]
    assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "red<|im_end|>"
    assert item["pixel_values"].shape == (1, 3, SIDE, SIDE) and item["pixel_values"].dtype == torch.float32
    assert item["id"] == "a" and item["skipped"] == []
    assert ds.lengths == [len(ids)] and ds.modality == [True]


def test_text_only_item_has_no_pixel_values(processor):
    ds = SupervisedDataset([record("t", ("How many?", "two"))], processor, "qwen2", 512)
    assert "pixel_values" not in ds[0] and ds.modality == [False]


def test_no_supervised_tokens_is_dropped_and_counted(processor):
    records = [record("empty", ("<image>\nhi", ""), images=(image(),)), record("ok", ("hi", "yes"))]
    # "" + <|im_end|> still supervises the end token; plain on an assistant-free record has nothing.
    ds = SupervisedDataset(records, processor, "qwen2", 512)
    assert len(ds) == 2
    only_user = Record("u", (Turn("user", "<image>"),), (image(),), "test.json#u")
    ds = SupervisedDataset([only_user, records[1]], processor, "plain", 512)
    assert len(ds) == 1 and ds.skipped == Counter(no_supervised_tokens=1)
    assert ds.errors[0].record_id == "u"


def test_too_long_drop_counts_and_strict_names_record_and_file(processor):
    long = record("long", ("<image>\n" + "red " * 40, "blue " * 40), images=(image(),))
    ds = SupervisedDataset([long, record("ok", ("hi", "yes"))], processor, "qwen2", 64)
    assert len(ds) == 1 and ds.skipped == Counter(too_long=1)
    with pytest.raises(BadRecordError, match="'long'.*test.json#long.*too_long"):
        SupervisedDataset([long], processor, "qwen2", 64, bad_data="strict")


def test_cut_text_keeps_images_whole_and_drops_when_images_do_not_fit(processor):
    long = record("long", ("<image>\nWhat color?", "blue " * 60), images=(image(),))
    ds = SupervisedDataset([long], processor, "qwen2", 64, truncation="cut_text")
    item = ds[0]
    assert len(item["input_ids"]) == 64 == ds.lengths[0]
    assert _image_runs(item["input_ids"], processor.image_token_id) == [NUM_IMAGE_TOKENS]
    assert (item["labels"] != IGNORE_INDEX).any()
    late = record("late", ("blue " * 60 + "<image>", "red"), images=(image(),))
    ds = SupervisedDataset([late], processor, "qwen2", 64, truncation="cut_text")
    assert len(ds) == 0 and ds.skipped == Counter(too_long=1)


def test_unknown_modes_and_template_fail_at_construction(processor):
    with pytest.raises(ValueError, match="bad_data"):
        SupervisedDataset([], processor, "qwen2", 64, bad_data="ignore")
    with pytest.raises(ValueError, match="truncation"):
        SupervisedDataset([], processor, "qwen2", 64, truncation="left")
    with pytest.raises(ValueError, match="choose one of"):
        SupervisedDataset([], processor, "nope", 64)


def test_bad_image_is_replaced_by_next_and_reported(processor, tmp_path):
    good = tmp_path / "good.png"
    image().save(good)
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not a png")
    records = [
        record("r0", ("<image>\nq", "a"), images=(str(good),)),
        record("r1", ("<image>\nq", "b"), images=(str(corrupt),)),
        record("r2", ("<image>\nq", "c"), images=(str(tmp_path / "missing.png"),)),
        record("r3", ("<image>\nq", "d"), images=(str(good),)),
    ]
    ds = SupervisedDataset(records, processor, "qwen2", 512)
    item = ds[1]
    assert item["id"] == "r3"
    assert item["skipped"] == [("unreadable_image", "r1"), ("missing_image", "r2")]
    # In DataLoader workers: the worker survives and the skips reach the main process.
    loader = DataLoader(
        ds, batch_size=2, num_workers=1, collate_fn=MllmCollator(processor.tokenizer.pad_token_id)
    )
    report = SkipReport(ds.skipped)
    ids_seen = 0
    for batch in loader:
        report.update(batch.pop("skipped"))
        ids_seen += batch["input_ids"].shape[0]
    assert ids_seen == 4
    assert report.counts == Counter(unreadable_image=1, missing_image=1)
    strict = SupervisedDataset(records, processor, "qwen2", 512, bad_data="strict")
    with pytest.raises(BadRecordError, match="r1"):
        strict[1]


def test_write_skip_report_is_json_by_reason(tmp_path):
    path = tmp_path / "out" / "skipped.json"
    write_skip_report(Counter(too_long=2, missing_image=1), path)
    assert json.loads(path.read_text()) == {"total": 3, "by_reason": {"missing_image": 1, "too_long": 2}}
    assert [p.name for p in path.parent.iterdir()] == ["skipped.json"]  # no temp file left


def test_build_dataset_merges_load_and_dataset_counts(processor, synth_small, tmp_path):
    data = json.loads((synth_small / "stage2_train.json").read_text())
    data[0]["conversations"] = data[0]["conversations"][:1]  # ends with a user turn
    (tmp_path / "images").symlink_to(synth_small / "images")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    longest = max(build_dataset(path, None, processor, "qwen2", None, "skip", "drop").lengths)
    ds = build_dataset(path, None, processor, "qwen2", longest - 1, "skip", "drop")
    assert ds.skipped["bad_turn_order"] == 1 and ds.skipped["too_long"] >= 1
    assert len(ds) + sum(ds.skipped.values()) == len(data)
    assert ds[0]["pixel_values"].shape[0] == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words_before=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    answer_words=st.integers(1, 40),
    max_len=st.integers(8, 140),
    truncation=st.sampled_from(["drop", "cut_text"]),
    num_image_tokens=st.sampled_from([1, 4, 16]),
)
def test_truncation_never_splits_an_image_run(
    tiny_components, words_before, answer_words, max_len, truncation, num_image_tokens
):
    """Every kept sample: image-token count == len(images) * num_image_tokens, in whole runs."""
    proc = _processors(tiny_components, num_image_tokens)
    prompt = "".join("red " * n + "<image>" for n in words_before[:-1]) + "blue " * words_before[-1] + "?"
    n_images = len(words_before) - 1
    rec = record("p", (prompt, "green " * answer_words), images=tuple(image() for _ in range(n_images)))
    ds = SupervisedDataset([rec], proc, "qwen2", max_len, truncation=truncation)
    if len(ds) == 0:
        assert ds.skipped.keys() <= {"too_long"}
        return
    item = ds[0]
    assert len(item["input_ids"]) <= max_len and len(item["input_ids"]) == ds.lengths[0]
    runs = _image_runs(item["input_ids"], proc.image_token_id)  # adjacent images form one longer run
    assert sum(runs) == n_images * num_image_tokens and all(r % num_image_tokens == 0 for r in runs)
    assert (item["labels"] != IGNORE_INDEX).any()
    assert item.get("pixel_values", torch.empty(0)).shape[0] == n_images


_PROCESSORS: dict = {}


def _processors(components, num_image_tokens):
    key = (id(components), num_image_tokens)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = make_processor(components, "qwen2", num_image_tokens)
    return _PROCESSORS[key]


def test_dataset_over_synth_stage1_plain(tiny_components, synth_small):
    proc = make_processor(tiny_components, "llama")
    ds = build_dataset(synth_small / "stage1_train.json", None, proc, "plain", 2048)
    assert len(ds) == 43 and not ds.skipped
    item = ds[0]
    text = proc.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    assert text.endswith("<|eot_id|>") and "<image>" not in text


def test_images_are_not_loaded_at_construction(processor, tmp_path):
    missing = str(tmp_path / "later.png")
    ds = SupervisedDataset([record("x", ("<image>", "a"), images=(missing,))], processor, "qwen2", 512)
    assert len(ds) == 1
    image().save(missing)
    assert ds[0]["pixel_values"].shape == (1, 3, SIDE, SIDE)


def test_skip_report_survives_resume_without_double_counting(tmp_path):
    path = tmp_path / "skipped_records.json"
    first = SkipReport(Counter(too_long=2))  # construction-time counts: recounted by every run
    first.update([("missing_image", "r1"), ("unreadable_image", "r7")])
    first.write(path)
    assert json.loads(path.read_text())["records"] == [["missing_image", "r1"], ["unreadable_image", "r7"]]
    resumed = SkipReport(Counter(too_long=2))
    resumed.restore(path)
    resumed.update([("missing_image", "r1"), ("missing_image", "r9")])  # r1 comes round again
    assert resumed.counts == Counter(too_long=2, missing_image=2, unreadable_image=1)
    SkipReport().restore(tmp_path / "absent.json")  # a fresh output dir: nothing to restore
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="skipped_records.json"):
        SkipReport().restore(path)


def _gather_skips_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mllm.training.callbacks import SkippedRecordsCallback

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        report = SkipReport(Counter(too_long=1))
        report.update([("missing_image", f"rank{rank}"), ("missing_image", "shared")])
        state = TrainerState(is_world_process_zero=rank == 0)
        args = TrainingArguments(output_dir=out_dir, report_to="none", use_cpu=True)
        SkippedRecordsCallback(report).on_train_end(args, state, TrainerControl())
    finally:
        dist.destroy_process_group()


def test_skip_counts_of_every_rank_reach_the_report(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_skips_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    report = json.loads((tmp_path / "skipped_records.json").read_text())
    assert report["by_reason"] == {"missing_image": 3, "too_long": 1}  # rank0, rank1, shared once
