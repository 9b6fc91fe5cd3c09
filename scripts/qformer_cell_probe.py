"""Can a connector carry *which cell holds what* from the frozen tower to the LLM? A probe, no LLM.

    python -m scripts.qformer_cell_probe [--data runs/data] [--tower runs/tiny/clip-vision]
                                         [--llm runs/tiny/llama] [--connector qformer|mlp] [--no-positions]

On a world built by the main job (its synthetic data and pre-trained tiny tower), mllm's own
connector (freshly initialised, projecting to the LLM's width; no LLM runs) and a small
readout (one learned query per grid cell, attention over the connector's outputs, with learned
positions on those outputs as an LLM has) are trained together to name the shape, colour and size
of the object in each of the 9 cells (or "empty"), straight from labels, on the training images'
frozen features. Printed: the held-out share of object cells with all three right, every
--eval-every steps. The Q-Former has the blip2_path shape (2 layers of the tower's width, a
cross-attention in each, 32 queries); ``--no-positions`` drops its learned vision positions.

Measured on the main job's world (6000 scenes, 900 held-out images, one run each, lr 1e-3): MLP
100% after 250 steps; the Q-Former without positions 0% after 1000 (its cross-attention sees the
patches as a set); with them 40.4% after 250, 99.9% after 500 and 100% after 750.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.synth import COLORS, SHAPES, SIZES


def cell_labels(scenes: list[dict]) -> torch.Tensor:
    """[N, 9, 3] class ids of (shape, colour, size) per grid cell; 0 = empty."""
    labels = torch.zeros(len(scenes), 9, 3, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for s in scene["shapes"]:
            labels[i, s["cell"]] = torch.tensor(
                [SHAPES.index(s["shape"]) + 1, list(COLORS).index(s["color"]) + 1, SIZES.index(s["size"]) + 1]
            )
    return labels


@torch.no_grad()
def tower_features(
    data: Path, tower_path: Path, scenes: list[dict], layer: int, drop_cls: bool, batch: int = 256
) -> torch.Tensor:
    """The frozen tiny tower's ``layer`` hidden states: [N, T_vis, D_vis]."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    from mllm.data.images import load_image
    from mllm.models.vision import select_features

    tower = CLIPVisionModel.from_pretrained(tower_path).eval()
    processor = AutoImageProcessor.from_pretrained(tower_path)
    out = []
    for start in range(0, len(scenes), batch):
        images = [
            load_image(data / s["image"], record_id=s["scene_id"], source=str(data))
            for s in scenes[start : start + batch]
        ]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        out.append(select_features(tower, pixels, layer, drop_cls=drop_cls))
    return torch.cat(out)


def build_connector_for_probe(
    tower: Path, llm: Path, kind: str, queries: int, positions: bool
) -> tuple[nn.Module, str]:
    """mllm's own connector of ``kind`` between ``tower`` and ``llm`` (the Q-Former of the blip2_path
    shape, as `recipe_qformer_config` builds it), freshly initialised, and its feature selection."""
    from transformers import AutoConfig

    from mllm.config import ModelArguments
    from mllm.models.configuration_mllm import MllmConfig
    from mllm.models.connectors import build_connector
    from mllm.models.vision import vision_config_from
    from mllm.training.qformer_stage import recipe_qformer_config

    vision_config = vision_config_from(str(tower))
    select = "full" if kind == "qformer" else "default"  # as blip2_path and the main job select
    qformer = {}
    if kind == "qformer":
        m = ModelArguments(
            connector_type="qformer",
            num_query_tokens=queries,
            vision_feature_select_strategy=select,
            qformer_num_layers=2,
            qformer_cross_attention_freq=1,
            qformer_vision_positions=positions,
        )
        qformer["qformer_config"] = recipe_qformer_config(m, vision_config)
    config = MllmConfig(
        vision_config=vision_config,
        text_config=AutoConfig.from_pretrained(llm),
        connector_type=kind,
        num_query_tokens=queries,
        vision_feature_select_strategy=select,
        **qformer,
    )
    return build_connector(config), select


class CellReadout(nn.Module):
    """One learned query per cell attends over the connector's tokens (plus learned positions)."""

    def __init__(self, tokens: int, width: int, classes: tuple[int, ...]) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.cells = nn.Parameter(torch.randn(1, 9, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in classes)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.norm(tokens + self.positions)
        cells, _ = self.attention(self.cells.expand(tokens.shape[0], -1, -1), tokens, tokens)
        return [head(cells) for head in self.heads]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=Path("runs/data"), help="data_tools.synth output (scenes.jsonl)"
    )
    parser.add_argument(
        "--tower", type=Path, default=Path("runs/tiny/clip-vision"), help="the frozen CLIP tower"
    )
    parser.add_argument(
        "--llm", type=Path, default=Path("runs/tiny/llama"), help="the LLM (its width sizes the connector)"
    )
    parser.add_argument("--connector", choices=["qformer", "mlp"], default="qformer")
    parser.add_argument("--no-positions", action="store_true", help="the Q-Former without vision positions")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    scenes_file = args.data / "scenes.jsonl"
    if not scenes_file.is_file():
        parser.error(f"{scenes_file} not found: build the world first (python -m scripts.quickstart)")
    scenes = [json.loads(line) for line in scenes_file.read_text(encoding="utf-8").splitlines() if line]
    labels = cell_labels(scenes)
    train = torch.tensor([scene["split"] == "train" for scene in scenes])
    connector, select = build_connector_for_probe(
        args.tower, args.llm, args.connector, args.queries, positions=not args.no_positions
    )
    features = tower_features(args.data, args.tower, scenes, layer=-2, drop_cls=select == "default")
    tokens = features.shape[1]
    with torch.no_grad():
        _, out_tokens, width = connector(features[:2]).shape
    readout = CellReadout(out_tokens, width, (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1))
    optimizer = torch.optim.AdamW(
        [*connector.parameters(), *readout.parameters()], lr=args.lr, weight_decay=0.0
    )
    x_train, y_train, x_test, y_test = features[train], labels[train], features[~train], labels[~train]

    def held_out() -> float:
        connector.eval()
        readout.eval()
        with torch.no_grad():
            predicted = torch.stack([o.argmax(-1) for o in readout(connector(x_test))], dim=-1)
        connector.train()
        readout.train()
        objects = y_test[..., 0] > 0
        return (predicted == y_test).all(-1)[objects].float().mean().item()

    name = args.connector + ("" if args.connector == "mlp" or not args.no_positions else " (no positions)")
    print(f"{name}: {len(x_train)} training images, {len(x_test)} held out, {tokens} vision tokens")
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x_train), (args.batch_size,))
        outputs, target = readout(connector(x_train[batch])), y_train[batch]
        loss = sum(
            F.cross_entropy(o.reshape(-1, o.shape[-1]), target[..., k].reshape(-1))
            for k, o in enumerate(outputs)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            print(
                f"step {step:5d}: held-out object cells with shape, colour and size right {100 * held_out():5.1f}%"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
