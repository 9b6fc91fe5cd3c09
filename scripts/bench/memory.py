"""Benchmark: parameters and peak memory of stage-2 training with the LLM fully tuned (reference),
frozen, LoRA and QLoRA, on the same model.

    python -m scripts.bench.memory [--llm-hidden 768] [--llm-layers 12] [--steps 2] [--threads 1]

One tiny-but-not-trivial model for all four (scripts/build_tiny_components.py: a 12-block, 768-wide
Llama-style LLM, ~66M parameters, the tiny CLIP tower), the same synthetic stage-2 instructions
(data_tools.synth), seed and batches; tower frozen, connector trained, ``--steps`` AdamW steps
through `mllm.training.stages.train`:

* full (reference): every LLM weight trains (weights + gradients + two AdamW moments);
* frozen: the LLM is frozen, only the connector trains (stage 1's split);
* lora: rank ``--lora-r`` adapters on every linear layer of the frozen LLM;
* qlora: the same adapters on the LLM loaded in 4-bit NF4 (bitsandbytes; its CPU backend here).

Each configuration runs in a fresh subprocess, so one's peak never hides in another's. Memory is
read at three points of that process: the resident set just before the model loads (torch,
transformers, peft and mllm imported: the base every figure is counted from), the peak RSS of
loading (components read, tuned, QLoRA quantised; read when the trainer starts), and the peak RSS
of the training steps, read before the output dir is saved. On Linux the peak (VmHWM) is restarted
through ``/proc/self/clear_refs`` before loading and before the first step, after glibc has handed
freed memory back (``malloc_trim``: what loading freed would otherwise stay counted);
elsewhere ``getrusage``'s ``ru_maxrss`` is the run's peak so far. Safetensors weights are memory-mapped
and only become resident when first read, so the load figure can stay below the weights' size;
the training peak holds them all. With CUDA, ``torch.cuda.max_memory_allocated`` of the steps is
printed too and is the ratios' first figure.

The RSS figures are what the OS counts, allocator and page cache included; beside them,
``tensors`` is exact: the bytes the parameters (4-bit packed for QLoRA), their gradients and
AdamW's two moments hold at the end of training, activations not included. On the CPU, QLoRA's
peak RSS stays near LoRA's although its tensors are a quarter: quantising reads every page of the
fp32 checkpoint, and those file pages stay mapped and counted (measured: ~410 MB RssFile at the
first step vs ~170 MB for LoRA). The OS can drop such clean pages under memory pressure; a GPU's
allocated memory has no such term.

Prints one line per configuration (parameters total / trainable, tensors held, the peaks over the
base) and one line of ratios per configuration against the reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

CONFIGS = ("full", "frozen", "lora", "qlora")


def _peak_rss_mb() -> float:
    """The process's peak RSS: Linux's VmHWM (which `_reset_peak_rss` restarts), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    import psutil  # an accelerate dependency

    return psutil.Process().memory_info().rss / 2**20


def _release_freed_memory() -> None:
    """Hand memory already freed back to the OS (glibc ``malloc_trim``), so the resident set counts
    what is live: weights read in fp32 and then quantised stay resident otherwise."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Restart the process's peak RSS from its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _child(args: argparse.Namespace) -> int:
    """Train one configuration and print its figures as one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import mllm.training.stages as stages
    from mllm.config import build_run_config

    work = Path(args.work)
    cuda = torch.cuda.is_available()
    figures: dict[str, float] = {}

    class MeasuredTrainer(stages.MllmTrainer):
        def train(self, *a, **kw):
            figures["load_peak_mb"] = _peak_rss_mb()  # model loaded and tuned, trainer built
            _release_freed_memory()
            figures["train_peak_reset"] = float(_reset_peak_rss())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            output = super().train(*a, **kw)
            figures["train_peak_mb"] = _peak_rss_mb()  # before stages.train saves the output dir
            if cuda:
                figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            total = trainable = stored = grads = 0
            for param in self.model.parameters():
                quant_state = getattr(param, "quant_state", None)  # bnb 4-bit: two values per byte
                n = int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()
                total += n
                stored += param.numel() * param.element_size()
                if param.requires_grad:  # its gradient has the parameter's size and dtype
                    trainable += n
                    grads += param.numel() * param.element_size()
            moments = sum(
                t.numel() * t.element_size()
                for state in self.optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t) and t.dim() > 0  # AdamW's exp_avg, exp_avg_sq (not its step count)
            )
            figures.update(
                total=total,
                trainable=trainable,
                weights_mb=stored / 2**20,
                grads_mb=grads / 2**20,
                optimizer_mb=moments / 2**20,
            )
            return output

    stages.MllmTrainer = MeasuredTrainer  # measure inside mllm's own training path
    run = build_run_config(
        None,
        [
            f"vision_tower={work / 'tiny' / 'clip-vision'}",
            f"model_name_or_path={work / 'tiny' / 'llama'}",
            f"data_path={work / 'data' / 'stage2_train.json'}",
            f"image_folder={work / 'data'}",
            f"output_dir={work / 'runs' / args.child}",
            f"tune_llm={args.child}",
            f"lora_r={args.lora_r}",
            f"lora_alpha={2 * args.lora_r}",
            f"per_device_train_batch_size={args.batch_size}",
            f"max_steps={args.steps}",
            "learning_rate=1e-4",
            f"use_cpu={str(not cuda).lower()}",
            "save_strategy=no",
            "report_to=none",
            "disable_tqdm=true",
            "logging_steps=1000",
            "group_by_modality_length=false",
        ],
    )
    _release_freed_memory()
    figures["base_rss_mb"] = _rss_mb()  # torch, transformers, peft, mllm imported; no model yet
    _reset_peak_rss()  # the imports' own peak is not the model's
    start = time.perf_counter()
    result = stages.train(run)
    figures.update(seconds=time.perf_counter() - start, loss=result.train_loss)
    print("FIGURES " + json.dumps(figures), flush=True)
    return 0


