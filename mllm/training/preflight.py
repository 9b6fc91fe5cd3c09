"""Checks that `mllm train` runs before any model is loaded, so a user's mistake costs seconds.

Each check raises `PreflightError` with one line naming the file, folder or key to fix:
the data file exists and parses (a non-UTF-8 file names the byte), the image folder exists, the
output dir is writable, ``resume_from_checkpoint`` points at a complete checkpoint (``true``: one
exists in ``output_dir``), ``init_from`` is an mllm output dir, and with ``bad_data: strict`` every
record and every image is checked (a strict run never stops midway on a bad image). Switches that
cannot run on this machine are refused naming the missing piece (`check_switches`): ``fp16`` on the
CPU, ``use_liger_kernel`` without the liger-kernel package or without a GPU.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mllm.config import RunConfig

__all__ = ["PreflightError", "check_data_file", "check_images", "check_switches", "preflight"]

RUN_RECORD = "mllm_run.json"  # the run record every mllm output dir and checkpoint holds
# files without which a checkpoint cannot be resumed (weights are checked separately)
CHECKPOINT_FILES = ("trainer_state.json", RUN_RECORD)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


class PreflightError(ValueError):
    """A problem found before training starts; the message names what to fix."""


def preflight(run: RunConfig) -> None:
    """Run every check for ``run``; the first problem raises `PreflightError`."""
    data = run.data
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        raise PreflightError(f"image_folder `{data.image_folder}` is not a folder.")
    check_data_file(data.data_path, key="data_path")
    if data.eval_data_path:
        check_data_file(data.eval_data_path, key="eval_data_path")
    check_writable(run.training.output_dir)
    check_switches(run)
    _check_resume(run.training.resume_from_checkpoint, run.training.output_dir)
    if run.model.init_from:
        check_run_dir(run.model.init_from, key="init_from")
    if data.bad_data == "strict":
        check_records_and_images(data.data_path, data.image_folder, allow_symlinks=data.allow_symlinks)


def check_switches(run: RunConfig) -> None:
    """Training switches that would fail late, or silently do nothing, on this machine.

    - ``fp16: true`` on the CPU: accelerate keeps fp32 there without a word (no fp16 autocast, no
      loss scaler; only a GPU runs fp16 mixed precision); ``bf16: true`` runs on the CPU.
    - ``use_liger_kernel: true``: Liger's kernels are Triton kernels for a GPU; the package is the
      ``liger`` extra. Without the package the Trainer would stop only after the model loaded.
    """
    training = run.training
    on_cpu = training.device.type == "cpu"
    if training.fp16 and on_cpu:
        raise PreflightError(
            "fp16=true needs a GPU: on the CPU accelerate trains in fp32 without saying so (no fp16 autocast, "
            "no loss scaler). Use bf16=true (CPU autocast) or remove fp16."
        )
    if training.use_liger_kernel:
        missing = [
            f"{name} is not installed"
            for name, module in (("liger-kernel", "liger_kernel"), ("triton", "triton"))
            if importlib.util.find_spec(module) is None
        ]
        if on_cpu:
            missing.append("the run is on the CPU")
        if missing:
            raise PreflightError(
                "use_liger_kernel=true needs the liger-kernel package (pip install 'mllm[liger]') and a GPU "
                f"for its Triton kernels; here {', '.join(missing)}. Remove use_liger_kernel to train without it."
            )


def check_data_file(path: str | os.PathLike[str], *, key: str = "data_path") -> None:
    """``path`` exists and parses as a data file (`read_raw_records`)."""
    from mllm.data.formats import read_raw_records

    if not path:
        raise PreflightError(f"`{key}` is empty: give the training data file.")
    path = Path(path)
    if not path.exists():
        raise PreflightError(f"{key} `{path}` does not exist.")
    if path.is_file():
        _check_utf8(path, key)
    try:
        read_raw_records(path)
    except (ValueError, OSError) as err:
        raise PreflightError(f"{key} `{path}` cannot be read: {err}") from err


def _check_utf8(path: Path, key: str) -> None:
    """Text data files are UTF-8: name the first byte that is not (parquet is binary)."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                position = offset + err.start
                line += chunk[: err.start].count(b"\n")
                raise PreflightError(
                    f"{key} `{path}` is not UTF-8 text: byte {position} (line {line}) is "
                    f"0x{chunk[err.start]:02x}; re-save the file as UTF-8."
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise PreflightError(f"{key} `{path}` is not UTF-8 text: it ends inside a character.") from None


def check_writable(output_dir: str | os.PathLike[str]) -> None:
    """``output_dir`` exists (created if missing) and a file can be written in it."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mllm-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PreflightError(f"output_dir `{path}` is not writable ({reason}).") from None


def check_run_dir(path: str | os.PathLike[str], *, key: str) -> None:
    """``path`` is an output dir (or checkpoint) of `mllm train`: it holds a readable mllm_run.json."""
    path = Path(path)
    if not path.is_dir():
        raise PreflightError(f"{key} `{path}` does not exist (give a previous stage's output_dir).")
    record = path / RUN_RECORD
    if not record.is_file():
        raise PreflightError(f"{key} `{path}` is not an mllm output dir: it has no {RUN_RECORD}.")
    try:
        json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise PreflightError(f"{key} `{path}`: {RUN_RECORD} cannot be read: {err}") from None


def _check_resume(resume: str | bool | None, output_dir: str) -> None:
    if resume is None or resume is False:
        return
    if resume is True:
        found = [p for p in Path(output_dir).glob("checkpoint-*") if _CHECKPOINT_DIR.match(p.name)]
        if not found:
            raise PreflightError(
                f"resume_from_checkpoint=true but output_dir `{output_dir}` holds no checkpoint-N folder."
            )
        return
    path = Path(resume)
    if not path.is_dir():
        raise PreflightError(f"resume_from_checkpoint `{path}` does not exist.")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    if missing or not weights:
        what = ", ".join(missing + ([] if weights else ["model weights (*.safetensors)"]))
        raise PreflightError(
            f"resume_from_checkpoint `{path}` is not a complete checkpoint (missing {what})."
        )


def check_records_and_images(
    data_path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None,
    num_workers: int = 8,
    *,
    allow_symlinks: bool = False,
) -> None:
    """``bad_data: strict``: every record normalises and every image opens and decodes."""
    from mllm.data.errors import BadRecordError
    from mllm.data.formats import load_records

    try:
        records, _ = load_records(data_path, image_folder, "strict", allow_symlinks=allow_symlinks)
        jobs = [(record.id, record.source, ref) for record in records for ref in record.images]
        check_images(jobs, num_workers)
    except BadRecordError as err:
        raise PreflightError(f"bad_data=strict stops on {err}") from err


def check_images(jobs: list[tuple[str, str, object]], num_workers: int = 8) -> None:
    """Load every ``(record_id, source, image ref)``; the first that fails raises its `BadRecordError`."""
    from mllm.data.images import load_image

    def load(job: tuple[str, str, object]) -> None:
        record_id, source, ref = job
        load_image(ref, record_id=record_id, source=source)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for _ in pool.map(load, jobs):
            pass
