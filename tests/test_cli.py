"""The command line as a user runs it (subprocesses): `mllm`, its subcommands and every data tool.

--help answers without importing torch; `mllm train` on a tiny recipe trains, prints the trainable
parameters and one summary; every mistake found by preflight (before any model loads) or by loading
prints one line naming what to fix, no traceback (unless --debug), and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_TOOLS = ("convert", "cot", "filter", "synth", "validate")


def _run(args: list[str], cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    full_env.pop("MLLM_DEBUG", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd or REPO, env=full_env
    )


def _mllm(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return _run(["-m", "mllm", *args], cwd=cwd, **env)


# ---------------------------------------------------------------- --help, without torch

_HELP_PROBE = """
import runpy, sys
cases = [("mllm", ["mllm", "--help"]), ("mllm", ["mllm", "train", "--help"])]
cases += [("data_tools." + t, [t, "--help"]) for t in {tools!r}]
for module, argv in cases:
    sys.argv = argv
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as done:
        assert done.code in (0, None), (argv, done.code)
    heavy = [m for m in ("torch", "transformers", "bitsandbytes", "deepspeed") if m in sys.modules]
    assert not heavy, (module, argv, heavy)
print("NO-TORCH-OK")
"""


def test_help_never_imports_torch() -> None:
    done = _run(["-c", _HELP_PROBE.format(tools=DATA_TOOLS)])
    assert done.returncode == 0 and "NO-TORCH-OK" in done.stdout, done.stderr[-3000:]
    assert "usage: mllm [--debug] <command>" in done.stdout
    assert "kernels" not in done.stderr  # the bitsandbytes warning every command printed


def test_import_mllm_does_not_import_torch() -> None:
    done = _run(["-c", "import sys, mllm, mllm.config, mllm.training.cli; print('torch' in sys.modules)"])
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


@pytest.mark.parametrize("command", ["train", "eval", "merge"])
def test_every_subcommand_answers_help(command: str) -> None:
    if command == "merge":
        import mllm.training.merge as merge

        if not hasattr(merge, "main"):
            pytest.skip("mllm merge's main() lands with the run-directory work (issue 17, part C)")
    done = _mllm(command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"mllm {command}" in done.stdout


@pytest.mark.parametrize("tool", DATA_TOOLS)
def test_every_data_tool_answers_help(tool: str) -> None:
    done = _run(["-m", f"data_tools.{tool}", "--help"])
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_unknown_command_is_a_usage_error() -> None:
    done = _mllm("trian")
    assert done.returncode == 2 and "unknown command `trian`" in done.stderr


# ---------------------------------------------------------------- one real run of each tool


def test_data_tools_run_as_typed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = _run(["-m", "data_tools.synth", "--output", str(data), "--num-scenes", "12"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (data / "stage2_train.json").is_file()
    done = _run(["-m", "data_tools.validate", str(data / "stage2_train.json"), "--no-progress"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK:" in done.stdout and "token lengths not checked" in done.stdout
    chat = tmp_path / "chat.jsonl"
    done = _run(
        [
            "-m",
            "data_tools.convert",
            "llava-to-messages",
            str(data / "stage2_train.json"),
            "--output",
            str(chat),
        ]
    )
    assert done.returncode == 0 and chat.read_text().count("\n") >= 1, done.stderr[-2000:]
    kept = tmp_path / "kept.json"
    done = _run(["-m", "data_tools.filter", str(data / "stage1_train.json"), "--output", str(kept)])
    assert done.returncode == 0 and kept.is_file(), done.stderr[-2000:]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        json.dumps({"id": "q1", "image": "images/a.png", "question": "What?", "answer": "red"}) + "\n"
    )
    cot = tmp_path / "cot.json"
    done = _run(["-m", "data_tools.cot", str(qa), "--output", str(cot)])
    assert done.returncode == 0 and "<CONCLUSION>" in cot.read_text(), done.stderr[-2000:]


# ---------------------------------------------------------------- mllm train


def _recipe_text(components: dict[str, Path], data: Path, out: Path, **extra: object) -> str:
    lines = [
        f"vision_tower: {components['clip-vision']}",
        f"model_name_or_path: {components['llama']}",
        "connector_type: mlp",
        f"data_path: {data / 'stage1_train.json'}",
        f"image_folder: {data}",
        "template: plain",
        "model_max_length: 256",
        "group_by_modality_length: false",
        "per_device_train_batch_size: 4",
        "max_steps: 2",
        f"output_dir: {out}",
        "save_strategy: no",  # unquoted: YAML 1.1 reads it as false; the field wants the string
        "eval_strategy: no",
        "logging_steps: 1",
        "use_cpu: true",
        "report_to: none",
        "dataloader_num_workers: 0",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny_run(tiny_components: dict[str, Path], synth_small: Path, tmp_path_factory: pytest.TempPathFactory):
    """`mllm train` on a tiny recipe, 2 steps: (recipe path, finished process, output dir)."""
    folder = tmp_path_factory.mktemp("cli-train")
    recipe = folder / "tiny.yaml"
    recipe.write_text(_recipe_text(tiny_components, synth_small, folder / "run"))
    return recipe, _mllm("train", str(recipe)), folder / "run"


def test_train_runs_and_prints_one_summary(tiny_run) -> None:
    recipe, done, out = tiny_run
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("mllm train: done:")]
    assert len(summaries) == 1, done.stdout[-2000:]
    (line,) = summaries
    for part in ("2 steps", "loss ", "samples/s", "0 skipped", str(out)):
        assert part in line, line
    assert "trainable parameters" in done.stderr  # mllm.models.adapters' table reaches the console
    assert "connector" in done.stderr.split("trainable parameters", 1)[1]
    assert "kernels" not in done.stderr  # no bitsandbytes start-up warning
    assert (out / "mllm_run.json").is_file()


def test_import_mllm_then_auto_classes_load_the_run_dir(tiny_run) -> None:
    _, done, out = tiny_run
    assert done.returncode == 0, done.stderr[-3000:]
    probe = (
        "import sys, mllm\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(out)!r})\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r})\n"
        "print(type(AutoConfig.from_pretrained(%r)).__name__, type(p).__name__, type(m).__name__)\n"
        % str(out)
    )
    done = _run(["-c", probe])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["MllmConfig", "MllmProcessor", "MllmForConditionalGeneration"]
    # transformers first, then mllm: registered at once
    probe = probe.replace(
        "import sys, mllm\nassert 'torch' not in sys.modules\n", "import transformers.models.llava\n"
    )
    done = _run(["-c", probe.replace("from transformers import", "import mllm\nfrom transformers import", 1)])
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- failing safe


@pytest.fixture(scope="module")
def recipe_factory(
    tiny_components: dict[str, Path], synth_small: Path, tmp_path_factory: pytest.TempPathFactory
):
    folder = tmp_path_factory.mktemp("cli-errors")

    def make(name: str, **extra: object) -> Path:
        recipe = folder / f"{name}.yaml"
        recipe.write_text(_recipe_text(tiny_components, synth_small, folder / f"out-{name}", **extra))
        return recipe

    make.folder = folder  # type: ignore[attr-defined]
    return make


def _assert_one_line_error(done: subprocess.CompletedProcess[str], *names: str, status: int = 1) -> str:
    assert done.returncode == status, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("mllm train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def _assert_before_model_load(done: subprocess.CompletedProcess[str]) -> None:
    assert "trainable parameters" not in done.stderr and "Loading weights" not in done.stderr


def test_missing_data_file(recipe_factory) -> None:
    done = _mllm("train", str(recipe_factory("missing")), "data_path=/nonexistent/train.json")
    _assert_one_line_error(done, "data_path", "/nonexistent/train.json", "does not exist")
    _assert_before_model_load(done)


def test_non_utf8_data_file_names_the_byte(recipe_factory) -> None:
    bad = recipe_factory.folder / "latin1.json"
    bad.write_bytes('[{"id": "a", "conversations": [{"from": "human", "value": "café"}]}]'.encode("latin-1"))
    done = _mllm("train", str(recipe_factory("latin1")), f"data_path={bad}")
    position = bad.read_bytes().index(b"\xe9")
    _assert_one_line_error(done, str(bad), "not UTF-8", f"byte {position}")
    _assert_before_model_load(done)


def test_unwritable_output_dir(recipe_factory) -> None:
    blocker = recipe_factory.folder / "a-file"
    blocker.write_text("not a folder")
    done = _mllm("train", str(recipe_factory("unwritable")), f"output_dir={blocker / 'run'}")
    _assert_one_line_error(done, "output_dir", str(blocker / "run"), "not writable")
    _assert_before_model_load(done)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(recipe_factory) -> None:
    read_only = recipe_factory.folder / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    done = _mllm("train", str(recipe_factory("read-only")), f"output_dir={read_only}")
    _assert_one_line_error(done, "output_dir", "not writable")


def test_resume_from_missing_or_incomplete_checkpoint(recipe_factory) -> None:
    recipe = recipe_factory("resume")
    done = _mllm("train", str(recipe), "resume_from_checkpoint=/nonexistent/checkpoint-5")
    _assert_one_line_error(done, "resume_from_checkpoint", "/nonexistent/checkpoint-5")
    partial = recipe_factory.folder / "checkpoint-7"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    done = _mllm("train", str(recipe), f"resume_from_checkpoint={partial}")
    _assert_one_line_error(done, str(partial), "not a complete checkpoint", "mllm_run.json")
    done = _mllm("train", str(recipe), "resume_from_checkpoint=true")  # no checkpoint in output_dir
    _assert_one_line_error(done, "resume_from_checkpoint=true", "no checkpoint")
    _assert_before_model_load(done)


def test_init_from_must_be_a_run_dir(recipe_factory, synth_small: Path) -> None:
    done = _mllm("train", str(recipe_factory("init")), f"init_from={synth_small}")
    _assert_one_line_error(done, "init_from", str(synth_small), "mllm_run.json")
    _assert_before_model_load(done)


def test_strict_checks_every_image_before_the_first_step(recipe_factory, synth_small: Path) -> None:
    records = json.loads((synth_small / "stage1_train.json").read_text())
    folder = recipe_factory.folder / "strict-images"
    folder.mkdir()
    shutil.copytree(synth_small / "images", folder / "images")  # a symlink out of the folder is refused
    (folder / "broken.png").write_bytes(b"not a png")
    records[-1]["image"] = "broken.png"  # the last record: a lazy loader meets it only at the end
    data = folder / "strict.json"
    data.write_text(json.dumps(records))
    args = [
        "train",
        str(recipe_factory("strict", bad_data="strict")),
        f"data_path={data}",
        f"image_folder={folder}",
    ]
    done = _mllm(*args)
    _assert_one_line_error(done, "bad_data=strict", "unreadable_image", "broken.png", records[-1]["id"])
    _assert_before_model_load(done)
    debug = _mllm("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PreflightError" in debug.stderr
    after = _mllm(*args, "--debug")
    assert "Traceback" in after.stderr
    env_debug = _mllm(*args, MLLM_DEBUG="1")
    assert "Traceback" in env_debug.stderr


def test_every_record_skipped_stops_with_the_counts(recipe_factory, synth_small: Path) -> None:
    records = json.loads((synth_small / "stage1_train.json").read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]  # ends with the user's turn
    data = recipe_factory.folder / "all-bad.json"
    data.write_text(json.dumps(records))
    done = _mllm("train", str(recipe_factory("empty")), f"data_path={data}")
    _assert_one_line_error(done, str(data), f"{len(records)} skipped", f"bad_turn_order={len(records)}")
    assert "num_samples" not in done.stderr


def test_hub_id_offline_names_the_component(recipe_factory) -> None:
    done = _mllm("train", str(recipe_factory("offline")), "vision_tower=nobody-xyz/no-such-tower")
    _assert_one_line_error(done, "vision", "nobody-xyz/no-such-tower")


def test_config_mistakes_exit_2(recipe_factory) -> None:
    recipe = recipe_factory("config")
    done = _mllm("train", str(recipe), "learning_rat=1e-3")
    _assert_one_line_error(done, "`learning_rat`", "learning_rate", status=2)
    done = _mllm("train", str(recipe), "save_strategy=sometimes")
    _assert_one_line_error(done, "sometimes", status=2)
    done = _mllm("train", str(recipe), "deepspeed=zero9")
    _assert_one_line_error(done, "deepspeed", "zero9", "zero2", status=2)
    done = _mllm("train", "/nonexistent/recipe.yaml")
    _assert_one_line_error(done, "/nonexistent/recipe.yaml", status=2)


def test_an_unexpected_error_keeps_its_traceback(tmp_path: Path) -> None:
    """A bug is not a user's mistake: mllm.cli lets it through with the traceback."""
    probe = (
        "import sys, types, mllm.cli\n"
        "bug = types.ModuleType('buggy'); sys.modules['buggy'] = bug\n"
        "def main(argv):\n    return {}['missing']\n"
        "bug.main = main\n"
        "mllm.cli.SUBCOMMANDS['bug'] = ('buggy', 'a bug')\n"
        "sys.exit(mllm.cli.main(['bug']))\n"
    )
    done = _run(["-c", probe])
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError" in done.stderr
