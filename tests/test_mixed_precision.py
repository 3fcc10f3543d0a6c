"""Mixed precision: float32 mask state under a (b)float16 LM, ``trainer.precision`` checks and
exports in bfloat16, on the 2-layer truncated default model (real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main
from lightning_prune.data import CalibrationDataModule
from lightning_prune.errors import ConfigError
from lightning_prune.fsdp1 import check_dtypes as check_fsdp1_dtypes
from lightning_prune.launch_checks import check_trainer_config
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.models import load_causal_lm
from lightning_prune.module import PruningModule
from lightning_prune.ops.nm_prox import is_nm, nm_topn_mask
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver

CONFIGS = Path(__file__).parents[1] / "configs"


def fit(model: str, module: PruningModule, precision: str, steps: int, seed: int = 0) -> float:
    """``steps`` optimizer steps on CPU, then one validation; returns ``val/loss``."""
    seed_everything(seed)
    data = CalibrationDataModule(tokenizer=model, seq_len=32, num_samples=steps, eval_tokens=256)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return float(trainer.callback_metrics["val/loss"])


def proximal(model: str, dtype: str, lr: float = 1e-3, lam: float = 0.1) -> PruningModule:
    solver = ProximalSolver(lr=lr, warmup_ratio=0.1)
    regularizers = [NMSparsityRegularizer(lam=lam)] if lam else []
    return PruningModule(NMMaskFamily(2, 4), solver, regularizers, model, dtype=dtype)


def minimax(model: str, dtype: str) -> PruningModule:
    family = UniformStructuredFamily(keep_heads=0.5, keep_channels=0.5)
    solver = MinimaxSolver(lr=0.3, lr_multipliers=0.05, warmup_ratio=0.3)
    return PruningModule(family, solver, [UniformLagrangian()], model, dtype=dtype)


def state_dtypes(module: PruningModule) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """Dtypes of the learnable state and of the frozen target weights."""
    learned = {p.dtype for p in module.parameters() if p.requires_grad}
    return learned, {w.dtype for w in module.mask_family.originals().values()}


def hard_masks(module: PruningModule) -> dict[str, torch.Tensor]:
    family = module.mask_family
    family.harden()
    return {name: p.hard_mask().clone() for name, p in family.parametrizations().items()}


def disagreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of mask entries that differ."""
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


# -- (a) float32 master state ---------------------------------------------------------------------
def test_updates_below_bfloat16_resolution_accumulate_in_the_float32_surrogate(small_model):
    """Three AdamW steps at lr 1e-5 on a bfloat16 LM: every surrogate entry moves, and (measured)
    97% of these moves are smaller than half a bfloat16 step of the weight, so a bfloat16
    surrogate would have rounded them away; AdamW on a bfloat16 copy keeps 98% of W0."""
    module = proximal(small_model, "bfloat16", lr=1e-5, lam=0.0)
    fit(small_model, module, "bf16-mixed", steps=3)
    assert state_dtypes(module) == ({torch.float32}, {torch.bfloat16})
    family, moved, lost, total = module.mask_family, 0, 0, 0
    for name, parametrization in family.parametrizations().items():
        w0, surrogate = family.originals()[name], parametrization.surrogate.detach()
        changed = surrogate != w0.float()
        moved += int(changed.sum())
        lost += int((changed & (surrogate.to(torch.bfloat16) == w0)).sum())
        total += surrogate.numel()
    assert moved / total > 0.99
    assert lost / moved > 0.9

    w0 = family.originals()["model.layers.0.mlp.down_proj"].detach()
    copy = torch.nn.Parameter(w0.clone())  # the bfloat16 surrogate this replaces
    optimizer = torch.optim.AdamW([copy], lr=1e-5, weight_decay=0.0)
    for _ in range(3):
        copy.grad = torch.ones_like(copy)
        optimizer.step()
    assert (copy.detach() == w0).float().mean() > 0.9


def test_casting_the_model_keeps_the_mask_state_float32(tiny_models) -> None:
    """``model.to(bfloat16)`` (Lightning's ``bf16-true``) casts the LM, not the mask state."""
    for family, solver in (
        (NMMaskFamily(2, 4), ProximalSolver()),
        (UniformStructuredFamily(budget=0.3, channel_multiple=8), MinimaxSolver()),
    ):
        module = PruningModule(family, solver, [], tiny_models["llama"])
        module.configure_model()
        learned = [p for p in module.parameters() if p.requires_grad]
        with torch.no_grad():
            for param in learned:
                param.add_(1e-3 * torch.randn_like(param))  # values bfloat16 cannot hold
        before = [p.detach().clone() for p in learned]
        module.to(torch.bfloat16)
        assert state_dtypes(module) == ({torch.float32}, {torch.bfloat16})
        assert all(torch.equal(p, b) for p, b in zip(learned, before))
        family.set_mode("learn")
        with torch.no_grad():
            logits = module(torch.randint(0, 1000, (1, 8))).logits
        assert logits.dtype == torch.bfloat16  # the forward casts the state to the LM's dtype


