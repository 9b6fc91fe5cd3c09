"""`mllm push RUN --repo USER/NAME`: export a run and upload the folder to the Hugging Face Hub.

Goes through `huggingface_hub.HfApi` (``create_repo``, ``create_branch`` for ``--revision``,
``upload_folder``). The token is huggingface_hub's own: ``HF_TOKEN`` or the cached ``hf auth login``;
mllm never reads, prints or writes it. ``--dry-run`` builds the exact folder that would be
uploaded, prints where it is and what it holds, and stops before the first Hub call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mllm.hub.exporter import DTYPES, EXPORT_FORMATS, ExportFormat, default_format, export, folder_listing

__all__ = ["PushResult", "build_parser", "main", "push"]


@dataclass(frozen=True)
class PushResult:
    repo_id: str  # the Hub repo, USER/NAME
    export_format: str  # llava | remote-code | mllm
    folder: Path | None  # the folder built (kept for a dry run or an explicit output; else removed)
    files: tuple[tuple[str, int], ...]  # (path in the repo, bytes)
    revision: str | None  # the branch uploaded to (None = the default branch)
    url: str | None  # the commit URL the Hub returned; None for a dry run
    dry_run: bool


def push(
    run: str | os.PathLike,
    repo_id: str,
    *,
    export_format: ExportFormat | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    output: str | os.PathLike | None = None,
    license: str = "other",
    datasets: list[str] | None = None,
    dtype=None,
    commit_message: str | None = None,
) -> PushResult:
    """Export run dir ``run`` (``export_format`` default: llava when possible, else remote-code) with
    its card and upload it to ``repo_id``. ``output`` keeps the built folder there; a dry run keeps it
    in a new temporary folder when ``output`` is not given."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if "/" not in repo_id:
        raise ValueError(f"--repo must be USER/NAME (or ORG/NAME), got `{repo_id}`.")
    export_format = export_format or default_format(run)
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format `{export_format}`; choose one of {list(EXPORT_FORMATS)}.")
    api = None
    if not dry_run:
        from huggingface_hub import HfApi, get_token

        if get_token() is None:
            raise ValueError(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` first (or use --dry-run)."
            )
        api = HfApi()  # huggingface_hub finds the token itself; mllm never holds it
    keep = dry_run or output is not None
    parent = Path(tempfile.mkdtemp(prefix="mllm-push-"))
    folder = Path(output) if output is not None else parent / repo_id.replace("/", "--")
    try:
        export(
            run,
            folder,
            to=export_format,
            dtype=dtype,
            repo_id=repo_id,
            license=license,
            datasets=datasets,
        )
        files = tuple(folder_listing(folder))
        if api is None:
            return PushResult(repo_id, export_format, folder, files, revision, None, True)
        api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {export_format} export of an mllm run",
        )
        url = str(getattr(commit, "commit_url", None) or commit)
        return PushResult(repo_id, export_format, folder if keep else None, files, revision, url, False)
    finally:
        if not (dry_run and output is None):  # the temporary parent holds nothing to keep
            shutil.rmtree(parent, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm push",
        description="Export an `mllm train` run dir with its model card and upload it to the Hugging Face Hub. "
        "The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.",
    )
    parser.add_argument("run", help="run dir written by `mllm train` (final output or checkpoint-N)")
    parser.add_argument("--repo", required=True, help="Hub repo id, USER/NAME or ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created when missing)")
    parser.add_argument(
        "--export",
        choices=EXPORT_FORMATS,
        default=None,
        help="format uploaded (default: llava when the connector allows, else remote-code)",
    )
    parser.add_argument("--dry-run", action="store_true", help="build the folder, print it, upload nothing")
    parser.add_argument("--output", default=None, help="build the folder here and keep it")
    parser.add_argument("--license", default="other", help="license in the card metadata (default: other)")
    parser.add_argument(
        "--dataset", action="append", default=None, help="Hub dataset id for the card (repeatable)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as saved)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = push(
        args.run,
        args.repo,
        export_format=args.export,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        output=args.output,
        license=args.license,
        datasets=args.dataset,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    where = f"{result.repo_id}" + (f" (branch {result.revision})" if result.revision else "")
    if result.dry_run:
        print(f"mllm push: dry run, nothing uploaded; would upload {result.folder} to {where}")
    else:
        print(f"mllm push: uploaded {result.export_format} export to {where}: {result.url}")
    total = sum(size for _, size in result.files)
    print(f"{len(result.files)} files, {total:,} bytes ({result.export_format} export):")
    for name, size in result.files:
        print(f"  {name}  {size:,} bytes")
    return 0