def _held_mb(f: dict[str, float]) -> float:
    return f["weights_mb"] + f["grads_mb"] + f["optimizer_mb"]


def _line(name: str, f: dict[str, float]) -> str:
    pct = 100.0 * f["trainable"] / f["total"]
    steps = "training" if f["train_peak_reset"] else "training (the run's peak so far)"
    text = (
        f"{name:17s} params {f['total'] / 1e6:4.1f}M total {f['trainable'] / 1e6:5.2f}M trainable ({pct:5.1f}%)"
        f"  tensors {_held_mb(f):5.0f} MB = weights {f['weights_mb']:4.0f} + grads {f['grads_mb']:4.0f}"
        f" + AdamW {f['optimizer_mb']:4.0f}  peak RSS over the {f['base_rss_mb']:.0f} MB base:"
        f" load +{f['load_peak_mb'] - f['base_rss_mb']:4.0f} MB, {steps} +{f['train_peak_mb'] - f['base_rss_mb']:5.0f} MB"
    )
    if "peak_cuda_mb" in f:
        text += f"  peak CUDA {f['peak_cuda_mb']:5.0f} MB"
    return text + f"  ({f['seconds']:.0f}s, loss {f['loss']:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-hidden", type=int, default=768, help="LLM width")
    parser.add_argument("--llm-layers", type=int, default=12, help="LLM decoder blocks")
    parser.add_argument(
        "--scenes", type=int, default=16, help="synthetic scenes (stage-2 records ~ 3 per scene)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer steps (AdamW's moments exist after the 1st)"
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r) for lora and qlora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    from data_tools.synth import generate_dataset
    from scripts.build_tiny_components import TinySizes, build_tiny_components

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        sizes = TinySizes(
            llm_hidden=args.llm_hidden, llm_layers=args.llm_layers, llm_heads=args.llm_hidden // 64
        )
        build_tiny_components(work / "tiny", sizes)
        generate_dataset(work / "data", num_scenes=args.scenes, seed=0, image_size=sizes.image_size)
        shared = [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("steps", "batch_size", "lora_r", "threads")
        ]
        figures: dict[str, dict[str, float]] = {}
        for config in CONFIGS:
            cmd = [
                sys.executable,
                "-m",
                "scripts.bench.memory",
                f"--child={config}",
                f"--work={work}",
                *shared,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("FIGURES ")]
            if done.returncode != 0 or not lines:
                print(f"{config}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            figures[config] = json.loads(lines[-1].removeprefix("FIGURES "))
        names = {"full": "full (reference)", "frozen": "frozen", "lora": f"lora r{args.lora_r}"}
        names["qlora"] = f"qlora r{args.lora_r} (NF4)"
        print(
            f"# LLM {args.llm_layers} x {args.llm_hidden} (Llama-style, vocab {sizes.vocab_size}), CLIP tower "
            f"{sizes.vision_layers} x {sizes.vision_hidden}; {args.steps} AdamW steps of batch {args.batch_size}, "
            f"threads={args.threads}, each in a fresh process"
        )
        for config, f in figures.items():
            print(_line(names[config], f))
        ref = figures["full"]

        def steps_peak(f: dict[str, float]) -> float:
            return f["train_peak_mb"] - f["base_rss_mb"]

        for config in ("frozen", "lora", "qlora"):
            f = figures[config]
            cuda = (
                f"{f['peak_cuda_mb'] / ref['peak_cuda_mb']:.2f}x peak CUDA, " if "peak_cuda_mb" in f else ""
            )
            print(
                f"ratio {config}/full: {cuda}{_held_mb(f) / _held_mb(ref):.2f}x tensors (weights + grads + AdamW), "
                f"{steps_peak(f) / steps_peak(ref):.2f}x training peak RSS over the base, "
                f"{f['weights_mb'] / ref['weights_mb']:.2f}x weights, "
                f"{f['trainable'] / ref['trainable']:.3f}x trainable parameters"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