@pytest.mark.parametrize("solver", ["proximal", "minimax"])
def test_bf16_true_trains_float32_state_and_logs_the_dtypes(small_model, solver) -> None:
    module = {"proximal": proximal, "minimax": minimax}[solver](small_model, "float32")
    loss = fit(small_model, module, "bf16-true", steps=2)
    assert torch.isfinite(torch.tensor(loss))
    assert state_dtypes(module) == ({torch.float32}, {torch.bfloat16})
    assert module.precision_record() == {
        "precision": "bf16-true",
        "model_dtype": "bfloat16",
        "mask_state_dtype": "float32",
    }


# -- (b) a bfloat16 fit ends close to the float32 fit -------------------------------------------
def test_proximal_bf16_mixed_fit_matches_float32(small_model) -> None:
    """Measured (8 steps): training changes 4.48% of the mask entries from W0's magnitude mask;
    the bfloat16 fit (LM in bfloat16, bf16-mixed) differs from the float32 fit on 0.09% of
    entries, so it reproduces ~98% of what training learned; validation loss within 0.04%.
    Tolerances: at least 90% of the learned changes, loss within 0.5%."""
    reference = proximal(small_model, "float32")
    reference_loss = fit(small_model, reference, "32-true", steps=8)
    start = {
        name: p.rows(nm_topn_mask(p.rows(reference.mask_family.originals()[name]), 2, 4))
        for name, p in reference.mask_family.parametrizations().items()
    }
    low = proximal(small_model, "bfloat16")
    low_loss = fit(small_model, low, "bf16-mixed", steps=8)
    assert state_dtypes(low) == ({torch.float32}, {torch.bfloat16})
    reference_masks = hard_masks(reference)
    learned = disagreement(reference_masks, start)
    assert learned > 0.02  # the fit moved the mask, so agreeing is not trivial
    assert disagreement(reference_masks, hard_masks(low)) < 0.1 * learned
    assert abs(low_loss - reference_loss) < 0.005 * reference_loss


def test_minimax_bf16_mixed_fit_matches_float32(small_model) -> None:
    """Measured (30 steps): the same kept counts, 98.4% of the units kept alike and validation
    loss within 0.22% of the float32 fit. For scale, float32 fits at seeds 0, 1 and 2 keep only
    58-61% of the units alike and differ by 2.3-2.5% in loss. Tolerances: 90% and 1%."""
    reference = minimax(small_model, "float32")
    reference_loss = fit(small_model, reference, "32-true", steps=30)
    low = minimax(small_model, "bfloat16")
    low_loss = fit(small_model, low, "bf16-mixed", steps=30)
    assert state_dtypes(low) == ({torch.float32}, {torch.bfloat16})
    families = reference.mask_family, low.mask_family
    assert families[0].kept_counts() == families[1].kept_counts()
    units = [
        torch.cat([g.unit_mask() for kind in f.kinds() for g in f.gates(kind)]) for f in families
    ]
    assert (units[0] == units[1]).float().mean() >= 0.9
    assert abs(low_loss - reference_loss) < 0.01 * reference_loss


# -- (c) exports of a bfloat16 fit --------------------------------------------------------------
def cli_fit(config: str, model: str, root: Path) -> Path:
    """Fit a recipe with the LM in bfloat16 under bf16-mixed; the last checkpoint."""
    main(
        [
            "fit",
            f"--config={CONFIGS / config}",
            f"--model.model={model}",
            "--model.dtype=bfloat16",
            "--model.init_mask=null",
            "--trainer.precision=bf16-mixed",
            "--data.seq_len=32",
            "--data.num_samples=4",
            "--data.eval_tokens=128",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0",
        ]
    )
    version = root / "lightning_logs" / "version_0"
    hparams = (version / "hparams.yaml").read_text()
    assert "mask_state_dtype: float32" in hparams and "model_dtype: bfloat16" in hparams
    return version / "checkpoints" / "last.ckpt"


