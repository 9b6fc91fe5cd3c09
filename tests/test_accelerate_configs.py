"""recipes/accelerate/multi_node.yaml and fsdp.yaml, read by the installed accelerate as `accelerate launch` reads them.

Nothing here starts a process group or needs a GPU: the configs go through accelerate's own config
loader, its launch-argument parser and validation, the environment it hands each process, and (FSDP)
the plugin it builds from that environment and the auto-wrap policy it applies to a tiny mllm model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "recipes" / "accelerate"


def _launch_args(config: Path, *flags: str):
    """What `accelerate launch --config_file CONFIG FLAGS -m mllm train r.yaml` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config), *flags, "-m", "mllm", "train", "r.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


def test_multi_node_config_gives_each_node_its_rank(monkeypatch) -> None:
    """Node 1 of the config's launch line joins a 2-node torchrun at node 0's address, 8 processes here."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env
    from torch.distributed import run as distrib_run

    config = load_config_from_file(str(ACCELERATE / "multi_node.yaml"))
    assert config.distributed_type.value == "MULTI_GPU"
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)
    assert config.main_process_ip and config.main_process_port == 29500

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's config would set it in this process
    args = _launch_args(
        ACCELERATE / "multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "192.0.2.7"
    )
    prepare_multi_gpu_env(args)  # node 1 skips the port check (only node 0 listens)
    torchrun_args = _filter_args(
        args,
        distrib_run.get_args_parser(),
        ["--training_script", args.training_script, "--training_script_args", args.training_script_args],
    )
    launch, _, script_args = distrib_run.config_from_args(torchrun_args)
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (2, 2, 8)
    assert launch.rdzv_endpoint == "192.0.2.7:29500" and launch.rdzv_configs["rank"] == 1
    assert script_args[:4] == ["-u", "-m", "mllm", "train"]


def test_fsdp_config_names_keys_accelerate_accepts_and_wraps_the_decoder_layers(
    monkeypatch, tiny_components
) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from mllm.models.modeling_mllm import MllmForConditionalGeneration

    config = load_config_from_file(str(ACCELERATE / "fsdp.yaml"))  # unknown top-level keys fail here
    assert config.distributed_type.value == "FSDP"
    # accelerate copies fsdp_config.X to the launch argument --fsdp_X without checking the name: an
    # unknown key would be dropped silently, so every key must be one of its launch arguments
    known = set(vars(launch_command_parser().parse_args(["r.py"])))
    unknown = [k for k in config.fsdp_config if (k if k.startswith("fsdp_") else f"fsdp_{k}") not in known]
    assert not unknown, unknown

    env = prepare_multi_gpu_env(_launch_args(ACCELERATE / "fsdp.yaml", "--main_process_port", "29655"))
    for key, value in env.items():  # what each FSDP process is started with
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # accelerate's own validation of the values
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # rank 0 gathers: the save is an mllm run dir
    assert not plugin.cpu_ram_efficient_loading
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    model = MllmForConditionalGeneration.from_components(
        str(tiny_components["clip-vision"]), str(tiny_components["llama"])
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    layers = model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    assert sorted(set(wrapped)) == ["CLIPEncoderLayer", "LlamaDecoderLayer"] and len(wrapped) == layers

    # why the config names the classes: the default (the model's _no_split_modules) names one the
    # model does not hold, and accelerate stops
    plugin.transformer_cls_names_to_wrap = None
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        fsdp2_prepare_auto_wrap_policy(plugin, model)
