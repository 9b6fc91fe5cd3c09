"""The BLIP-2 path through `mllm train`: stage 1 (Q-Former alone) and stage 2 started from it.

Stage 1 (``qformer_pretrain: true``): vision tower (frozen) -> `QFormerPretrainModel` (ITC + ITM +
ITG) -> caption pairs -> `transformers.Trainer` (the model's forward returns the summed loss) ->
output dir (``config.json`` + ``model.safetensors`` of the stage-1 model, the text tokenizer, the
image processor, ``mllm_run.json``). No LLM is loaded.

Stage 2 (``init_from`` a stage-1 output dir): `MllmForConditionalGeneration` with the qformer
connector of stage 1's size, its queries and Q-Former weights copied in (the text-only layers
dropped, as LAVIS' Blip2OPT does), a fresh projection into the LLM; then the usual stage machinery.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Blip2QFormerConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Trainer,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mllm.config import ConfigError, ModelArguments, RunConfig
from mllm.data.formats import load_records
from mllm.data.images import load_image
from mllm.models.adapters import llm_quantization_config
from mllm.models.connectors.qformer_bert_init import init_text_from_bert, qformer_config_from_bert
from mllm.models.connectors.qformer_pretrain import (
    QFormerPretrainConfig,
    QFormerPretrainModel,
    connector_key,
)
from mllm.models.connectors.vision_positions import num_vision_positions
from mllm.models.modeling_mllm import MllmForConditionalGeneration
from mllm.models.processing_mllm import MllmProcessor
from mllm.models.vision import num_vision_tokens, vision_config_from
from mllm.run_dir import RunRecord, last_checkpoint, read_record, resolve_resume

__all__ = [
    "CaptionPairs",
    "PairCollator",
    "QFormerTrainer",
    "build_stage1_model",
    "caption_input_ids",
    "pad_captions",
    "stage1_tokenizer_source",
    "is_stage1_dir",
    "load_stage1",
    "load_stage2_from_stage1",
    "text_token_ids",
    "train_stage1",
]

logger = logging.getLogger(__name__)


# -- text -------------------------------------------------------------------------------------
def text_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The Q-Former's text vocabulary: the tokenizer's, plus [CLS] (when it has none) and [DEC] after it."""
    size = len(tokenizer)
    cls_id = tokenizer.cls_token_id
    if cls_id is None:
        cls_id, size = size, size + 1
    dec_id, size = size, size + 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cls_id
    return {"vocab_size": size, "cls_token_id": cls_id, "dec_token_id": dec_id, "pad_token_id": pad_id}


def caption_input_ids(
    tokenizer: PreTrainedTokenizerBase, caption: str, cls_token_id: int, max_text_length: int
) -> list[int]:
    """A caption as the Q-Former's text input: [CLS] + its tokens, at most ``max_text_length`` in all."""
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    return [cls_token_id, *ids[: max_text_length - 1]]


def pad_captions(
    captions: Sequence[Sequence[int]], pad_token_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists padded to ``max_length``: ``input_ids`` and ``attention_mask``, both [B, max_length]."""
    ids = torch.full((len(captions), max_length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(captions), max_length), dtype=torch.long)
    for i, caption in enumerate(captions):
        ids[i, : len(caption)] = torch.tensor(caption, dtype=torch.long)
        mask[i, : len(caption)] = 1
    return ids, mask


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs: every record with one image; the caption is its last assistant turn."""

    def __init__(
        self,
        data_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] | None,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        config: QFormerPretrainConfig,
        *,
        bad_data: str = "skip",
        allow_symlinks: bool = False,
    ) -> None:
        records, self.skipped = load_records(data_path, image_folder, bad_data, allow_symlinks=allow_symlinks)
        self.pairs: list[tuple[Any, str, str, str]] = []
        for record in records:
            answers = [t.content for t in record.turns if t.role == "assistant"]
            if len(record.images) != 1 or not answers:
                self.skipped["not_an_image_caption_pair"] += 1
                continue
            self.pairs.append((record.images[0], answers[-1].strip(), record.id, record.source))
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cls_token_id = config.cls_token_id
        self.max_text_length = config.max_text_length

    def __len__(self) -> int:
        return len(self.pairs)

    def caption_ids(self, caption: str) -> list[int]:
        return caption_input_ids(self.tokenizer, caption, self.cls_token_id, self.max_text_length)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, caption, record_id, source = self.pairs[i]
        pixels = self.image_processor(
            images=load_image(image, record_id=record_id, source=source), return_tensors="pt"
        )
        return {"pixel_values": pixels["pixel_values"][0], "input_ids": self.caption_ids(caption)}


