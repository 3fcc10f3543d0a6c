"""Minimax (MaskPrune-style) uniform structured pruning: gate math, Lagrangian, family, solver."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_prune.adapters import ModelAdapter, adapter_for
from lightning_prune.data import CalibrationDataModule
from lightning_prune.errors import ConfigError
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.models import load_causal_lm
from lightning_prune.module import PruningModule
from lightning_prune.ops.hard_concrete import (
    expected_score,
    sample_hard_concrete,
    straight_through_topk,
    uniform_topk,
)
from lightning_prune.ops.lagrangian import (
    distill_kl,
    lagrangian_terms,
    project_to_budget,
    ramped_target,
)
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver


# -- pure tensor math ---------------------------------------------------------------------------
def test_expected_score_is_the_probability_of_a_nonzero_gate() -> None:
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    torch.manual_seed(0)
    samples = torch.stack([sample_hard_concrete(log_alpha) for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples == 0).any() and (samples == 1).any()  # the stretch makes exact 0/1 gates
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, expected_score(log_alpha), atol=0.015)
    reference = torch.sigmoid(log_alpha - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(expected_score(log_alpha), reference)


def test_uniform_topk_keeps_the_same_count_per_row_and_group() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    mask = uniform_topk(scores, 2)
    assert mask.sum(-1).tolist() == [2, 2]
    assert mask[0].nonzero().flatten().tolist() == [1, 3]
    grouped = uniform_topk(scores, 4, groups=2)  # two groups of 3: keep 2 in each
    assert grouped.reshape(2, 2, 3).sum(-1).tolist() == [[2, 2], [2, 2]]
    assert grouped[0].nonzero().flatten().tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError):
        uniform_topk(scores, 3, groups=2)


def test_straight_through_topk_forward_is_hard_backward_is_identity() -> None:
    scores = torch.tensor([0.2, 0.9, 0.5, 0.4], requires_grad=True)
    gates = straight_through_topk(scores, 2)
    assert gates.tolist() == [0.0, 1.0, 1.0, 0.0]
    (gates * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_lagrangian_gradients_descend_on_scores_and_ascend_on_multipliers() -> None:
    expected = torch.tensor([0.9, 0.5], requires_grad=True)
    y1 = torch.tensor([0.5, 0.5], requires_grad=True)
    y2 = torch.tensor([2.0, 2.0], requires_grad=True)
    terms = lagrangian_terms(expected, 0.6, y1, y2)
    assert torch.allclose(terms, torch.tensor([0.5 * 0.3 + 2 * 0.09, -0.05 + 2 * 0.01]))
    terms.sum().backward()
    assert torch.allclose(y1.grad, torch.tensor([0.3, -0.1]))  # ascent raises y1 when over
    assert torch.allclose(y2.grad, torch.tensor([0.09, 0.01]))
    assert torch.allclose(expected.grad, torch.tensor([0.5 + 4 * 0.3, 0.5 - 4 * 0.1]))
    assert ramped_target(0.6, 0.0) == 1.0 and ramped_target(0.6, 0.5) == pytest.approx(0.8)
    assert ramped_target(0.6, 3.0) == pytest.approx(0.6)


def test_project_to_budget_is_the_closest_feasible_point() -> None:
    generator = torch.Generator().manual_seed(0)
    costs, lower, upper = torch.tensor([3.0, 1.0, 2.0]), torch.full((3,), 0.1), torch.ones(3)
    total = 3.0
    for _ in range(5):
        point = torch.rand(3, generator=generator) * 1.4 - 0.2
        projected = project_to_budget(point, costs, total, lower, upper)
        assert float((costs * projected.float()).sum()) == pytest.approx(total, abs=1e-6)
        assert (projected >= lower - 1e-9).all() and (projected <= upper + 1e-9).all()
        best = (projected.float() - point).norm()
        # random feasible points on a grid of the budget plane are never closer
        for a, b in itertools.product(torch.linspace(0.1, 1, 10), repeat=2):
            c = (total - costs[0] * a - costs[1] * b) / costs[2]
            if lower[2] <= c <= upper[2]:
                other = torch.stack([a, b, c])
                assert best <= (other - point).norm() + 1e-5
    with pytest.raises(ValueError):
        project_to_budget(torch.ones(3), costs, 0.1, lower, upper)


def test_distill_kl_is_zero_for_the_teacher_and_positive_otherwise() -> None:
    teacher = torch.randn(2, 5, 11)
    assert distill_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(teacher + torch.randn(2, 5, 11), teacher).item() > 0


# -- the mask family on tiny models ---------------------------------------------------------------
def attached(path: str, **kwargs) -> tuple[torch.nn.Module, UniformStructuredFamily]:
    model = load_causal_lm(path)
    family = UniformStructuredFamily(**kwargs)
    family.attach(model, adapter_for(model))
    return model, family


@pytest.mark.parametrize(
    ("arch", "gqa", "shape"),
    [
        ("llama", "kv_group", {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}),
        ("llama", "query", {"num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64}),
        ("gemma3_text", "query", {"num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64}),
    ],
)
def test_gqa_options_give_uniform_valid_layouts(tiny_models, arch, gqa, shape) -> None:
    model, family = attached(tiny_models[arch], keep_heads=0.5, keep_channels=0.5, gqa=gqa)
    for gate in family.gates("heads"):  # random scores: the mask is not trivially the first k
        gate.logits.data = torch.randn(gate.units)
    assert family.exported_shape() == shape
    tokens = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        dense = family.originals()["model.layers.0.self_attn.o_proj"].clone()
        family.harden()
        for layout in family.layer_layouts():
            assert len(layout["heads"]) == shape["num_heads"]
            assert len(layout["kv_heads"]) == shape["num_kv_heads"]
            assert len(layout["channels"]) == shape["intermediate_size"]
            kv_of_head = layout["heads"] // 2  # 4 heads over 2 KV heads in the tiny configs
            assert set(kv_of_head.tolist()) == set(layout["kv_heads"].tolist())
        masked = model.model.layers[0].self_attn.o_proj.weight
        kept = family.layer_layouts()[0]["heads"]
        columns = masked.reshape(masked.shape[0], 4, 16).abs().sum((0, 2)) > 0
        assert columns.nonzero().flatten().tolist() == kept.tolist()
        family.set_mode("off")
        assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, dense)
        model(input_ids=tokens)


def test_gpt2_prunes_channels_and_refuses_heads(tiny_models) -> None:
    _, family = attached(tiny_models["gpt2"], keep_channels=0.5)
    assert family.kinds() == ["channels"]
    assert family.exported_shape()["intermediate_size"] == 128
    with pytest.raises(ConfigError, match="head_dim from n_embd"):
        attached(tiny_models["gpt2"], keep_heads=0.5)


def mha_llama(tmp_path, kv: int) -> str:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv,
        vocab_size=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_heads": 0.1}, "leaves 0 KV groups"),
        ({"keep_channels": 0.001}, "leaves 0 MLP channels"),
        ({"budget": 0.97}, "would leave zero heads or channels"),
    ],
)
def test_targets_that_leave_nothing_are_refused(tiny_models, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        attached(tiny_models["llama"], **kwargs)


@pytest.mark.parametrize("budget", [0.0, 1.0, 1.5, -0.2])
def test_budget_outside_open_unit_interval_is_refused(budget) -> None:
    with pytest.raises(ConfigError, match=r"budget: expected a share in \(0, 1\)"):
        UniformStructuredFamily(budget=budget)


def test_impossible_gqa_options_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="one query head per KV head"):
        attached(mha_llama(tmp_path / "mha", kv=4), keep_heads=0.5, gqa="query")
    with pytest.raises(ConfigError, match="single KV head"):
        attached(mha_llama(tmp_path / "mqa", kv=1), keep_heads=0.5, gqa="kv_group")


def test_architecture_without_structured_support_is_named(tiny_models) -> None:
    class NoStructure(ModelAdapter):
        layers_path = "model.layers"
        linear_names = ("mlp.down_proj",)

    model = load_causal_lm(tiny_models["llama"])
    with pytest.raises(ConfigError, match="model_type 'llama'.*structured_spec"):
        UniformStructuredFamily(keep_channels=0.5).attach(model, NoStructure())


def test_budget_mode_learns_targets_on_the_budget(tiny_models) -> None:
    _, family = attached(tiny_models["llama"], budget=0.3, channel_multiple=8)
    (targets,) = family.target_parameters()
    costs, _, _ = family._budget_box()
    spent = float((costs * targets.detach().double()).sum())
    assert spent == pytest.approx(family._remaining(), rel=1e-6)
    with torch.no_grad():
        targets.add_(torch.tensor([0.2, -0.05]))  # a gradient step moves them off the budget
    family.project_targets()
    assert float((costs * targets.detach().double()).sum()) == pytest.approx(
        family._remaining(), rel=1e-6
    )
    counts = family.kept_counts()
    fixed, total = family._budget_terms
    kinds = family._kinds
    kept = fixed + sum(counts[k] * family.num_layers * kinds[k].unit_params for k in counts)
    step = family.num_layers * kinds["channels"].unit_params * 8
    assert abs((1 - kept / total) - 0.3) * total <= step  # rounding costs at most one step


# -- the solver -----------------------------------------------------------------------------------
def test_solver_needs_the_structured_family_and_the_lagrangian(tiny_models) -> None:
    module = PruningModule(NMMaskFamily(), MinimaxSolver(), [UniformLagrangian()])
    with pytest.raises(ConfigError, match="uniform_structured"):
        module.solver.configure_optimizers(module)
    module = PruningModule(
        UniformStructuredFamily(keep_channels=0.5), MinimaxSolver(), [], tiny_models["llama"]
    )
    module.configure_model()
    with pytest.raises(ConfigError, match="uniform_lagrangian"):
        module.solver.configure_optimizers(module)


def test_distillation_teacher_is_the_same_model_with_masks_off(tiny_models) -> None:
    torch.manual_seed(0)
    solver = MinimaxSolver(distill_weight=1.0)
    family = UniformStructuredFamily(keep_heads=0.5, keep_channels=0.5)
    module = PruningModule(family, solver, [UniformLagrangian()], tiny_models["llama"])
    module.configure_model()
    tokens = torch.randint(0, 1000, (1, 16))
    family.set_mode("off")
    terms = solver.loss_terms(module, {"input_ids": tokens}, module(tokens))
    assert terms["distill"].item() == pytest.approx(0.0, abs=1e-6)
    for gate in family.gates("heads"):
        gate.logits.data.fill_(-0.5)  # mostly closed gates: the student differs
    family.set_mode("learn")
    terms = solver.loss_terms(module, {"input_ids": tokens}, module(tokens))
    assert terms["distill"].item() > 1e-4
    terms["distill"].backward()
    grads = [g.logits.grad for g in family.gates("heads") if g.logits.grad is not None]
    assert sum(g.abs().sum() for g in grads) > 0
    assert family.gates("heads")[0].mode == "learn"  # restored after the teacher pass


@pytest.mark.parametrize("gate", ["hard_concrete", "sigmoid_topk"])
def test_minimax_drives_every_layer_to_the_shared_target(tiny_models, gate) -> None:
    seed_everything(0)
    path = tiny_models["llama"]
    family = UniformStructuredFamily(keep_heads=0.5, keep_channels=0.5, gate=gate)
    solver = MinimaxSolver(lr=0.3, lr_multipliers=0.05, warmup_ratio=0.3)
    module = PruningModule(family, solver, [UniformLagrangian()], model=path)
    data = CalibrationDataModule(tokenizer=path, seq_len=32, num_samples=100, eval_tokens=256)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert family.progress == 1.0
    for kind in ("heads", "channels"):
        expected = family.expected_kept(kind).detach()
        assert (expected - 0.5).abs().max() < 0.16, (kind, expected)  # started at ~0.97
        y1, _ = family.multipliers(kind)
        assert y1.abs().max() > 0.1  # the multipliers moved (up while over target, then back)
    family.harden()
    assert family.exported_shape() == {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
