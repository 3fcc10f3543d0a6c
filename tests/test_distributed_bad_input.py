"""Scale-out bad input: clear errors before any process starts or any weight is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.launch_checks import check_trainer_config
from lightning_prune.sharding import shard_bounds, straddling_rank

CONFIGS = Path(__file__).parents[1] / "configs"
TORCHRUN_2X1 = {  # what torchrun sets for 2 nodes of 1 process each
    "TORCHELASTIC_RUN_ID": "job",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "1",
}
SLURM_2X4 = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        ({"strategy": "fsdp", "accelerator": "cpu"}, {}, "configs/fsdp2.yaml"),
        ({"strategy": "deepspeed", "accelerator": "cpu"}, {}, "needs CUDA GPUs"),
        ({"strategy": "ddp", "accelerator": "gpu"}, {}, "use accelerator: cpu"),
        ({"devices": 2, "num_nodes": 1}, TORCHRUN_2X1, "trainer.devices: 2, but torchrun"),
        ({"devices": 1, "num_nodes": 1}, TORCHRUN_2X1, "set num_nodes: 2"),
        ({"devices": 8, "num_nodes": 2}, SLURM_2X4, "set devices: 4"),
        ({"devices": 4, "num_nodes": 1}, SLURM_2X4, "set num_nodes: 2"),
    ],
)
def test_strategy_devices_and_nodes_are_checked(config, env, message) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_trainer_config(config, env)


def test_matching_launcher_settings_pass() -> None:
    check_trainer_config({"devices": 1, "num_nodes": 2, "strategy": "ddp"}, TORCHRUN_2X1)
    check_trainer_config({"devices": 4, "num_nodes": 2, "accelerator": "cpu"}, SLURM_2X4)
    check_trainer_config({"devices": 2, "strategy": "ddp", "accelerator": "cpu"}, {})


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"data_parallel_size": 1, "tensor_parallel_size": 1}, "expected devices x num_nodes"),
        ({"data_parallel_size": 1, "tensor_parallel_size": 2}, "FSDP2 only"),
    ],
)
def test_model_parallel_sizes_must_be_pure_fsdp2(sizes, message) -> None:
    config = {"strategy": ModelParallelStrategy(**sizes), "devices": 2, "accelerator": "cpu"}
    with pytest.raises(ConfigError, match=message):
        check_trainer_config(config, {})


def test_gpu_only_strategy_fails_in_the_cli_before_the_model_is_read(capsys) -> None:
    args = [
        "fit",
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        "--model.model=/nonexistent/model",  # never reached: the strategy is refused first
        "--trainer.strategy=fsdp",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the only error: the strategy
    assert error.startswith("lightning-prune: error: trainer.strategy: 'fsdp' needs CUDA GPUs")
    assert "fsdp2.yaml" in error


def test_fsdp1_config_is_refused_on_cpu_with_the_fsdp2_overlay_named(capsys) -> None:
    """configs/fsdp.yaml (FSDPStrategy) on a CPU machine: refused before the model is read."""
    args = [
        "fit",
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        f"--config={CONFIGS / 'fsdp.yaml'}",
        "--model.model=/nonexistent/model",
        "--trainer.accelerator=cpu",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trainer.strategy: 'fsdpstrategy' needs CUDA GPUs (Lightning's FSDPStrategy" in error
    assert "configs/fsdp2.yaml" in error


def test_fsdp1_is_accepted_on_gpus_with_what_it_needs(monkeypatch) -> None:
    """On a CUDA machine FSDPStrategy passes, unless it cannot shard or train the surrogates."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    gpus = {"accelerator": "gpu", "devices": 8, "num_nodes": 2}
    check_trainer_config({**gpus, "strategy": "fsdp"}, {})
    check_trainer_config({**gpus, "strategy": FSDPStrategy(state_dict_type="sharded")}, {})
    refused = [
        ({"strategy": FSDPStrategy(use_orig_params=False)}, "init_args.use_orig_params: false"),
        ({"strategy": FSDPStrategy(sharding_strategy="NO_SHARD")}, "NO_SHARD replicates"),
        ({"strategy": "fsdp", "devices": 1, "num_nodes": 1}, "devices x trainer.num_nodes: 1"),
    ]
    for override, message in refused:
        with pytest.raises(ConfigError, match=message):
            check_trainer_config({**gpus, **override}, {})