@dataclasses.dataclass
class PairCollator:
    """Stacks images; pads every caption to ``max_length`` (fixed, as LAVIS does, so ranks can gather texts)."""

    pad_token_id: int
    max_length: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_captions([row["input_ids"] for row in rows], self.pad_token_id, self.max_length)
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": ids,  # [B, T]
            "attention_mask": mask,  # [B, T]
        }


# -- model ------------------------------------------------------------------------------------
def recipe_vision_positions(m: ModelArguments, vision_config: PreTrainedConfig) -> int:
    """How many vision tokens get a learned position embedding under ``qformer_vision_positions``
    (every token the tower gives after feature selection), 0 when the key is off."""
    if not m.qformer_vision_positions:
        return 0
    return num_vision_tokens(vision_config, m.vision_feature_select_strategy)


def recipe_qformer_config(
    m: ModelArguments, vision_config: PreTrainedConfig, **extra: Any
) -> Blip2QFormerConfig:
    """The Q-Former of the recipe's size keys (``qformer_num_layers``, ``qformer_hidden_size``,
    ``qformer_num_heads``, ``qformer_cross_attention_freq``; width and heads default to the vision
    tower's), cross-attending to ``vision_config``'s features; ``extra`` for the text branch."""
    hidden = m.qformer_hidden_size or vision_config.hidden_size
    extra.setdefault("num_vision_positions", recipe_vision_positions(m, vision_config))
    return Blip2QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=m.qformer_num_layers,
        num_attention_heads=m.qformer_num_heads or vision_config.num_attention_heads,
        intermediate_size=4 * hidden,
        encoder_hidden_size=vision_config.hidden_size,
        cross_attention_frequency=m.qformer_cross_attention_freq,
        **extra,
    )


def build_stage1_model(run: RunConfig, tokenizer: PreTrainedTokenizerBase) -> QFormerPretrainModel:
    """The stage-1 model of the recipe's size: pretrained vision tower, freshly initialised Q-Former."""
    m = run.model
    vision_config = vision_config_from(m.vision_tower)
    ids = text_token_ids(tokenizer)
    if m.qformer_text_init:  # BLIP-2: the Q-Former starts from BERT, so it takes BERT's size
        bert = AutoConfig.from_pretrained(m.qformer_text_init)
        for key, value in (
            ("qformer_num_layers", bert.num_hidden_layers),
            ("qformer_hidden_size", bert.hidden_size),
            ("qformer_num_heads", bert.num_attention_heads),
        ):
            if key in run.source and getattr(m, key) not in (None, value):
                raise ConfigError(
                    f"`{key}` is {getattr(m, key)} but qformer_text_init `{m.qformer_text_init}` has "
                    f"{value}; remove it (the Q-Former takes the checkpoint's size)."
                )
        qcfg = qformer_config_from_bert(
            bert,
            vocab_size=ids["vocab_size"],
            encoder_hidden_size=vision_config.hidden_size,
            cross_attention_frequency=m.qformer_cross_attention_freq,
        )
        qcfg.pad_token_id = ids["pad_token_id"]
        qcfg.num_vision_positions = recipe_vision_positions(m, vision_config)
    else:
        qcfg = recipe_qformer_config(
            m,
            vision_config,
            vocab_size=ids["vocab_size"],
            pad_token_id=ids["pad_token_id"],
            max_position_embeddings=max(512, m.qformer_max_text_length),
            use_qformer_text_input=True,
        )
    config = QFormerPretrainConfig(
        vision_config=vision_config,
        qformer_config=qcfg,
        num_query_tokens=m.num_query_tokens,
        embed_dim=m.qformer_embed_dim,
        contrastive_loss=m.contrastive_loss,
        vision_feature_layer=m.vision_feature_layer,
        vision_feature_select_strategy=m.vision_feature_select_strategy,
        cls_token_id=ids["cls_token_id"],
        dec_token_id=ids["dec_token_id"],
        max_text_length=m.qformer_max_text_length,
    )
    model = QFormerPretrainModel(config)
    model.vision_tower = MODEL_MAPPING[type(vision_config)].from_pretrained(
        m.vision_tower, config=vision_config
    )
    if m.qformer_text_init:
        fresh = init_text_from_bert(model.qformer, m.qformer_text_init)
        logger.info("Q-Former text side from `%s`; %d tensors fresh", m.qformer_text_init, len(fresh))
    return model


