"""Bad input gets a clear error naming the field, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.checkpoints import load_learned_state
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.models import ModelLoadError, load_causal_lm
from lightning_prune.module import PruningModule
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.solvers.proximal import ProximalSolver

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


def run_fit(root: Path, model: str, *extra: str) -> None:
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--model.model={model}",
            "--data.seq_len=32",
            "--data.num_samples=2",
            "--data.eval_tokens=64",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )


def assert_cli_error(capsys, message: str, root: Path) -> None:
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(root.rglob("*.ckpt"))


def test_unknown_plugin_name_lists_known(tmp_path, capsys, small_model) -> None:
    with pytest.raises(SystemExit):
        run_fit(tmp_path, small_model, "--model.solver=proxymal")
    err = capsys.readouterr().err
    assert "unknown solvers plugin 'proxymal': expected one of [" in err, err
    assert "'minimax'" in err and "'proximal'" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_unknown_init_mask_lists_known(tmp_path, capsys, small_model) -> None:
    with pytest.raises(SystemExit):
        run_fit(tmp_path, small_model, "--model.init_mask=wandaa")
    assert_cli_error(capsys, "unknown initializers plugin 'wandaa'", tmp_path)


def test_in_features_not_divisible_names_layer(tiny_models) -> None:
    from lightning_prune.adapters import adapter_for

    model = load_causal_lm(tiny_models["llama"])
    with pytest.raises(ConfigError, match=r"layer 'model.layers.0.self_attn.q_proj'.*m=5"):
        NMMaskFamily(2, 5).attach(model, adapter_for(model))


def test_missing_corpus(tmp_path, capsys, small_model) -> None:
    with pytest.raises(SystemExit):
        run_fit(tmp_path, small_model, f"--data.source={tmp_path / 'nope.txt'}")
    assert_cli_error(capsys, "data.source: path", tmp_path)


def test_seq_len_above_context(tmp_path, capsys, tiny_models) -> None:
    with pytest.raises(SystemExit):
        run_fit(tmp_path, tiny_models["llama"], "--data.seq_len=1024")
    assert_cli_error(capsys, "data.seq_len: 1024 exceeds the model's context 256", tmp_path)


def test_model_not_available_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download no-org/no-model"):
        load_causal_lm("no-org/no-model")


def test_model_folder_without_config(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_causal_lm(str(tmp_path))


def test_checkpoint_from_another_model(tmp_path, tiny_models) -> None:
    def module(model: str) -> PruningModule:
        return PruningModule(
            NMMaskFamily(2, 4), ProximalSolver(), [NMSparsityRegularizer()], model=model
        )

    source = module(tiny_models["gpt2"])
    source.configure_model()
    ckpt = tmp_path / "other.ckpt"
    checkpoint = {"state_dict": {}}
    source.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, ckpt)
    with pytest.raises(ConfigError, match="another model.*model_type: checkpoint 'gpt2'"):
        load_learned_state(module(tiny_models["llama"]), ckpt)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lam": -1.0}, "nm_sparsity.lam"),
    ],
)
def test_regularizer_ranges(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        NMSparsityRegularizer(**kwargs)


@pytest.mark.parametrize("n, m", [(4, 4), (0, 4), (5, 4)])
def test_nm_pattern_ranges(n, m) -> None:
    with pytest.raises(ConfigError, match="mask_family.n and mask_family.m"):
        NMMaskFamily(n, m)
