"""One-shot baselines plugin (lightning-prune-baselines): each method against a direct computation,
warm starts, the oneshot solver through the real CLI, FLAP's bias compensation (checkpoint,
evaluate, export; Llama skips it), and bad input."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_prune.checkpoints import load_learned_state
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.masks.init import build_initializer, one_shot_applied
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.ops.hard_concrete import uniform_topk
from lightning_prune.ops.nm_prox import is_nm, nm_topn_mask
from lightning_prune.registry import PluginError
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver

pytest.importorskip("lightning_prune_baselines")

from lightning_prune_baselines.ops import sparsegpt  # noqa: E402

WANDA_CONFIG = Path(__file__).parents[1] / "configs" / "wanda_2of4.yaml"


def build(path: str, family) -> PruningModule:
    solver = MinimaxSolver() if isinstance(family, UniformStructuredFamily) else ProximalSolver()
    module = PruningModule(family, solver, model=path)
    module.configure_model()
    return module


def random_batches(vocab: int, count: int = 3, length: int = 24) -> list[dict]:
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


def dense_inputs(module: PruningModule, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Inputs of the named modules in a dense forward (masks off), ``[tokens, in]``."""
    module.mask_family.set_mode("off")
    return inputs_of(module, names, batches)


def write_corpus(folder: Path) -> Path:
    """A small local calibration text (no tokenizing of Wikipedia)."""
    words = "the river city north old music season paper light stone field early".split()
    generator = torch.Generator().manual_seed(0)
    text = folder / "calibration.txt"
    text.write_text("\n\n".join(
        " ".join(words[i] for i in torch.randint(0, len(words), (80,), generator=generator))
        for _ in range(20)
    ))
    return text


@pytest.fixture(scope="module")
def llama_nm(tiny_models):
    module = build(tiny_models["llama"], NMMaskFamily(2, 4))
    return module, random_batches(module.model.config.vocab_size)


# -- Wanda ---------------------------------------------------------------------------------------
def test_wanda_matches_scores_computed_by_hand(llama_nm) -> None:
    module, batches = llama_nm
    masks = build_initializer("wanda").compute(module.model, module.mask_family, batches)
    layer0 = [n for n in masks if n.startswith("model.layers.0.")]
    inputs = dense_inputs(module, layer0, batches)  # layer 0 sees the dense model's inputs
    for name in layer0:
        weight = module.mask_family.originals()[name].double()
        scores = weight.abs() * inputs[name].pow(2).sum(0).sqrt()[None, :]
        assert torch.equal(masks[name], nm_topn_mask(scores, 2, 4)), name
    for name, mask in masks.items():
        assert is_nm(mask.float(), 2, 4) and mask.float().mean() == 0.5, name


def test_wanda_on_gpt2_conv1d_groups_run_along_the_input_dim(tiny_models) -> None:
    module = build(tiny_models["gpt2"], NMMaskFamily(2, 4))
    batches = random_batches(module.model.config.vocab_size)
    masks = build_initializer("wanda").compute(module.model, module.mask_family, batches)
    name = "transformer.h.0.mlp.c_fc"  # Conv1D: weight stored [in, out]
    weight = module.mask_family.originals()[name].double()
    x = dense_inputs(module, [name], batches)[name]
    scores = weight.abs().t() * x.pow(2).sum(0).sqrt()[None, :]  # [out, in]
    assert masks[name].shape == weight.shape
    assert torch.equal(masks[name].t(), nm_topn_mask(scores, 2, 4))
    module.mask_family.apply_initial_masks(masks)
    module.mask_family.harden()  # the family's own N:M check passes


def test_wanda_unstructured_sparsity_removes_that_share_of_every_row(llama_nm) -> None:
    module, batches = llama_nm
    wanda = build_initializer({"class_path": "wanda", "init_args": {"sparsity": 0.25}})
    masks = wanda.compute(module.model, module.mask_family, batches)
    rows = masks["model.layers.1.mlp.down_proj"]
    assert torch.all(rows.sum(1) == round(0.75 * rows.shape[1]))