def stage1_tokenizer_source(run: RunConfig) -> str:
    """The Q-Former's text tokenizer: qformer_tokenizer, else the BERT init's, else the LLM's."""
    return run.model.qformer_tokenizer or run.model.qformer_text_init or run.model.model_name_or_path


def freeze_vision(model: QFormerPretrainModel) -> None:
    """Stage 1 trains the Q-Former, its projections and heads; the vision tower stays frozen (logged)."""
    model.vision_tower.requires_grad_(False)
    model.vision_tower.eval()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    logger.info(
        "BLIP-2 stage 1: vision tower frozen (%d params); training %d params (Q-Former + heads)",
        frozen,
        trained,
    )


def is_stage1_dir(path: str | os.PathLike[str]) -> bool:
    """True for an output dir of stage 1 (its config.json's model_type is the stage-1 model's)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return (
        json.loads(config.read_text(encoding="utf-8")).get("model_type") == QFormerPretrainConfig.model_type
    )


def load_stage1(path: str | os.PathLike[str]) -> QFormerPretrainModel:
    """A stage-1 output dir (or checkpoint) as the stage-1 model."""
    return QFormerPretrainModel.from_pretrained(str(path))


class QFormerTrainer(Trainer):
    """`transformers.Trainer`; every save also writes the run record and the image processor, and the
    three losses are logged beside their sum."""

    def __init__(self, *args: Any, run_record: RunRecord, image_processor: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_record = run_record
        self.image_processor = image_processor
        self._parts: dict[str, list[float]] = {"loss_itc": [], "loss_itm": [], "loss_itg": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        for key in self._parts:
            self._parts[key].append(float(outputs[key]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        folder = Path(output_dir or self.args.output_dir)
        self.image_processor.save_pretrained(folder)
        self.run_record.save(folder)


def _image_processor(vision_tower: str):
    return AutoImageProcessor.from_pretrained(vision_tower)


def train_stage1(run: RunConfig) -> dict[str, Any]:
    """BLIP-2 stage 1 as configured; returns the fields of `mllm.training.stages.TrainResult`
    (`stages.train` builds it: this module does not import stages, which imports it)."""
    torch.manual_seed(run.training.seed)
    output_dir = Path(run.training.output_dir)
    resume = resolve_resume(run.training.resume_from_checkpoint, output_dir)
    if run.model.init_from:
        raise ConfigError(
            "qformer_pretrain starts from the components; init_from is for the stages after it."
        )
    tokenizer = AutoTokenizer.from_pretrained(stage1_tokenizer_source(run))
    model = build_stage1_model(run, tokenizer)
    freeze_vision(model)
    image_processor = _image_processor(run.model.vision_tower)
    dataset = CaptionPairs(
        run.data.data_path,
        run.data.image_folder,
        tokenizer,
        image_processor,
        model.config,
        bad_data=run.data.bad_data,
        allow_symlinks=run.data.allow_symlinks,
    )
    if len(dataset) == 0:
        raise ConfigError(
            f"`{run.data.data_path}` holds no image-caption pair (skipped: {dict(dataset.skipped)})."
        )
    record = RunRecord.new(
        vision_tower=run.model.vision_tower,
        model_name_or_path=stage1_tokenizer_source(run),
        tuning={**dataclasses.asdict(run.tuning), "tune_vision": "frozen", "tune_llm": "frozen"},
        base_vocab_size=len(tokenizer),
        config=run.source,
    )
    trainer = QFormerTrainer(
        model=model,
        args=run.training,
        train_dataset=dataset,
        data_collator=PairCollator(model.config.qformer_config.pad_token_id, model.config.max_text_length),
        processing_class=tokenizer,
        run_record=record,
        image_processor=image_processor,
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - start
    trainer.save_model(str(output_dir))
    trainer.save_state()
    return {
        "output_dir": output_dir,
        "global_step": output.global_step,
        "train_loss": float(output.training_loss),
        "runtime_s": runtime,
        "skipped": dict(dataset.skipped),
        "samples_per_second": output.metrics.get("train_samples_per_second"),
        "last_checkpoint": last_checkpoint(output_dir),
    }


# -- stage 2 ----------------------------------------------------------------------------------
def load_stage2_from_stage1(run: RunConfig) -> tuple[MllmForConditionalGeneration, MllmProcessor, RunRecord]:
    """Stage 2's model (stage 1's Q-Former + a fresh projection into the recipe's LLM), processor, record."""
    path = run.model.init_from
    stage1 = QFormerPretrainConfig.from_pretrained(path)
    previous = read_record(path)
    vision = previous.vision_tower
    if "vision_tower" in run.source and os.path.realpath(run.model.vision_tower) != os.path.realpath(vision):
        raise ConfigError(
            f"`vision_tower` is {run.model.vision_tower!r} here but {vision!r} in init_from `{path}`: the Q-Former "
            "was trained on that tower's features; remove vision_tower from the recipe."
        )
    inherited = {
        key: getattr(stage1, key)
        for key in ("num_query_tokens", "vision_feature_layer", "vision_feature_select_strategy")
    }
    inherited["qformer_vision_positions"] = num_vision_positions(stage1.qformer_config) > 0
    for key, value in inherited.items():
        if key in run.source and getattr(run.model, key) != value:
            raise ConfigError(
                f"`{key}` is {getattr(run.model, key)!r} here but {value!r} in init_from `{path}`; "
                "a stage started from stage 1 inherits it."
            )
    if not run.model.model_name_or_path:
        raise ConfigError("stage 2 needs `model_name_or_path` (the LLM): stage 1 had none.")
    qcfg = copy.deepcopy(stage1.qformer_config)
    qcfg.use_qformer_text_input = False  # stage 2 keeps the query path only
    model = MllmForConditionalGeneration.from_components(
        vision,
        run.model.model_name_or_path,
        connector_type="qformer",
        num_query_tokens=stage1.num_query_tokens,
        vision_feature_layer=stage1.vision_feature_layer,
        vision_feature_select_strategy=stage1.vision_feature_select_strategy,
        image_token=run.model.image_token,
        qformer_config=qcfg,
        quantization_config=llm_quantization_config(run.tuning),
        dtype=torch.bfloat16 if run.training.bf16 else None,
        attn_implementation=run.model.attn_implementation,
    )
    load_connector_from_stage1(model, path)
    processor = MllmProcessor.from_components(
        vision,
        run.model.model_name_or_path,
        num_image_tokens=model.config.num_image_tokens,
        image_token=model.config.image_token,
    )
    record = RunRecord.new(
        vision_tower=vision,
        model_name_or_path=run.model.model_name_or_path,
        tuning=dataclasses.asdict(run.tuning),
        base_vocab_size=AutoConfig.from_pretrained(run.model.model_name_or_path).vocab_size,
        config=run.source,
    )
    return model, processor, record


def load_connector_from_stage1(model: MllmForConditionalGeneration, path: str | os.PathLike[str]) -> None:
    """Copy stage 1's queries, vision position embeddings (if any) and Q-Former into
    ``model.connector``; only the projection stays fresh."""
    weights = load_file(str(Path(path) / "model.safetensors"))
    state = {target: value for key, value in weights.items() if (target := connector_key(key)) is not None}
    dtype = next(model.connector.parameters()).dtype
    missing, unexpected = model.connector.load_state_dict(
        {k: v.to(dtype) for k, v in state.items()}, strict=False
    )
    if unexpected or any(not k.startswith("proj.") for k in missing):
        raise ValueError(
            f"stage-1 weights in `{path}` do not fit the stage-2 connector: missing {missing}, unexpected {unexpected}"
        )
    logger.info(
        "stage 2: %d Q-Former tensors from stage 1 `%s`; projection freshly initialised", len(state), path
    )
