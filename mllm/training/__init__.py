"""Training: the Trainer subclass, stage entry point, checkpoint format, callbacks, LoRA merge.

Import the submodules (`mllm.training.stages`, `.trainer`, `.checkpoint`, `.merge`, `.callbacks`);
nothing is imported here so that `import mllm.training` stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