# -- SparseGPT -----------------------------------------------------------------------------------
def _problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 32, generator=generator)
    x = torch.randn(512, 32, generator=generator) @ mix  # correlated inputs
    weight = torch.randn(16, 32, generator=generator)
    return weight, x


def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction() -> None:
    weight, x = _problem()
    mask, updated, used = sparsegpt(weight, x.t() @ x, 2, 4, blocksize=8)
    assert used == 0.01 and is_nm(updated, 2, 4) and torch.equal(updated != 0, mask)

    def error(w: torch.Tensor) -> float:
        return float((x @ weight.t() - x @ w.t()).norm())

    magnitude = weight * nm_topn_mask(weight, 2, 4)
    wanda = weight * nm_topn_mask(weight.abs() * x.norm(dim=0)[None, :], 2, 4)
    assert error(updated) < 0.9 * min(error(magnitude), error(wanda))
    unstructured, values, _ = sparsegpt(weight, x.t() @ x, sparsity=0.5, blocksize=8)
    assert abs(unstructured.float().mean().item() - 0.5) < 0.02
    assert error(values) < error(weight * (weight.abs() >= weight.abs().median()))


def test_sparsegpt_first_column_matches_the_obs_formula() -> None:
    """With a block of one group, the kept weights of later columns move by the OBS update."""
    weight, x = _problem(1)
    h = (x.t() @ x).double()
    mask, updated, _ = sparsegpt(weight, h, 3, 4, blocksize=4, percdamp=0.0)
    hinv = torch.linalg.inv(h)
    w = weight.double()
    # first group: saliency w^2 / [chol(H^-1)]_jj^2, upper factor's diagonal
    upper = torch.linalg.cholesky(hinv, upper=True)
    diag = upper.diagonal()[:4]
    drop = (w[:, :4].pow(2) / diag.pow(2)).argmin(1)
    assert torch.equal(~mask[:, :4], torch.nn.functional.one_hot(drop, 4).bool())
    # rows that prune column 0: the later columns of the group move by the OBS update
    # delta_j = -w_0 [H^-1]_0j / [H^-1]_00 (nothing else touches them afterwards)
    rows = (drop == 0).nonzero().flatten()
    assert rows.numel() > 0
    expected = w[rows, 1:4] - w[rows, :1] * (hinv[0, 1:4] / hinv[0, 0])[None, :]
    assert torch.allclose(updated[rows, 1:4].double(), expected, atol=1e-4)


def test_sparsegpt_update_weights_and_mask_only(llama_nm) -> None:
    module, batches = llama_nm
    family = module.mask_family
    update = build_initializer("sparsegpt").compute_update(module.model, family, batches)
    masks, weights = update.masks, update.weights
    name = "model.layers.1.self_attn.o_proj"
    assert is_nm(weights[name], 2, 4) and torch.equal(weights[name] != 0, masks[name])
    original = family.originals()[name]
    assert not torch.allclose(weights[name], original * masks[name])  # values were updated
    keep = build_initializer({"class_path": "sparsegpt", "init_args": {"update_weights": False}})
    masks_only = keep.compute_update(module.model, family, batches)
    assert masks_only.weights == {} and is_nm(masks_only.masks[name].float(), 2, 4)


