"""Least-squares refit of the kept weights: the math against brute-force ``lstsq``, the layer-wise
flow against direct forwards, the ``WeightRefit`` callback through the real CLI (fit → export →
plain transformers reload), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import WeightRefit
from lightning_prune.checkpoints import load_learned_state
from lightning_prune.cli import main
from lightning_prune.data import CalibrationDataModule
from lightning_prune.errors import ConfigError
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.ops.nm_prox import is_nm, nm_topn_mask
from lightning_prune.ops.refit import (
    centred_gram,
    mean_shift_bias,
    refit_columns,
    refit_rows,
)
from lightning_prune.refit import GramStats, compute_refit, refit_target
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver

CONFIGS = Path(__file__).parents[1] / "configs"


# -- brute force -----------------------------------------------------------------------------
def lstsq_row(x: torch.Tensor, w0: torch.Tensor, kept: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin ||X_K w - X w0||^2 + lam ||w - w0_K||^2`` by ``lstsq`` on stacked rows."""
    k = int(kept.sum())
    a = torch.cat([x[:, kept], lam**0.5 * torch.eye(k, dtype=x.dtype)])
    b = torch.cat([x @ w0, lam**0.5 * w0[kept]])
    return torch.linalg.lstsq(a, b[:, None]).solution[:, 0]


def lstsq_row_with_intercept(
    x: torch.Tensor, w0: torch.Tensor, b0: float, kept: torch.Tensor, lam: float
) -> tuple[torch.Tensor, float]:
    """The same with a free (undamped) intercept: ``X_K w + b ≈ X w0 + b0``."""
    k = int(kept.sum())
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    a = torch.cat(
        [
            torch.cat([x[:, kept], ones], 1),
            torch.cat([lam**0.5 * torch.eye(k, dtype=x.dtype), torch.zeros(k, 1)], 1),
        ]
    )
    b = torch.cat([x @ w0 + b0, lam**0.5 * w0[kept]])
    solution = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    return solution[:k], float(solution[k])


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mix
    return x + torch.randn(width, generator=generator, dtype=torch.float64)  # nonzero mean


def stats_of(x: torch.Tensor) -> GramStats:
    stats = GramStats()
    stats.add(x, x.t() @ x)
    return stats


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.3])
def test_nm_refit_equals_per_row_lstsq(damping) -> None:
    x = correlated_inputs(400, 32)
    w0 = torch.randn(12, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = nm_topn_mask(torch.rand(12, 32, generator=torch.Generator().manual_seed(2)), 2, 4)
    gram = x.t() @ x
    refit = refit_rows(w0, gram, mask, damping)
    lam = damping * gram.diagonal().mean().item()
    for r in range(12):
        expected = lstsq_row(x, w0[r], mask[r], lam)
        assert torch.allclose(refit[r, mask[r]], expected, atol=1e-8, rtol=1e-6), r
    assert torch.equal(refit != 0, mask)  # exact zeros outside, nothing kept lost
    assert is_nm(refit, 2, 4)


def test_nm_refit_in_chunks_and_float32_matches() -> None:
    x = correlated_inputs(300, 64, seed=3)
    w0 = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    mask = nm_topn_mask(torch.rand(40, 64, generator=torch.Generator().manual_seed(5)), 2, 4)
    gram = x.t() @ x
    whole = refit_rows(w0.double(), gram, mask, 0.01)
    chunked = refit_rows(w0, gram, mask, 0.01, chunk_elements=3 * 32 * 32)  # 3 rows a chunk
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked.double(), whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked != 0, mask)


