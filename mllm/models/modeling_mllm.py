"""`MllmForConditionalGeneration`: vision tower -> connector -> image tokens spliced into a causal LLM."""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mllm import run_dir
from mllm.models.attention import resolve_attn_implementation
from mllm.models.configuration_mllm import MllmConfig
from mllm.models.connectors import build_connector
from mllm.models.processing_mllm import ensure_image_token
from mllm.models.vision import build_vision_tower, select_features, vision_config_from

__all__ = ["MllmPreTrainedModel", "MllmForConditionalGeneration", "load_config_or_explain"]


def load_config_or_explain(
    role: str, name_or_path: str | os.PathLike, loader=AutoConfig.from_pretrained, **kw
):
    """Load a component's config, turning a deep OSError into a message that names the component."""
    try:
        return loader(str(name_or_path), **kw)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the {role} `{name_or_path}`: it is neither a local model folder nor a "
            f"Hub id that resolved ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


class MllmPreTrainedModel(PreTrainedModel):
    config: MllmConfig
    config_class = MllmConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules: list[str] = []


class MllmForConditionalGeneration(MllmPreTrainedModel, GenerationMixin):
    """A LLaVA/BLIP-2-style model: ``vision_tower`` -> ``connector`` -> ``language_model``."""

    def __init__(self, config: MllmConfig) -> None:
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.connector = build_connector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # runtime, not saved: batches carry cached `image_features` and the tower never runs (training
        # with vision_feature_cache sets it); the dummy pass of a text-only batch then skips the tower too
        self.vision_features_cached: bool = False
        self.post_init()

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        vision: str | os.PathLike,
        llm: str | os.PathLike,
        connector: str | None = None,
        image_token: str = "<image>",
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        quantization_config=None,
        **config_kwargs,
    ) -> MllmForConditionalGeneration:
        """Compose pretrained components (Hub ids or local folders, same code for both).

        ``config_kwargs`` are `MllmConfig` architecture fields (``connector_type``, ``connector_depth``,
        ``vision_feature_layer``, ...: `MllmConfig.architecture()` of a saved model rebuilds it);
        ``connector`` is the short name of ``connector_type`` (default ``mlp``).
        The connector is freshly initialised; the image token is added to the LLM's vocabulary.
        ``quantization_config`` (e.g. bitsandbytes NF4 for QLoRA) applies to the LLM only: the vision
        tower and the connector are never quantised. ``attn_implementation="flash_attention_2"``
        falls back to sdpa with a warning where flash-attn cannot run (`resolve_attn_implementation`).
        """
        attn_implementation = resolve_attn_implementation(attn_implementation)
        connector_type = config_kwargs.pop("connector_type", None)
        if connector is not None and connector_type is not None and connector != connector_type:
            raise ValueError(
                f"connector={connector!r} and connector_type={connector_type!r} disagree; pass one."
            )
        connector = connector_type or connector or "mlp"
        vision_config = load_config_or_explain("vision tower", vision, vision_config_from)
        text_config = load_config_or_explain("LLM", llm)
        tokenizer = load_config_or_explain("LLM tokenizer", llm, AutoTokenizer.from_pretrained)
        image_token_id = ensure_image_token(tokenizer, image_token)
        config = MllmConfig(
            vision_config=vision_config,
            text_config=text_config,
            connector_type=connector,
            image_token=image_token,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        load_kw = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation is not None:
            load_kw["attn_implementation"] = attn_implementation
        # The skeleton's tower and LLM are replaced below, so they are built on the meta device (no
        # memory, no init) -- except under DeepSpeed ZeRO-3, where transformers builds and initialises
        # every sub-model partitioned (zero.Init), which cannot write into meta tensors.
        skeleton = contextlib.nullcontext() if is_deepspeed_zero3_enabled() else torch.device("meta")
        with skeleton:
            model = cls(config)
        tower_cls = MODEL_MAPPING[type(vision_config)]
        model.vision_tower = tower_cls.from_pretrained(str(vision), config=vision_config, **load_kw)
        model.language_model = AutoModelForCausalLM.from_pretrained(
            str(llm), quantization_config=quantization_config, **load_kw
        )
        model.connector = build_connector(config).to(dtype or torch.float32)
        if len(tokenizer) > model.language_model.get_input_embeddings().num_embeddings:
            model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.text_config = model.language_model.config
        model.config.vision_config = model.vision_tower.config
        model.generation_config = copy.deepcopy(model.language_model.generation_config)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        # Image tokens are inputs only: never let generation emit one.
        model.generation_config.suppress_tokens = [image_token_id]
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Plain `from_pretrained`, except that an `mllm train` run dir of format ``trained`` (trained.safetensors,
        maybe + a LoRA adapter) is rebuilt by `from_run_dir` with LoRA merged; a run dir stopped early warns."""
        if kwargs.pop("_mllm_plain", False) or not run_dir.is_run_dir(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        record = run_dir.read_record(pretrained_model_name_or_path)
        if record.format == "full":
            run_dir.warn_if_interrupted(pretrained_model_name_or_path, record)
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return cls.from_run_dir(
            pretrained_model_name_or_path,
            dtype=None if dtype == "auto" else dtype,
            merge_lora=True,
            attn_implementation=kwargs.get("attn_implementation"),
        )

    @classmethod
    def from_run_dir(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        merge_lora: bool = False,
        quantize: bool | None = None,
        attn_implementation: str | None = None,
    ) -> nn.Module:
        """The model of an `mllm train` run dir (final or ``checkpoint-N``), in either format of `mllm.run_dir`.

        Format ``full`` loads with `from_pretrained`. Format ``trained`` is rebuilt from the recorded
        components and the architecture in config.json, ``trained.safetensors`` is loaded and the
        LoRA adapter attached (a `peft.PeftModel`), or folded in when ``merge_lora``. ``quantize``
        (default: as trained, unless merging) loads the LLM of a QLoRA run in 4 bit. Nothing is frozen
        here beyond what peft itself does to an attached adapter's base.
        """
        from peft import PeftModel

        from mllm.models.adapters import llm_quantization_config, tuning_of

        record = run_dir.read_record(path)
        run_dir.warn_if_interrupted(path, record)
        run_dir.check_weight_files(path)
        attn_implementation = resolve_attn_implementation(attn_implementation)
        load_kw = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
        if record.format == "full":
            return cls.from_pretrained(str(path), dtype=dtype, _mllm_plain=True, **load_kw)
        config = cls.config_class.from_pretrained(str(path))
        tuning = tuning_of(record.tuning)
        if quantize is None:
            quantize = tuning.tune_llm == "qlora" and not merge_lora
        quantization = llm_quantization_config(tuning) if quantize else None
        if quantize and quantization is None:
            quantization = llm_quantization_config(tuning_of({**record.tuning, "tune_llm": "qlora"}))
        model = cls.from_components(
            record.vision_tower,
            record.model_name_or_path,
            quantization_config=quantization,
            dtype=dtype,
            **load_kw,
            **config.architecture(),
        )
        if run_dir.has_adapter(path):
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        run_dir.load_weights_into(model, path)
        if merge_lora and isinstance(model, PeftModel):
            model = model.merge_and_unload()
        return model

    # -- embeddings -------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- forward ----------------------------------------------------------------------------
    @property
    def drops_cls(self) -> bool:
        """Whether the CLS token is dropped from the tower's features (what the connector sees)."""
        return self.config.vision_has_cls and self.config.vision_feature_select_strategy == "default"

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_img, 3, H, W] -> the connector's input [N_img, T_vis, D_vis] (what a feature cache stores)."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        return select_features(
            self.vision_tower, pixel_values.to(tower_dtype), self.config.vision_feature_layer, self.drops_cls
        )

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N_img, 3, H, W] -> [N_img, num_image_tokens, D_llm]."""
        return self.project_features(self.vision_features(pixel_values))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N_img, T_vis, D_vis] (computed here or cached) -> [N_img, T_img, D_llm]."""
        return self.connector(features.to(next(self.connector.parameters()).dtype))

    def _dummy_image_pass(self, like: torch.Tensor) -> torch.Tensor:
        """A zero-weighted pass of one blank image through the tower and the connector (a scalar).

        Run on every training batch that holds no image, so every rank runs the same modules: under
        DeepSpeed ZeRO-3 a rank that skipped the tower would wait forever in the parameter gather the
        others started (deepspeedai/DeepSpeed#7170), and DDP would find the connector's gradients
        missing. LLaMA-Factory's collator adds a fake image for the same reason. With
        ``vision_features_cached`` the tower runs on no rank, so only the connector sees zero features.
        """
        vc = self.config.vision_config
        if self.vision_features_cached:
            tokens = (vc.image_size // vc.patch_size) ** 2 + int(
                self.config.vision_has_cls and not self.drops_cls
            )
            features = torch.zeros(1, tokens, vc.hidden_size, device=like.device)  # [1, T_vis, D_vis]
            projected = self.project_features(features)
        else:
            blank = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, device=like.device)
            projected = self.get_image_features(blank)  # [1, T_img, D_llm]
        return projected.sum().to(like.dtype)

    def merge_image_features(
        self,
        input_ids: torch.Tensor,  # [B, T]
        inputs_embeds: torch.Tensor,  # [B, T, D_llm]
        image_features: torch.Tensor,  # [N_img, T_img, D_llm]
    ) -> torch.Tensor:
        """Write image features into the embedding rows of the image-token positions, in order."""
        image_mask = input_ids == self.config.image_token_id  # [B, T]
        n_slots = int(image_mask.sum())
        n_features = image_features.shape[0] * image_features.shape[1]
        if n_slots != n_features:
            raise ValueError(
                f"the input holds {n_slots} image-token positions but {image_features.shape[0]} image(s) give "
                f"{n_features} features ({image_features.shape[1]} per image): each image needs exactly one run "
                f"of {self.config.num_image_tokens} image tokens; build inputs with MllmProcessor and never "
                "truncate inside an image run."
            )
        features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)  # [B, T, D_llm]
        return inputs_embeds.masked_scatter(mask, features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        image_features: torch.FloatTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``image_features`` ([N_img, T_vis, D_vis], precomputed vision features) may replace ``pixel_values``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            image_slots = input_ids == self.config.image_token_id
            inputs_embeds = self.get_input_embeddings()(input_ids)
            has_images = image_features is not None or pixel_values is not None
            decoding = past_key_values is not None and _cache_len(past_key_values) > 0
            if has_images and not (decoding and not bool(image_slots.any())):
                # Skipped only on a decode step past the prompt, where no image token is left to fill.
                if image_features is not None:
                    projected = self.project_features(image_features)
                else:
                    projected = self.get_image_features(pixel_values)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, projected)
            elif bool(image_slots.any()) and not decoding:
                raise ValueError(
                    f"the input holds {int(image_slots.sum())} image-token positions but no pixel_values were given."
                )
            elif self.training and torch.is_grad_enabled():
                inputs_embeds = inputs_embeds + 0.0 * self._dummy_image_pass(inputs_embeds)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def _cache_len(past_key_values) -> int:
    get = getattr(past_key_values, "get_seq_length", None)
    return int(get()) if get is not None else 0