def test_singular_hessian_raises_damping_and_says_so() -> None:
    weight, x = _problem()
    few = x[:3]  # rank 3 Hessian of a 32-wide input: singular without damping
    with pytest.warns(UserWarning, match="raised damping to percdamp=0.01"):
        mask, updated, used = sparsegpt(weight, few.t() @ few, 2, 4, blocksize=8, percdamp=0.0)
    assert used == 0.01 and is_nm(updated, 2, 4)
    with pytest.raises(ConfigError, match="singular"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparsegpt(weight, torch.zeros(32, 32) - 1, 2, 4, percdamp=0.0, max_percdamp=0.1)


# -- structured ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_structured(tiny_models):
    family = UniformStructuredFamily(keep_heads=0.5, keep_channels=0.5, gate="sigmoid_topk")
    module = build(tiny_models["llama"], family)
    return module, random_batches(module.model.config.vocab_size)


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_structured_scores_match_direct_computation(llama_structured, method) -> None:
    module, batches = llama_structured
    family = module.mask_family
    masks = build_initializer(method).compute(module.model, family, batches)
    counts = family.kept_counts()
    names = {"heads": "model.layers.0.self_attn.o_proj", "channels": "model.layers.0.mlp.down_proj"}
    inputs = dense_inputs(module, list(names.values()), batches)
    for kind, name in names.items():
        weight = family.originals()[name].double()
        x = inputs[name]
        if method == "wanda_sp":
            columns = (weight.abs() * x.norm(dim=0)[None, :]).sum(0)
        else:
            columns = x.var(0) * weight.pow(2).sum(0)
        gate = family.gates(kind)[0]
        unit = uniform_topk(columns.reshape(gate.units, -1).sum(-1), counts[kind], gate.groups)
        assert torch.equal(masks[name], gate.expand(unit).expand(gate.weight_shape)), kind
    for kind in family.kinds():  # uniform: the same count in every layer
        for name in family.gate_names(kind):
            gate = family.gates(kind)[0]
            kept = masks[name].any(0).reshape(gate.units, -1).any(-1).sum()
            assert int(kept) == counts[kind]


def test_structured_warm_start_sets_minimax_scores(llama_structured) -> None:
    module, batches = llama_structured
    family = module.mask_family
    masks = build_initializer("magnitude_structured").compute(module.model, family)
    assert masks.keys() == family.magnitude_masks().keys()
    wanda_sp = build_initializer("wanda_sp").compute(module.model, family, batches)
    family.apply_initial_masks(wanda_sp)
    family.harden()  # the final mask of the warm-started logits is the one-shot mask
    for name, parametrization in family.parametrizations().items():
        assert torch.equal(parametrization.hard_mask(), wanda_sp[name]), name
    family.set_mode("learn")


# -- bad input -----------------------------------------------------------------------------------
def test_methods_refuse_the_wrong_family(llama_nm, llama_structured) -> None:
    nm_module, batches = llama_nm
    structured_module, _ = llama_structured
    for method in ("wanda_sp", "flap", "magnitude_structured"):
        with pytest.raises(ConfigError, match="uniform_structured mask family"):
            build_initializer(method).compute(nm_module.model, nm_module.mask_family, batches)
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ConfigError, match="needs the nm mask family"):
            build_initializer(method).compute(
                structured_module.model, structured_module.mask_family, batches
            )


def test_unknown_method_and_options_are_named() -> None:
    with pytest.raises(PluginError, match=r"expected one of \[.*flap.*sparsegpt.*wanda"):
        build_initializer("obs")
    with pytest.raises(ConfigError, match="init_mask 'wanda'"):
        build_initializer({"class_path": "wanda", "init_args": {"percdamp": 0.1}})


def test_short_or_missing_calibration_data_is_refused(llama_nm) -> None:
    module, batches = llama_nm
    family = module.mask_family
    family.set_mode("learn")
    short = build_initializer({"class_path": "sparsegpt", "init_args": {"min_tokens": 1000}})
    with pytest.raises(ConfigError, match="holds 144 tokens, the method needs at least 1000"):
        short.compute(module.model, family, batches)
    with pytest.raises(ConfigError, match="needs calibration batches"):
        build_initializer("wanda").compute(module.model, family, None)
    assert family.parametrizations()["model.layers.0.mlp.up_proj"].mode == "learn"