def test_unequal_kept_counts_are_solved_per_count() -> None:
    x = correlated_inputs(200, 16, seed=6)
    w0 = torch.randn(5, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mask = torch.rand(5, 16, generator=torch.Generator().manual_seed(8)) < 0.5
    mask[0] = False  # a row that keeps nothing stays zero
    refit = refit_rows(w0, x.t() @ x, mask, 0.05)
    lam = 0.05 * (x.t() @ x).diagonal().mean().item()
    assert torch.equal(refit[0], torch.zeros(16, dtype=torch.float64))
    for r in range(1, 5):
        assert torch.allclose(refit[r, mask[r]], lstsq_row(x, w0[r], mask[r], lam), atol=1e-8)


def test_shared_columns_refit_equals_lstsq_and_the_per_row_solver() -> None:
    x = correlated_inputs(300, 24, seed=9)
    w0 = torch.randn(10, 24, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    kept = torch.zeros(24, dtype=torch.bool)
    kept[[0, 1, 2, 3, 8, 9, 10, 11, 20, 21, 22, 23]] = True  # three of six units of 4 columns
    gram = x.t() @ x
    refit = refit_columns(w0, gram, kept, 0.01)
    lam = 0.01 * gram.diagonal().mean().item()
    for r in range(10):
        assert torch.allclose(refit[r, kept], lstsq_row(x, w0[r], kept, lam), atol=1e-8)
    assert (refit[:, ~kept] == 0).all()
    per_row = refit_rows(w0, gram, kept.expand(10, -1), 0.01)
    assert torch.allclose(refit, per_row, atol=1e-9)


@pytest.mark.parametrize("shared", [True, False])
def test_intercept_refit_equals_lstsq_with_a_column_of_ones(shared) -> None:
    x = correlated_inputs(300, 16, seed=11)
    w0 = torch.randn(6, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    b0 = torch.randn(6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    if shared:
        mask = (torch.arange(16) < 8).expand(6, -1)
    else:
        mask = nm_topn_mask(torch.rand(6, 16, generator=torch.Generator().manual_seed(14)), 2, 4)
    refit, bias = refit_target(w0, mask, stats_of(x), 0.01, b0)
    centred = x - x.mean(0)
    lam = 0.01 * (centred.t() @ centred).diagonal().mean().item()
    for r in range(6):
        weights, intercept = lstsq_row_with_intercept(x, w0[r], b0[r].item(), mask[r], lam)
        assert torch.allclose(refit[r, mask[r]], weights, atol=1e-8), r
        assert abs(bias[r].item() - intercept) < 1e-7, r


def test_centred_gram_and_mean_shift_bias() -> None:
    x = correlated_inputs(50, 8, seed=15)
    centred = x - x.mean(0)
    assert torch.allclose(centred_gram(x.t() @ x, x.sum(0), 50), centred.t() @ centred)
    w0 = torch.randn(3, 8, dtype=torch.float64)
    kept = torch.arange(8) % 2 == 0
    bias = torch.zeros(3, dtype=torch.float64)
    flap = bias + w0[:, ~kept] @ x.mean(0)[~kept]  # FLAP's compensation of the pruned inputs
    assert torch.allclose(mean_shift_bias(bias, x.mean(0), w0, w0 * kept), flap)


@pytest.mark.parametrize("structured", [False, True])
def test_refit_strictly_lowers_the_output_error_on_calibration_data(structured) -> None:
    x = correlated_inputs(500, 32, seed=16)
    w0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    if structured:
        mask = (torch.arange(32) % 8 < 4).expand(16, -1)
    else:
        mask = nm_topn_mask(w0.abs(), 2, 4)
    refit = refit_rows(w0, x.t() @ x, mask, 0.01)
    dense = x @ w0.t()
    masked_error = (dense - x @ (w0 * mask).t()).pow(2).sum(0)
    refit_error = (dense - x @ refit.t()).pow(2).sum(0)
    assert (refit_error < masked_error).all()  # every output row


def test_bad_shapes_and_damping_are_refused() -> None:
    gram = torch.eye(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not fit"):
        refit_rows(torch.ones(2, 8), gram, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not fit"):
        refit_columns(torch.ones(2, 8), gram, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="damping"):
        refit_rows(torch.ones(2, 8), gram, torch.ones(2, 8, dtype=torch.bool), -1.0)
    singular = torch.zeros(8, 8, dtype=torch.float64)
    singular[0, 0] = 1.0  # inputs only in column 0: undamped, the other columns are free
    with pytest.raises(ValueError, match="not positive definite"):
        refit_columns(torch.ones(2, 8), singular, torch.ones(8, dtype=torch.bool), 0.0)


# -- the layer-wise flow on tiny real models -------------------------------------------------
def random_batches(vocab: int, count: int = 4, length: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, vocab, (2, length), generator=generator)}
        for _ in range(count)
    ]


def inputs_of(module: PruningModule, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Inputs of the named modules in full forwards of the model as it is, ``[tokens, in]``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        module.model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            module.model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def build(path: str, family) -> PruningModule:
    solver = MinimaxSolver() if isinstance(family, UniformStructuredFamily) else ProximalSolver()
    module = PruningModule(family, solver, model=path)
    module.configure_model()
    return module


def magnitude_nm(module: PruningModule) -> dict[str, torch.Tensor]:
    """Warm start the N:M family from magnitude masks (storage orientation)."""
    family = module.mask_family
    masks = {}
    for name, p in family.parametrizations().items():
        w0 = family.originals()[name]
        masks[name] = p.rows(nm_topn_mask(p.rows(w0).abs(), 2, 4))
    family.apply_initial_masks(masks)
    return masks


def direct_refit(module: PruningModule, batches, damping: float) -> dict[str, torch.Tensor]:
    """The refit without the layer-wise machinery: for each layer in turn, full-model forwards
    with the earlier layers refit and masked and the later layers dense; rows ``[out, in]``."""
    family = module.mask_family
    originals = {n: w.detach().clone() for n, w in family.originals().items()}
    hard = {n: p.hard_mask().clone() for n, p in family.parametrizations().items()}
    masks = {n: torch.ones_like(m) for n, m in hard.items()}
    layers = sorted({int(n.split(".")[2]) for n in hard})
    refits = {}
    try:
        for index in layers:
            family.use_masks(masks)  # layers < index refit and masked, the rest dense
            names = [n for n in hard if n.startswith(f"model.layers.{index}.")]
            inputs = inputs_of(module, names, batches)
            for name in names:
                x = inputs[name]
                refits[name] = refit_rows(originals[name].double(), x.t() @ x, hard[name], damping)
            family.apply_weights({n: refits[n] for n in names})
            masks.update({n: hard[n] for n in names})
    finally:
        family.apply_weights(originals)
        family.updated_weights = set()
        family.set_mode("learn")
    return refits


def test_layerwise_refit_equals_whole_model_forwards(tiny_models) -> None:
    module = build(tiny_models["llama"], NMMaskFamily(2, 4))
    magnitude_nm(module)
    batches = random_batches(module.model.config.vocab_size)
    update = compute_refit(module.model, module.mask_family, batches, 0.01, progress=False)
    assert update.biases == {}  # Llama's Linears have no bias
    direct = direct_refit(module, batches, 0.01)
    assert set(update.weights) == set(direct) and len(direct) == 14
    for name, weight in update.weights.items():
        assert torch.allclose(weight.double(), direct[name], atol=1e-4, rtol=1e-4), name
        assert torch.equal(weight != 0, update.masks[name]), name


def test_refit_on_gpt2_conv1d_nm_fits_the_biases(tiny_models) -> None:
    module = build(tiny_models["gpt2"], NMMaskFamily(2, 4))
    magnitude_nm(module)
    family = module.mask_family
    batches = random_batches(module.model.config.vocab_size)
    update = compute_refit(module.model, family, batches, 0.01, progress=False)
    assert set(update.biases) == set(family.targets())  # every GPT-2 Conv1D has a bias
    name = "transformer.h.0.attn.c_attn"  # layer 0 sees the dense model's inputs
    family.set_mode("off")
    x = inputs_of(module, [name], batches)[name]
    w0 = family.originals()[name].double().t()  # Conv1D [in, out] -> [out, in]
    b0 = family.targets()[name].bias.double()
    rows, bias = refit_target(w0, update.masks[name].t(), stats_of(x), 0.01, b0)
    assert torch.allclose(update.weights[name].double().t(), rows, atol=1e-5, rtol=1e-4)
    assert torch.allclose(update.biases[name].double(), bias, atol=1e-5, rtol=1e-4)
    assert is_nm(update.weights[name].t(), 2, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_structured_refit_beats_the_masked_weights_and_flap(tiny_models, arch) -> None:
    family = UniformStructuredFamily(
        keep_channels=0.5, keep_heads=1.0 if arch == "gpt2" else 0.5, gate="sigmoid_topk"
    )
    module = build(tiny_models[arch], family)
    targets = family.targets()
    with torch.no_grad():  # random gates, and (GPT-2) biases that count
        generator = torch.Generator().manual_seed(1)
        for kind in family.kinds():
            for gate in family.gates(kind):
                gate.logits.copy_(torch.randn(gate.units, generator=generator))
        for target in targets.values():
            if target.bias is not None:
                target.bias.copy_(torch.randn(target.bias.shape, generator=generator))
    batches = random_batches(module.model.config.vocab_size)
    update = compute_refit(module.model, family, batches, 0.01, progress=False)
    assert set(update.weights) == set(targets)  # the output projections
    assert bool(update.biases) == (arch == "gpt2")
    family.set_mode("off")
    layer0 = [n for n in targets if ".0." in n]
    inputs = inputs_of(module, layer0, batches)  # layer 0 sees the dense model's inputs
    for name in layer0:
        transposed = family.parametrizations()[name].transposed
        orient = (lambda t: t.t()) if transposed else (lambda t: t)
        w0, x = orient(family.originals()[name].double()), inputs[name]
        kept = orient(update.masks[name]).any(0)  # per input column
        b0 = targets[name].bias.double() if targets[name].bias is not None else 0.0
        dense = x @ w0.t() + b0
        masked = x @ (w0 * kept).t() + b0
        refit_bias = update.biases[name].double() if name in update.biases else b0
        refit = x @ orient(update.weights[name].double()).t() + refit_bias
        error = {k: (dense - v).pow(2).sum().item() for k, v in (("m", masked), ("r", refit))}
        assert error["r"] < error["m"], name
        if arch == "gpt2":  # FLAP's compensation is the intercept alone: the refit beats it
            flap = masked + w0[:, ~kept] @ x[:, ~kept].mean(0)
            assert error["r"] < (dense - flap).pow(2).sum().item(), name
    family.set_mode("learn")


def test_replaced_weights_are_refused(tiny_models) -> None:
    module = build(tiny_models["llama"], NMMaskFamily(2, 4))
    family = module.mask_family
    name = next(iter(family.targets()))
    family.apply_weights({name: family.originals()[name].detach().clone()})
    with pytest.raises(ConfigError, match="update_weights: false"):
        compute_refit(module.model, family, random_batches(100), progress=False)
    with pytest.raises(ConfigError, match="refit.damping"):
        compute_refit(module.model, family, random_batches(100), -0.1, progress=False)


# -- the callback: options, strategies ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"damping": -1.0}, "WeightRefit.damping"),
        ({"damping": float("nan")}, "WeightRefit.damping"),
        ({"damping": "0.1"}, "WeightRefit.damping"),
        ({"fit_bias": "yes"}, "WeightRefit.fit_bias"),
        ({"max_batches": 0}, "WeightRefit.max_batches"),
        ({"min_tokens": 0}, "WeightRefit.min_tokens"),
        ({"filename": "a/b.ckpt"}, "WeightRefit.filename"),
    ],
)
def test_bad_callback_options_name_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        WeightRefit(**kwargs)


def test_fsdp_is_refused_with_the_alternative() -> None:
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False
    )
    with pytest.raises(ConfigError, match="DDP"):
        WeightRefit().setup(trainer, None, "fit")
    WeightRefit().setup(trainer, None, "validate")  # only fit runs the refit


# -- through the CLI: fit with refit, export, reload with plain transformers -------------------
def write_corpus(folder: Path) -> Path:
    """A small local text: random sentences over a small vocabulary (calibration + held out)."""
    words = (
        "the river city north old music season paper light stone field early house water "
        "king war small great people time year first church south school"
    ).split()
    generator = torch.Generator().manual_seed(0)
    text = folder / "calibration.txt"
    text.write_text(
        "\n\n".join(
            " ".join(words[i] for i in torch.randint(0, len(words), (200,), generator=generator))
            for _ in range(40)
        )
    )
    return text


def restored(model: str, ckpt: Path, refit: bool = True) -> PruningModule:
    """A fresh module with ``ckpt``'s hard masks, on its refit weights or (``refit=False``) on
    the pretrained W0."""
    module = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), model=model)
    if refit:
        load_learned_state(module, ckpt)
    else:
        module.configure_model()
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        masks_only = {k: v for k, v in state.items() if not k.endswith(".original")}
        module.load_state_dict(masks_only, strict=False)
    module.mask_family.harden()
    return module


def heldout_kl(model: str, text: Path, pruned: torch.nn.Module) -> float:
    """Mean KL(dense || pruned) of the next-token distributions on the held-out windows (the
    truncated 2-layer model's own perplexity means nothing: its dense one is ~1e11)."""
    data = CalibrationDataModule(
        source=str(text), tokenizer=model, seq_len=64, num_samples=24, eval_tokens=512
    )
    windows = data.heldout_windows()
    dense = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=windows).logits.double(), -1)
        q = torch.log_softmax(pruned(input_ids=windows).logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def check_export(common: list[str], ckpt: Path, out: Path, model: str) -> torch.nn.Module:
    """Export ``ckpt``; the plain-transformers reload gives the refit masked model's logits and
    holds the 2:4 pattern. Returns the reloaded model."""
    main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={out}"])
    module = restored(model, ckpt)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    probe = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = module.model(input_ids=probe).logits
        got = reloaded(input_ids=probe).logits
    assert (got - expected).abs().max().item() < 1e-4
    for name in module.mask_family.targets():
        assert is_nm(reloaded.get_submodule(name).weight, 2, 4), name
    return reloaded


def test_oneshot_wanda_with_refit_exports_and_beats_wanda(small_model, tmp_path) -> None:
    text = write_corpus(tmp_path)
    common = ["--config", str(CONFIGS / "wanda_2of4_refit.yaml"), f"--model.model={small_model}"]
    data = [f"--data.source={text}", "--data.seq_len=64", "--data.eval_tokens=512"]
    main(["fit", *common, *data, "--data.num_samples=24", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])
    refit = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "refit.ckpt"
    state = torch.load(refit, map_location="cpu", weights_only=True)["state_dict"]
    assert sum(k.endswith(".original") for k in state) == 14  # every target's refit weight
    exported = check_export(common, refit, tmp_path / "export", small_model)
    wanda = restored(small_model, refit, refit=False).model  # the same mask on W0
    assert heldout_kl(small_model, text, exported) < heldout_kl(small_model, text, wanda)
    # evaluate reads the refit weights: the same mask on W0 (the wanda row) measures otherwise
    out = tmp_path / "eval.json"
    main(["evaluate", *common, *data, f"--ckpt_path={refit}", "--baselines=[wanda]",
          f"--output={out}"])
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    source = next(k for k in rows["wanda"] if k != "model")
    assert rows["learned (refit.ckpt)"][source] != rows["wanda"][source]


def test_proximal_with_refit_keeps_last_ckpt_and_lowers_the_loss(small_model, tmp_path) -> None:
    text = write_corpus(tmp_path)
    common = ["--config", str(CONFIGS / "proxsparse_2of4.yaml"), f"--model.model={small_model}"]
    data = [f"--data.source={text}", "--data.seq_len=64", "--data.eval_tokens=512"]
    main(["fit", *common, *data, "--data.num_samples=24", "--trainer.max_steps=3",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--trainer.callbacks+=lightning_prune.callbacks.WeightRefit"])
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last, refit = folder / "last.ckpt", folder / "refit.ckpt"
    last_state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    refit_state = torch.load(refit, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.endswith(".original") for k in last_state)  # the mask on W0
    assert sum(k.endswith(".original") for k in refit_state) == 14
    for key, value in last_state.items():  # same learned mask state in both
        assert torch.equal(refit_state[key], value), key
    exported = check_export(common, refit, tmp_path / "export", small_model)
    learned = restored(small_model, last).model  # last.ckpt: the learned mask on W0
    assert heldout_kl(small_model, text, exported) < heldout_kl(small_model, text, learned)


def test_ddp_refit_equals_one_device(tiny_models, tmp_path) -> None:
    """Two CPU ranks (gloo, the real console script) write the refit of one device."""
    text = write_corpus(tmp_path)
    script = Path(sys.executable).with_name("lightning-prune")
    args = ["fit", f"--config={CONFIGS / 'wanda_2of4_refit.yaml'}",
            f"--model.model={tiny_models['llama']}", f"--data.source={text}",
            "--data.seq_len=32", "--data.num_samples=8", "--data.eval_tokens=64",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    states = {}
    for label, extra in (("single", []), ("ddp", [f"--config={CONFIGS / 'ddp.yaml'}"])):
        root = tmp_path / label
        result = subprocess.run(
            [str(script), *args, f"--trainer.default_root_dir={root}", *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
            timeout=600, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "refit.ckpt"
        states[label] = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert states["single"].keys() == states["ddp"].keys()
    assert sum(k.endswith(".original") for k in states["ddp"]) == 14
    for key, value in states["single"].items():
        assert torch.allclose(states["ddp"][key], value, atol=1e-6), key