def test_fsdp1_refuses_smooth_terms_of_sharded_surrogates() -> None:
    """Under FSDP1 the surrogates are flat slices outside the forward: a smooth regularizer of
    them (weight_anchor) is refused; the prox-only N:M regularizer is fine."""
    from torch import nn

    from lightning_prune.fsdp1 import FSDP1Layout, check_regularizers
    from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
    from lightning_prune.regularizers.weight_anchor import WeightAnchorRegularizer

    sharded = FSDP1Layout(root=nn.Module(), gathers=True)
    check_regularizers([NMSparsityRegularizer()], sharded)
    check_regularizers([WeightAnchorRegularizer()], FSDP1Layout(root=nn.Module()))  # replicated
    with pytest.raises(ConfigError, match="model.regularizers: WeightAnchorRegularizer"):
        check_regularizers([NMSparsityRegularizer(), WeightAnchorRegularizer()], sharded)


def test_shards_that_cut_nm_groups_are_found() -> None:
    assert shard_bounds(64, 3) == [(0, 22), (22, 44), (44, 64)]
    assert straddling_rank(64, 3, 4) == 0  # 22 rows: a group of 4 is cut
    assert straddling_rank(64, 2, 4) is None
    assert straddling_rank(576, 8, 4) is None  # SmolLM2 hidden size on 8 ranks


def test_meta_init_reads_shards_and_matches_a_whole_load(
    small_model, tmp_path, monkeypatch
) -> None:
    """Under FSDP2 the LM is built on the meta device, sharded, and each rank reads only its
    shards from the safetensors files; the result equals an ordinary whole-model load."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_prune.module as module_file
    from lightning_prune.masks.structured import UniformStructuredFamily
    from lightning_prune.module import PruningModule
    from lightning_prune.solvers.minimax import MinimaxSolver

    def build(family):
        return PruningModule(family, MinimaxSolver(), model=small_model)

    reference = build(UniformStructuredFamily(budget=0.25, channel_multiple=32))
    reference.configure_model()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        sharded = build(UniformStructuredFamily(budget=0.25, channel_multiple=32))
        sharded._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))

        def whole_load(*args, **kwargs):
            raise AssertionError("the whole model was loaded")

        monkeypatch.setattr(module_file, "load_causal_lm", whole_load)
        sharded.configure_model()
        got = dict(sharded.named_parameters())
        assert all(p.device.type == "cpu" for p in got.values())
        for name, expected in reference.named_parameters():
            value = got[name].full_tensor() if hasattr(got[name], "full_tensor") else got[name]
            assert torch.equal(value.detach(), expected.detach()), name
        assert got["model.model.embed_tokens.weight"].__class__.__name__ == "DTensor"
    finally:
        dist.destroy_process_group()


def test_ranks_batches_of_a_step_are_the_one_rank_batch() -> None:
    from torch.utils.data import DataLoader

    from lightning_prune.data.sampling import EpochShuffleSampler

    data = list(range(13))  # not a multiple of the world size: padded like DistributedSampler

    def batches(world: int, rank: int, size: int, epoch: int) -> list[list[int]]:
        sampler = EpochShuffleSampler(data, seed=3, num_replicas=world, rank=rank)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in DataLoader(data, batch_size=size, sampler=sampler)]

    for epoch in (0, 1):
        one = batches(1, 0, 4, epoch)
        two = [batches(2, rank, 2, epoch) for rank in (0, 1)]
        for step, (a, b) in enumerate(zip(*two)):
            assert sorted(a + b) == sorted(one[step]) or step == len(one) - 1
        assert sorted(sum(one, [])) == data
    assert batches(1, 0, 4, 0) != batches(1, 0, 4, 1)  # a new permutation every epoch
