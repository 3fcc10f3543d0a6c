"""``PruningModule``: a frozen Hugging Face causal LM plus learnable masks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.adapters import adapter_for
from lightning_prune.backends import (
    NoSharding,
    ShardingBackend,
    backend_class,
    backend_for,
    clean_name,
)
from lightning_prune.blockwise import BlockInputs, BlockwiseObjective, reconstruction_loss
from lightning_prune.checkpoint_format import (
    LAYOUT_KEY,
    RECORD_KEY,
    check_identity,
    check_learned_state,
    fingerprint_record,
    saved_record,
)
from lightning_prune.checkpoints import (
    check_resume_layout,
    check_sharded_strategy,
    is_sharded_checkpoint,
    read_checkpoint_header,
)
from lightning_prune.contracts import WeightedTerm, check_contracts
from lightning_prune.errors import ConfigError
from lightning_prune.identity import config_record, model_weights_digest
from lightning_prune.masks.base import MaskFamily, dtype_names
from lightning_prune.masks.init import build_initializer, initializer_name
from lightning_prune.models import load_causal_lm
from lightning_prune.models.sharded_loading import (
    build_on_meta,
    materialize_shards,
    safetensors_files,
)
from lightning_prune.registry import get_registry
from lightning_prune.regularizers.base import Regularizer
from lightning_prune.solvers.base import Solver


class PruningModule(LightningModule):
    """Learns a pruning mask for a frozen causal LM.

    The LM is loaded in ``configure_model`` (so strategies can shard it), every parameter is
    frozen, and the mask family attaches its learnable state to the target modules. The
    trainer's strategy picks a sharding backend there, once (:mod:`lightning_prune.backends`),
    which shards or wraps the LM and handles everything that depends on how it is distributed
    (whole groups for the prox, replicated gradients, clipping, the checkpoint layout).

    Args:
        model: embedded model name (``smollm2-135m``), local HF folder or hub id.
        mask_family: what may be removed (e.g. ``nm``).
        solver: how the mask is learned (e.g. ``proximal``).
        regularizers: terms of the objective (e.g. ``nm_sparsity``).
        init_mask: one-shot initializer plugin used as warm start: a name (e.g. ``magnitude``,
            ``wanda``) or ``{class_path: NAME, init_args: {...}}``; ``None`` starts from the
            pretrained weights. Applied when a trainer runs (``fit``/``validate``); export and
            evaluate take the state from the checkpoint.
        dtype: dtype the LM is loaded in (the learnable mask state is float32 whatever it is;
            see ``trainer.precision`` in docs/scaling.md).
        attn_implementation: HF attention implementation.
        objective: ``end_to_end`` (the LM loss of the whole masked model, the papers' method)
            or ``blockwise`` (decoder blocks learned one after another, each to reproduce its
            dense output; see :mod:`lightning_prune.blockwise`). ``blockwise`` needs
            ``trainer.max_steps`` = layers × ``steps_per_block``.
        steps_per_block: optimizer steps per decoder block (``blockwise`` only).
        block_inputs: inputs of each block while it learns (``blockwise`` only): ``pruned``
            (the blocks before it run with their final masks) or ``dense``.
        e2e_steps: optimizer steps of an end-to-end phase after the last block (``blockwise``
            only; 0: none): every block learns at once on the LM loss, from the block-wise
            masks. ``trainer.max_steps`` then adds them.
        block_cache_mb: MiB of cached block inputs held in memory in a block-wise fit; the
            rest spill to a temporary folder on disk.
        trust_remote_code: load a model folder that ships its own Python code (``auto_map``);
            such folders are refused unless this is set.
    """

    def __init__(
        self,
        mask_family: MaskFamily,
        solver: Solver,
        regularizers: list[Regularizer] | None = None,
        model: str = "smollm2-135m",
        init_mask: str | dict[str, Any] | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        objective: Literal["end_to_end", "blockwise"] = "end_to_end",
        steps_per_block: int = 20,
        block_inputs: BlockInputs = "pruned",
        e2e_steps: int = 0,
        block_cache_mb: float = 1024.0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if objective not in ("end_to_end", "blockwise"):
            raise ConfigError(
                f"model.objective: expected 'end_to_end' or 'blockwise', got {objective!r}"
            )
        if objective == "end_to_end" and e2e_steps:
            raise ConfigError(
                f"model.e2e_steps: an end-to-end phase follows a block-wise fit only; got "
                f"e2e_steps: {e2e_steps} with objective: end_to_end (set objective: blockwise, "
                "or e2e_steps: 0)"
            )
        self.blockwise = (
            BlockwiseObjective(steps_per_block, block_inputs, e2e_steps, block_cache_mb)
            if objective == "blockwise"
            else None
        )
        self._blocks: list[torch.nn.Module] = []
        self._block_names: list[list[str]] = []
        self._block_in_modes: int | None = None  # the block the mask modes are set for
        self.model_name, self.dtype_name = model, dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.mask_family, self.solver = mask_family, solver
        self.regularizers = list(regularizers or [])
        self.init_mask = init_mask
        if init_mask is not None:
            get_registry().info("initializers", initializer_name(init_mask))  # fail early
        self.model: torch.nn.Module | None = None
        #: how the LM and the mask state are distributed (chosen in ``configure_model``)
        self.backend: ShardingBackend = NoSharding()
        self.strict_loading = False  # checkpoints hold the learnable state only
        self.register_state_dict_post_hook(_keep_learned_state)

    # -- model ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        self.backend = backend = backend_for(strategy, self.device_mesh)
        # sharded loading: build on the meta device, load each rank's shards only (a one-shot
        # warm start calibrates on the whole model, so it loads the whole model on every rank
        # first; so does a mask family that cannot initialise its state from loaded shards)
        sharded_load = (
            backend.loads_shards
            and self.init_mask is None
            and type(self.mask_family).reset_state is not MaskFamily.reset_state
            and safetensors_files(self.model_name) is not None
        )
        if sharded_load:
            model = build_on_meta(
                self.model_name, self.dtype_name, self.attn_implementation, self.trust_remote_code
            )
        else:
            model = load_causal_lm(
                self.model_name, self.dtype_name, self.attn_implementation, self.trust_remote_code
            )
        model.requires_grad_(False)
        adapter = adapter_for(model)
        self.mask_family.attach(model, adapter)
        for regularizer in self.regularizers:
            regularizer.bind(self.mask_family)
        self.model = model
        if self.blockwise is not None:
            self._blocks = list(adapter.decoder_layers(model))
            targets = list(self.mask_family.targets())
            self._block_names = [
                [n for n in targets if n.startswith(f"{adapter.layers_path}.{i}.")]
                for i in range(len(self._blocks))
            ]
        if self.init_mask is not None and self._trainer is not None:
            self.apply_initializer(self.init_mask)  # same data on every rank: same masks
        self.model = backend.prepare(self, model, adapter)
        if sharded_load:
            materialize_shards(model, self.model_name, self.device_for_shards())
            self.mask_family.reset_state()

    def device_for_shards(self) -> torch.device:
        """Where this rank's shards live: the strategy's device (CPU without a trainer)."""
        if self._trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def apply_initializer(self, name: str | dict[str, Any]) -> None:
        """Warm-start the mask family from a one-shot initializer plugin (name or spec).

        Weights the initializer updates (SparseGPT) replace W0 through
        ``MaskFamily.apply_weights``, and biases it compensates (FLAP) replace the output
        biases through ``MaskFamily.apply_biases``; checkpoints save both. Biases are applied
        only when the solver ships the initial mask (``Solver.ships_init_mask``, e.g.
        ``oneshot``): a compensation for one mask is wrong for the mask a solver learns.
        """
        initializer = build_initializer(name)
        label = initializer_name(name)
        batches = None
        if initializer.needs_data:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
            if datamodule is None:
                raise ConfigError(f"init_mask '{label}' needs calibration data (a datamodule)")
            whole = getattr(datamodule, "calibration_dataloader", datamodule.train_dataloader)
            batches = whole()  # all of it, on every rank: the same masks everywhere
        assert self.model is not None, "configure_model() loads the model"
        update = initializer.compute_update(self.model, self.mask_family, batches)
        if update.biases and not self.solver.ships_init_mask:
            print(
                f"init_mask '{label}': bias compensation not applied, the solver "
                f"{type(self.solver).__name__} learns its own mask (solver oneshot keeps it)"
            )
            update.biases = {}
        update.apply(self.mask_family)
        self.mask_family.apply_initial_masks(update.masks)

    def check_resume(self, ckpt_path: str | Path, trainer: Any, resume: bool = True) -> None:
        """Refuse, before any process starts, a checkpoint made for another model or mask, or
        one that ``trainer``'s strategy cannot reshard (see ``check_resume_layout``). With
        ``resume=False`` (validate) only the model state is read: any full file loads, a
        sharded folder needs the kind of sharding that saved it."""
        if not Path(ckpt_path).exists():
            return  # "last", "hpc" and missing files: Lightning reports them
        self.check_checkpoint(read_checkpoint_header(ckpt_path))
        layout = backend_class(trainer.strategy).layout_flags()
        world = trainer.num_devices * trainer.num_nodes
        if resume:
            check_resume_layout(ckpt_path, world_size=world, **layout)
        elif is_sharded_checkpoint(ckpt_path):
            check_sharded_strategy(ckpt_path, **layout)

    def setup(self, stage: str) -> None:
        initializer = None
        if self.init_mask is not None:
            initializer = get_registry().get("initializers", initializer_name(self.init_mask))
        check_contracts(  # what every plugin requires, once, before the LM is loaded
            self.mask_family,
            self.regularizers,
            self.solver if stage == "fit" else None,
            initializer,
        )
        if stage == "fit" and self.blockwise is not None:
            self._check_blockwise_fit(self.blockwise)
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is None:
            return
        config = self._hf_config()
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if context and seq_len > context:
            raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's context {context}")

    def _check_blockwise_fit(self, objective: BlockwiseObjective) -> None:
        """Refuse, before the LM is loaded, a block-wise fit that this setup cannot run."""
        if not self.solver.supports_blockwise:
            raise ConfigError(
                f"model.objective: blockwise is not supported by solver "
                f"{type(self.solver).__name__}; use objective: end_to_end (solver proximal "
                "learns block-wise)"
            )
        strategy = self.trainer.strategy
        if backend_class(strategy).shards_model:
            raise ConfigError(
                "model.objective: blockwise runs on one device or DDP, not on "
                f"{type(strategy).__name__}: one block is learned at a time, so the model need "
                "not be sharded; use trainer.strategy: ddp_find_unused_parameters_true"
            )
        if self.trainer.world_size > 1 and not getattr(strategy, "_ddp_kwargs", {}).get(
            "find_unused_parameters"
        ):
            raise ConfigError(
                "trainer.strategy: a block-wise fit on several ranks trains one block's masks "
                "at a time, so DDP must allow unused parameters; use strategy: "
                "ddp_find_unused_parameters_true"
            )
        layers = self._hf_config().num_hidden_layers
        expected = objective.total_steps(layers)
        if self.trainer.max_steps != expected:
            e2e = objective.e2e_steps
            raise ConfigError(
                f"trainer.max_steps: objective blockwise learns {layers} blocks × "
                f"{objective.steps_per_block} steps_per_block"
                + (f" + {e2e} e2e_steps" if e2e else "")
                + f" = {expected} steps; set trainer.max_steps: {expected} and "
                f"trainer.max_epochs: -1, got {self.trainer.max_steps}"
            )

    def schedule_spans(self) -> Callable[[int], tuple[int, int]]:
        """Maps an optimizer step to its ``(position, length)`` in its learning-rate schedule:
        the whole fit, or in a block-wise fit one block (the schedule restarts on every block)
        or the end-to-end phase."""
        if self.blockwise is not None:
            objective, blocks = self.blockwise, len(self._blocks)
            return lambda step: objective.schedule_span(step, blocks)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return lambda step: (step, total)

    def _learned_block(self) -> int | None:
        """The block the current step learns; ``None`` outside a block-wise fit's block
        phase."""
        if self.blockwise is None:
            return None
        return self.blockwise.block_at(self.global_step, len(self._blocks))

    def _hf_config(self) -> Any:
        """The LM's HF config, read without loading weights."""
        from lightning_prune.models.loading import load_config

        return load_config(self.model_name, self.trust_remote_code)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        assert self.model is not None, "configure_model() loads the model"
        return self.model(input_ids=input_ids, labels=labels)

    def precision_record(self) -> dict[str, str]:
        """The trainer's precision, the frozen target weights' dtype and the mask state's."""
        learned = {p.dtype for p in self.parameters() if p.requires_grad}
        return {
            "precision": str(self.trainer.precision),
            "model_dtype": dtype_names(w.dtype for w in self.mask_family.originals().values()),
            "mask_state_dtype": dtype_names(learned),
        }

    def on_fit_start(self) -> None:
        record = self.precision_record()
        rank_zero_info("lightning-prune: " + ", ".join(f"{k} {v}" for k, v in record.items()))
        for logger in self.loggers:
            logger.log_hyperparams(record)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._learned_block() is not None:
            loss, family = self._block_loss(batch), self._learned_view()
            total = loss
        else:
            if self.blockwise is not None:
                self.blockwise.release()
            self._set_block_modes(None)
            outputs = self(batch["input_ids"], batch["labels"])
            loss, family = outputs.loss, self.mask_family
            total = loss
            for name, term in self.solver.loss_terms(self, batch, outputs).items():
                self.log(f"train/{name}", term)
                total = total + term
        for regularizer in self.regularizers:
            if not regularizer.has_prox:
                total = total + regularizer.penalty(family)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss
        if self._log_step() and not self.backend.gathers:
            self._log_regularizers()
        return total

    def _block_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The learned block's reconstruction loss on ``batch`` (block-wise objective)."""
        index, objective, model = self._learned_block(), self.blockwise, self.model
        assert index is not None and objective is not None, "a step of the block phase"
        assert model is not None, "configure_model() loads the model"
        self._set_block_modes(index)
        block, view = self._blocks[index], self._learned_view()
        call = objective.block_call(
            model, self._blocks, index, batch["input_ids"], self._calibration_batches()
        )
        view.set_mode("off")
        with torch.no_grad():
            target = objective.run(block, call)
        view.set_mode("learn")
        self.log("block", float(index), prog_bar=True)
        return reconstruction_loss(objective.run(block, call), target)

    def _calibration_batches(self) -> Callable[[], Iterable[dict[str, torch.Tensor]]] | None:
        """Every calibration batch, for the block-input cache (``None`` without a
        datamodule: the blocks before the learned one then run on every step's batch)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return None
        return getattr(datamodule, "calibration_dataloader", datamodule.train_dataloader)

    def teardown(self, stage: str) -> None:
        if self.blockwise is not None:  # also after a failed fit: no spill folder left behind
            self.blockwise.release()

    def _set_block_modes(self, index: int | None) -> None:
        """Blocks before ``index`` run with their final hard masks (or dense), the rest learn;
        ``None`` (end-to-end steps): every block learns."""
        if self._block_in_modes == index:
            return
        if index is None:
            self.mask_family.set_mode("learn")
            self._block_in_modes = None
            return
        assert self.blockwise is not None, "only a block-wise fit has a block phase"
        before = "off" if self.blockwise.inputs == "dense" else "hard"
        for position, names in enumerate(self._block_names):
            mode = before if position < index else "learn"
            for parametrization in self.mask_family.subset(names).parametrizations().values():
                parametrization.set_mode(mode)
        self._block_in_modes = index

    def _learned_view(self) -> MaskFamily:
        """The mask family restricted to the block being learned (block-wise objective), or
        the whole family in an end-to-end step."""
        index = self._learned_block()
        if index is None:
            return self.mask_family
        return self.mask_family.subset(self._block_names[index])

    def _log_step(self) -> bool:
        # set by Lightning's logger connector; Trainer does not declare it
        every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]
        return self.global_step % max(every, 1) == 0

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # whole groups need gathers, never inside the forward or backward: log here, where the
        # state is unchanged since the loss
        if self._log_step() and self.backend.gathers:
            self._log_regularizers()

    def whole_group_views(self, writeback: bool = True) -> Iterator[MaskFamily]:
        """The mask family with whole N:M groups, for a prox: the backend's views (the family
        itself, or one view per gathered unit of a sharded model, see
        ``ShardingBackend.whole_group_views``); in a block-wise fit, the block being learned
        only."""
        if self.blockwise is not None:
            return iter([self._learned_view()])
        return self.backend.whole_group_views(self.mask_family, writeback)

    def _log_regularizers(self) -> None:
        values = self.backend.regularizer_values(self.regularizers, self.mask_family)
        for regularizer in self.regularizers:
            if isinstance(regularizer, WeightedTerm):
                values[f"reg/{type(regularizer).__name__}_lambda"] = regularizer.lam
        values["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        values.update(self.solver.metrics(self))
        self.log_dict(values, prog_bar=False)

    def configure_optimizers(self) -> Any:
        if not self.solver.trains:  # nothing to learn: the fit loop ends before a step
            self.trainer.fit_loop.epoch_loop.max_steps = 0
        return self.solver.configure_optimizers(self)

    def on_after_backward(self) -> None:
        self.backend.reduce_replicated_grads(self)  # what the strategy leaves unreduced

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.solver.grad_clip
        algorithm = gradient_clip_algorithm or "norm"
        if clip:
            self.backend.clip_gradients(self, optimizer, clip, algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.solver.after_optimizer_step(self)

    # -- validation: the mask that would ship -------------------------------------------------
    def on_validation_start(self) -> None:
        self.backend.harden(self.mask_family)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch["input_ids"], batch["labels"]).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # mean over ranks
        return loss

    def on_validation_end(self) -> None:
        self.mask_family.set_mode("learn")
        self._block_in_modes = None

    # -- checkpoints: learnable state + identity ----------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this module: the model's shapes, its
        content (config fields and weights digest, see :mod:`lightning_prune.identity`), the
        mask family and the checkpoint format (see :mod:`lightning_prune.checkpoint_format`).
        The content is computed once per module."""
        config = self.model.config if self.model is not None else self._hf_config()
        if getattr(self, "_content_identity", None) is None:
            self._content_identity = {
                "config": config_record(self._hf_config()),
                "weights_sha256": model_weights_digest(self.model_name),
            }
        return fingerprint_record(
            self.model_name, config, self._content_identity, type(self.mask_family).__name__
        )

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Raise ``ConfigError`` when ``checkpoint`` was made for another model (shapes, config
        fields or weights) or mask, lacks learnable tensors, or holds a non-finite learned
        value (a header without ``state_dict`` is checked for the model and mask only)."""
        saved = saved_record(checkpoint)
        check_identity(saved, self.fingerprint())
        if "state_dict" in checkpoint:  # absent from a header, or when the strategy loaded shards
            check_learned_state(checkpoint["state_dict"], learnable_names(self))

    def learned_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: trainable tensors, replaced W0s and biases."""
        keys = learnable_names(self)
        family = self.mask_family
        keys |= {  # W0 replaced by a one-shot method's updated weights (SparseGPT)
            f"model.{name}.parametrizations.weight.original" for name in family.updated_weights
        }
        keys |= {  # biases replaced by a one-shot method's compensation (FLAP)
            f"model.{name}.bias" for name in family.updated_biases
        }
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.learned_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[RECORD_KEY] = self.fingerprint()
        checkpoint[LAYOUT_KEY] = self.backend.layout_record(
            world_size=self.trainer.world_size if self._trainer is not None else 1
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        if self._trainer is not None:
            self.backend.after_checkpoint_load(self.trainer.optimizers)  # loaded by the strategy


def _keep_learned_state(module: PruningModule, state_dict: dict, prefix: str, metadata) -> None:
    """State-dict post hook: the frozen LM is never saved, so sharded (distributed) checkpoints
    hold only the learned state and load it without the frozen weights."""
    if prefix or module.model is None:
        return
    keep = module.learned_state_keys()
    for key in [k for k in state_dict if k not in keep]:
        del state_dict[key]


def learnable_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of the trainable parameters (wrapper prefixes removed)."""
    return {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