def cli_export(config: str, model: str, ckpt: Path, out: Path) -> None:
    main(
        [
            "export",
            f"--config={CONFIGS / config}",
            f"--model.model={model}",
            "--model.dtype=bfloat16",
            f"--ckpt_path={ckpt}",
            f"--output_dir={out}",
        ]
    )


def floating(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "model.safetensors")
    return {name: t for name, t in tensors.items() if t.is_floating_point()}


def test_nm_export_of_a_bf16_fit_is_w0_times_the_mask_in_bfloat16(small_model, tmp_path) -> None:
    ckpt = cli_fit("proxsparse_2of4.yaml", small_model, tmp_path / "run")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values()} == {torch.float32}  # surrogates
    cli_export("proxsparse_2of4.yaml", small_model, ckpt, tmp_path / "hf")
    exported = floating(tmp_path / "hf")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    dense = load_causal_lm(small_model, "bfloat16").state_dict()
    for key, surrogate in state.items():  # model.<name>.parametrizations.weight.0.surrogate
        name = key.removeprefix("model.").removesuffix(".parametrizations.weight.0.surrogate")
        weight = exported[f"{name}.weight"]
        assert torch.equal(weight, dense[f"{name}.weight"] * nm_topn_mask(surrogate, 2, 4)), name
        assert is_nm(weight.float(), 2, 4), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert reloaded.dtype == torch.bfloat16


def test_structured_export_of_a_bf16_fit_is_a_bfloat16_model(small_model, tmp_path) -> None:
    """The slicing is verified in float32 (bfloat16 rounding of the smaller matmuls differs),
    the weights are written in bfloat16 and load with plain transformers."""
    ckpt = cli_fit("maskprune_uniform.yaml", small_model, tmp_path / "run")
    cli_export("maskprune_uniform.yaml", small_model, ckpt, tmp_path / "hf")
    assert {t.dtype for t in floating(tmp_path / "hf").values()} == {torch.bfloat16}
    record = json.loads((tmp_path / "hf" / "pruning.json").read_text())
    verification = record["verification"]
    assert verification["reload"]["logits_max_abs_error"] <= verification["tolerance"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert reloaded.dtype == torch.bfloat16
    assert sum(p.numel() for p in reloaded.parameters()) == record["parameters"]["pruned"]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ("64-true", "trainer.precision: '64-true' is not supported"),
        ("transformer-engine", "trainer.precision: 'transformer-engine' is not supported"),
        ("16-mixed", "trainer.precision: '16-mixed' needs a CUDA GPU"),
        (16, "trainer.precision: '16' needs a CUDA GPU"),
    ],
)
def test_precision_the_run_cannot_honour_is_refused(precision, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_trainer_config({"accelerator": "cpu", "precision": precision}, {})


def test_supported_precisions_pass(monkeypatch) -> None:
    for precision in (None, "32-true", 32, "bf16-mixed", "bf16", "bf16-true", "16-true"):
        check_trainer_config({"accelerator": "cpu", "precision": precision}, {})
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    check_trainer_config({"accelerator": "gpu", "precision": "16-mixed"}, {})
    gpus = {"accelerator": "gpu", "devices": 8, "strategy": "fsdp", "precision": "bf16-true"}
    with pytest.raises(ConfigError, match="trainer.precision: 'bf16-true' with FSDPStrategy"):
        check_trainer_config(gpus, {})


def test_fsdp1_refuses_a_bfloat16_lm_with_float32_surrogates(tiny_models) -> None:
    model = tiny_models["llama"]
    module = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), [], model, dtype="bfloat16")
    module.configure_model()
    with pytest.raises(ConfigError, match="model.dtype: bfloat16 with FSDPStrategy"):
        check_fsdp1_dtypes(module.mask_family)
    structured = UniformStructuredFamily(keep_channels=0.5)  # replicated state: not flattened
    module = PruningModule(structured, MinimaxSolver(), [], model, dtype="bfloat16")
    module.configure_model()
    check_fsdp1_dtypes(structured)


def test_precision_error_in_the_cli_names_the_field_and_writes_nothing(tmp_path, capsys):
    args = [
        "fit",
        f"--config={CONFIGS / 'proxsparse_2of4.yaml'}",
        "--model.model=/nonexistent/model",  # never reached: the precision is refused first
        "--trainer.precision=64-true",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("lightning-prune: error: trainer.precision: '64-true' is not supported")
    assert "expected one of 32-true, bf16-mixed" in error
    assert list(tmp_path.iterdir()) == []
