"""`python -m mllm ...` is the `mllm` command (also what `accelerate launch -m mllm train ...` runs)."""

from mllm.cli import main

raise SystemExit(main())