# -- one-shot run through the CLI ----------------------------------------------------------------
def test_oneshot_sparsegpt_fit_then_export(tiny_models, tmp_path) -> None:
    text = write_corpus(tmp_path)
    spec = "--model.init_mask={class_path: sparsegpt, init_args: {blocksize: 32}}"
    model = tiny_models["llama"]  # random weights: no exact zeros to tie with pruned ones
    common = ["--config", str(WANDA_CONFIG), f"--model.model={model}", spec]
    main(["fit", *common, "--data.seq_len=32", "--data.num_samples=4", f"--data.source={text}",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 0  # Solver.trains is False: the fit took no step
    state = checkpoint["state_dict"]
    assert sum(k.endswith(".original") for k in state) == 14  # SparseGPT's updated weights
    out = tmp_path / "export"
    main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={out}"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    key = "model.model.layers.1.mlp.down_proj.parametrizations.weight.original"
    exported = reloaded.model.layers[1].mlp.down_proj.weight
    assert is_nm(exported, 2, 4) and torch.allclose(exported, state[key], atol=1e-6)
    original = AutoModelForCausalLM.from_pretrained(model).model.layers[1].mlp.down_proj
    assert not torch.allclose(exported, original.weight * (exported != 0))  # updated values


# -- FLAP bias compensation ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(tiny_models):
    family = UniformStructuredFamily(keep_channels=0.5, gate="sigmoid_topk")  # no heads: GPT-2
    module = build(tiny_models["gpt2"], family)
    with torch.no_grad():  # GPT-2 starts with zero biases: make them count
        generator = torch.Generator().manual_seed(1)
        for target in module.mask_family.targets().values():
            target.bias.copy_(torch.randn(target.bias.shape, generator=generator))
    return module, random_batches(module.model.config.vocab_size)


def rows(weight: torch.Tensor) -> torch.Tensor:
    """GPT-2 ``Conv1D`` storage ``[in, out]`` as ``[out, in]``."""
    return weight.t().double()


def direct_flap(module: PruningModule, batches) -> tuple[dict, dict]:
    """FLAP without the layer-wise machinery: for every layer in turn, full-model forwards with
    the earlier layers' masks and compensated biases in place and the later layers dense."""
    family = module.mask_family
    originals = {n: w.detach().clone() for n, w in family.originals().items()}
    biases = {n: t.bias.detach().clone() for n, t in family.targets().items()}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in originals.items()}
    counts = family.kept_counts()
    new_biases = {}
    try:
        for index in range(family.num_layers):
            family.use_masks(masks)  # layers < index pruned, the rest all-ones
            names = {kind: family.gate_names(kind)[index] for kind in family.kinds()}
            inputs = inputs_of(module, list(names.values()), batches)
            for kind, name in names.items():
                weight, x = rows(originals[name]), inputs[name]
                gate = family.gates(kind)[index]
                columns = x.var(0) * weight.pow(2).sum(0)
                unit = uniform_topk(
                    columns.reshape(gate.units, -1).sum(-1).float(), counts[kind], gate.groups
                )
                masks[name] = gate.expand(unit).expand(gate.weight_shape).clone()
                pruned = ~unit.repeat_interleave(gate.unit_size)
                new_biases[name] = biases[name].double() + weight[:, pruned] @ x[:, pruned].mean(0)
            with torch.no_grad():
                for name in names.values():
                    family.targets()[name].bias.copy_(new_biases[name])
    finally:
        with torch.no_grad():
            for name, bias in biases.items():
                family.targets()[name].bias.copy_(bias)
        family.set_mode("learn")
    return masks, new_biases


# -- the compensated bias ------------------------------------------------------------------------
def test_first_layer_bias_equals_the_direct_formula(gpt2) -> None:
    module, batches = gpt2
    family = module.mask_family
    update = build_initializer("flap").compute_update(module.model, family, batches)
    assert set(update.biases) == set(family.targets())  # every c_proj has a bias
    layer0 = [n for n in update.biases if n.startswith("transformer.h.0.")]
    inputs = dense_inputs(module, layer0, batches)  # layer 0 sees the dense model's inputs
    family.set_mode("learn")
    for name in layer0:
        weight = rows(family.originals()[name])
        pruned = ~update.masks[name].any(1)  # Conv1D mask [in, out]: pruned input rows
        assert pruned.sum() == pruned.numel() // 2
        x = inputs[name]
        expected = family.targets()[name].bias.double() + weight[:, pruned] @ x[:, pruned].mean(0)
        assert torch.allclose(update.biases[name].double(), expected, atol=1e-5), name


def test_layerwise_calibration_equals_whole_model_forwards(gpt2) -> None:
    module, batches = gpt2
    family = module.mask_family
    update = build_initializer("flap").compute_update(module.model, family, batches)
    masks, biases = direct_flap(module, batches)
    for name in family.targets():
        assert torch.equal(update.masks[name], masks[name]), name
        assert torch.allclose(update.biases[name].double(), biases[name], atol=1e-5), name
    # compensation off: the same first-layer masks, no biases
    off = build_initializer({"class_path": "flap", "init_args": {"compensate_bias": False}})
    plain = off.compute_update(module.model, family, batches)
    assert plain.biases == {}
    name = family.gate_names("channels")[0]
    assert torch.equal(plain.masks[name], update.masks[name])


def test_compensation_lowers_the_output_error_on_calibration_data(gpt2) -> None:
    module, batches = gpt2
    family = module.mask_family
    update = build_initializer("flap").compute_update(module.model, family, batches)
    names = [n for n in update.biases if n.startswith("transformer.h.0.")]
    inputs = dense_inputs(module, names, batches)
    family.set_mode("learn")
    for name in names:
        weight, x = rows(family.originals()[name]), inputs[name]
        bias = family.targets()[name].bias.double()
        kept = update.masks[name].any(1)
        dense = x @ weight.t() + bias
        masked = x[:, kept] @ weight[:, kept].t()
        plain = (dense - masked - bias).pow(2).sum()
        compensated = (dense - masked - update.biases[name].double()).pow(2).sum()
        assert compensated < plain, name


def test_one_shot_applied_restores_weights_and_biases(gpt2) -> None:
    module, batches = gpt2
    family = module.mask_family
    update = build_initializer("flap").compute_update(module.model, family, batches)
    before = {n: t.bias.detach().clone() for n, t in family.targets().items()}
    with one_shot_applied(family, update):
        assert family.updated_biases == set(update.biases)
        for name, bias in update.biases.items():
            assert torch.equal(family.targets()[name].bias, bias)
    assert family.updated_biases == set()
    for name, bias in before.items():
        assert torch.equal(family.targets()[name].bias, bias)
    family.set_mode("learn")


# -- one-shot run, checkpoint, evaluate, export --------------------------------------------------
def test_oneshot_flap_checkpoint_export_and_evaluate_carry_the_biases(
    tiny_models, tmp_path, capsys
) -> None:
    model = tiny_models["gpt2"]
    generator = torch.Generator().manual_seed(0)
    text = write_corpus(tmp_path)
    family = (
        "--model.mask_family={class_path: uniform_structured, "
        "init_args: {keep_channels: 0.5, gate: sigmoid_topk}}"
    )
    common = ["--config", str(WANDA_CONFIG), f"--model.model={model}", family,
              "--model.init_mask=flap"]
    main(["fit", *common, "--data.seq_len=32", "--data.num_samples=4", f"--data.source={text}",
          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    bias_keys = sorted(k for k in state if k.endswith(".bias"))
    assert bias_keys == [f"model.transformer.h.{i}.mlp.c_proj.bias" for i in range(2)]
    dense = AutoModelForCausalLM.from_pretrained(model)
    changed = state["model.transformer.h.1.mlp.c_proj.bias"]
    assert not torch.allclose(changed, dense.transformer.h[1].mlp.c_proj.bias)

    # evaluate's path: a fresh module restores the biases with the masks
    restored = PruningModule(
        UniformStructuredFamily(keep_channels=0.5, gate="sigmoid_topk"),
        MinimaxSolver(),
        model=model,
    )
    load_learned_state(restored, ckpt)
    assert torch.equal(restored.model.transformer.h[1].mlp.c_proj.bias, changed)
    restored.mask_family.harden()
    probe = torch.randint(0, 1000, (2, 24), generator=generator)
    with torch.no_grad():
        masked = restored.model(input_ids=probe).logits

    out = tmp_path / "export"
    main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={out}"])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.n_inner == 128
    assert torch.equal(exported.transformer.h[1].mlp.c_proj.bias, changed)
    with torch.no_grad():
        got = exported(input_ids=probe).logits
    assert (got - masked).abs().max().item() < 1e-4

    # evaluate: the dense row is the dense model's although the checkpoint replaces biases
    data = [f"--data.source={text}", "--data.seq_len=32", "--data.eval_tokens=64"]
    records = {}
    for label, extra in (("dense", []), ("with_ckpt", [f"--ckpt_path={ckpt}"])):
        records[label] = tmp_path / f"{label}.json"
        main(["evaluate", *common, *data, *extra, f"--output={records[label]}"])
    rows = {k: json.loads(v.read_text())["rows"] for k, v in records.items()}
    dense_row, learned = rows["with_ckpt"]
    source = next(k for k in dense_row if k != "model")
    assert dense_row["model"] == "dense" and dense_row == rows["dense"][0]
    assert learned["model"].startswith("learned") and learned[source] != dense_row[source]
    with pytest.raises(SystemExit):  # refused before the dense row is measured
        main(["evaluate", *common, *data, f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
    assert "nope.ckpt' does not exist" in capsys.readouterr().err


def test_learned_solver_warm_started_from_flap_keeps_the_dense_biases(
    tiny_models, tmp_path, capsys
) -> None:
    from lightning.pytorch import Trainer

    from lightning_prune.data import CalibrationDataModule

    model = tiny_models["gpt2"]
    family = UniformStructuredFamily(keep_channels=0.5, gate="sigmoid_topk")
    module = PruningModule(
        family, MinimaxSolver(), [UniformLagrangian()], model=model, init_mask="flap"
    )
    data = CalibrationDataModule(
        source=str(write_corpus(tmp_path)), tokenizer=model, seq_len=32, num_samples=4
    )
    trainer = Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert "init_mask 'flap': bias compensation not applied" in capsys.readouterr().out
    dense = AutoModelForCausalLM.from_pretrained(model)
    for index, layer in enumerate(module.model.transformer.h):
        assert torch.equal(layer.mlp.c_proj.bias, dense.transformer.h[index].mlp.c_proj.bias)
    assert family.updated_biases == set()
    assert not any(k.endswith(".bias") for k in module.learned_state_keys())


# -- models without output biases ----------------------------------------------------------------
def test_llama_skips_compensation_with_a_log_line_or_refuses_when_required(
    tiny_models, caplog
) -> None:
    family = UniformStructuredFamily(keep_heads=0.5, keep_channels=0.5, gate="sigmoid_topk")
    module = build(tiny_models["llama"], family)
    batches = random_batches(module.model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="lightning_prune_baselines"):
        update = build_initializer("flap").compute_update(module.model, family, batches)
    assert update.biases == {} and set(update.masks) == set(family.targets())
    assert (
        "bias compensation skipped: model_type 'llama' has no bias on mlp.down_proj, "
        "self_attn.o_proj" in caplog.text
    )
    required = build_initializer({"class_path": "flap", "init_args": {"compensate_bias": True}})
    with pytest.raises(ConfigError, match=r"'flap'\.compensate_bias: model_type 'llama'"):
        required.compute_update(module.model, family, batches)
    with pytest.raises(ConfigError, match=r"apply_biases: 'model.layers.0.mlp.down_proj' has no"):
        family.apply_biases({"model.layers.0.mlp.down_proj": torch.zeros(64)})


def test_bad_compensation_input_is_named(gpt2) -> None:
    module, _ = gpt2
    family = module.mask_family
    with pytest.raises(ConfigError, match=r"'flap'\.compensate_bias: expected true, false or"):
        build_initializer({"class_path": "flap", "init_args": {"compensate_bias": "yes"}})
    with pytest.raises(ConfigError, match="apply_biases: 'lm_head' is not a target"):
        family.apply_biases({"lm_head": torch.zeros(64)})
    with pytest.raises(ConfigError, match=r"bias shape \(64,\), got \(3,\)"):
        family.apply_biases({"transformer.h.0.mlp.c_proj": torch.zeros(3)})
    assert family.updated_biases == set()
