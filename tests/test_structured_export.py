"""Structured export: a smaller stock HF model whose logits equal the hard-masked model's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main
from lightning_prune.export.atomic import OutputExistsError
from lightning_prune.export.structured import export_structured_hf
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver

CONFIG = Path(__file__).parents[1] / "configs" / "maskprune_uniform.yaml"


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape"),
    [
        ("llama", {"keep_heads": 0.5, "keep_channels": 0.5}, (2, 1, 16, 64)),
        ("qwen2", {"keep_heads": 0.5, "keep_channels": 0.75, "gqa": "query"}, (2, 2, 16, 96)),
        ("gemma3_text", {"budget": 0.3, "channel_multiple": 8}, (2, 1, 16, None)),
        ("gpt2", {"keep_channels": 0.25}, (4, None, None, 64)),
    ],
)
def test_export_slices_into_a_stock_config_with_equal_logits(
    tiny_models, tmp_path, arch, kwargs, shape
) -> None:
    family = UniformStructuredFamily(**kwargs)
    module = PruningModule(family, MinimaxSolver(), [UniformLagrangian()], tiny_models[arch])
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    for gate in family.parametrizations().values():  # a learned-looking, non-trivial ranking
        gate.logits.data = torch.randn(gate.units, generator=generator)
    family.harden()
    probe = torch.randint(0, 1000, (2, 24), generator=generator)
    with torch.no_grad():
        masked = module.model(input_ids=probe).logits
    out = tmp_path / "export"
    export_structured_hf(module, out)

    record = json.loads((out / "pruning.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    config = reloaded.config
    heads, kv, head_dim, channels = shape
    assert config.num_attention_heads == heads
    if kv is not None:
        assert config.num_key_value_heads == kv and config.head_dim == head_dim
        assert config.num_attention_heads % config.num_key_value_heads == 0
        assert len(record["kept_units"]["kv_heads"][0]) == kv
    inner = config.n_inner if arch == "gpt2" else config.intermediate_size
    if channels is not None:
        assert inner == channels
    assert record["pruned_shape"]["intermediate_size"] == inner
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
    assert (got - masked).abs().max().item() <= record["verification"]["tolerance"]
    assert record["verification"]["reload"]["lightning_prune_imported"] is False
    assert sum(p.numel() for p in reloaded.parameters()) == record["parameters"]["pruned"]
    assert record["parameters"]["pruned"] < record["parameters"]["dense"]
    if "budget" in kwargs:  # channels absorb the rounding of the head count
        assert abs(record["parameters"]["removed_share_of_decoder_linears"] - 0.3) < 0.02
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_export_refuses_an_existing_folder_and_writes_nothing_on_failure(tiny_models, tmp_path):
    family = UniformStructuredFamily(keep_channels=0.5)
    module = PruningModule(family, MinimaxSolver(), [UniformLagrangian()], tiny_models["llama"])
    module.configure_model()
    out = tmp_path / "taken"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        export_structured_hf(module, out)
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["taken"]


# -- fit → export through the real CLI on the 2-layer truncated default model -------------------
def fit_args(model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIG),
        f"--model.model={model}",
        "--data.seq_len=32",
        "--data.num_samples=6",
        "--data.eval_tokens=256",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(small_model, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp("maskprune")
    main(fit_args(small_model, root))
    return small_model, root, root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_fit_checkpoint_holds_gates_multipliers_and_learned_targets(fitted) -> None:
    _, root, ckpt = fitted
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    names = set(state)
    assert "mask_family.learned_targets" in names  # budget mode: the split is learned
    for layer in (0, 1):
        for local in ("self_attn.o_proj", "mlp.down_proj"):
            prefix = f"model.model.layers.{layer}.{local}.parametrizations.weight.0."
            assert {prefix + "logits", prefix + "y1", prefix + "y2"} <= names
    assert not any(k.endswith(".original") for k in names)  # frozen weights are not saved
    metrics = (root / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    for key in (
        "reg/lagrangian_heads",
        "reg/channels_expected_spread",
        "reg/heads_y1_mean",
        "reg/channels_target",
        "reg/heads_expected_l1",
        "channels_final_count",
    ):
        assert key in header, key


def test_cli_export_writes_a_model_that_plain_transformers_loads(fitted, tmp_path) -> None:
    model, _, ckpt = fitted
    out = tmp_path / "small"
    args = [
        "export",
        "--config",
        str(CONFIG),
        f"--model.model={model}",
        f"--ckpt_path={ckpt}",
        f"--output_dir={out}",
    ]
    main(args)
    record = json.loads((out / "pruning.json").read_text())
    assert record["pattern"] == "uniform_structured" and record["gqa"] == "kv_group"
    assert record["method"] == "MinimaxSolver" and record["budget"] == 0.25
    assert abs(record["parameters"]["removed_share_of_decoder_linears"] - 0.25) < 0.03
    code = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM as A;"
        f"m = A.from_pretrained({str(out)!r});"
        "assert 'lightning_prune' not in sys.modules;"
        "c = m.config; out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3);"
        "print(json.dumps([c.num_attention_heads, c.num_key_value_heads, c.head_dim,"
        " c.intermediate_size, sum(p.numel() for p in m.parameters()), out.shape[-1]]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    heads, kv, head_dim, inner, params, length = json.loads(result.stdout.splitlines()[-1])
    shape = record["pruned_shape"]
    assert (heads, kv, inner) == (
        shape["num_heads"],
        shape["num_kv_heads"],
        shape["intermediate_size"],
    )
    assert head_dim == 64 and heads % kv == 0 and heads in (3, 6, 9)
    assert inner % 32 == 0 and inner < 1536
    assert params == record["parameters"]["pruned"] and length == 6
    with pytest.raises(SystemExit):  # refuses to overwrite without being told
        main(args)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.mask_family.init_args.budget=1.5", "budget: expected a share in (0, 1)"),
        ("--model.mask_family.init_args.budget=0.97", "would leave zero heads or channels"),
    ],
)
def test_cli_bad_targets_fail_clearly_and_write_nothing(
    small_model, tmp_path, capsys, override, message
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(small_model, tmp_path / "run", override))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "lightning_logs").exists() or not list(
        (tmp_path / "run").rglob("*.ckpt")
    )
