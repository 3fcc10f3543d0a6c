"""Per-rank memory of the training state under FSDP2, at 1, 2 (and more) ranks, both solvers.

For every solver and world size, runs a short real fit (ModelParallelStrategy, CPU, gloo) of the
embedded model, then on every rank sums the bytes this rank holds of:
- ``params``: every parameter's local shard (frozen LM W0, embeddings, norms, mask state);
- ``learnable``: the trainable ones among them (the proximal surrogate copy, gate logits);
- ``optimizer``: the optimizer state's local tensors (AdamW moments);
and prints a table with bytes per model parameter (over the LM's own parameters, the frozen
ones: mask state excluded) and the ratio
to the 1-rank figure. Gradients are freed after every step and not counted; the unsharded layer
FSDP2 gathers during its forward and the activations come on top (``peak_rss`` shows the whole
process, Python and libraries included). Writes JSON.

    python tools/bench_memory.py --worlds 1 2 --output bench_results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOLVERS = ("proximal", "minimax")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", default="bench_results/memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # solver name, under torchrun
    parser.add_argument("--result", help=argparse.SUPPRESS)  # JSON file of this worker
    return parser.parse_args()


def build(solver: str, model: str):
    """The module of one solver's default recipe."""
    from lightning_prune.module import PruningModule

    if solver == "proximal":
        from lightning_prune.masks.nm import NMMaskFamily
        from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
        from lightning_prune.solvers.proximal import ProximalSolver

        return PruningModule(
            NMMaskFamily(), ProximalSolver(), [NMSparsityRegularizer()], model=model
        )
    from lightning_prune.masks.structured import UniformStructuredFamily
    from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
    from lightning_prune.solvers.minimax import MinimaxSolver

    family = UniformStructuredFamily(budget=0.25, channel_multiple=32)
    return PruningModule(family, MinimaxSolver(), [UniformLagrangian()], model=model)


def local_bytes(tensor: torch.Tensor) -> int:
    from lightning_prune.sharding import local

    shard = local(tensor)
    return shard.numel() * shard.element_size()


def measure(module, optimizer) -> dict[str, int]:
    """Bytes of this rank's parameter shards, learnable shards and optimizer state."""
    params = list(module.parameters())
    state = [
        value
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return {
        "params": sum(local_bytes(p) for p in params),
        "learnable": sum(local_bytes(p) for p in params if p.requires_grad),
        "optimizer": sum(local_bytes(t) for t in state),
        "model_params": sum(p.numel() for p in module.model.parameters() if not p.requires_grad),
    }


def worker(args: argparse.Namespace) -> None:
    """One rank of one fit (started by torchrun, or directly for 1 rank)."""
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_prune.data import CalibrationDataModule

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    seed_everything(0)
    module = build(args.worker, args.model)
    data = CalibrationDataModule(
        tokenizer=args.model, seq_len=args.seq_len, num_samples=args.steps * world, batch_size=1
    )
    figures: dict[str, int] = {}

    class Measure(Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            figures.update(measure(pl_module, trainer.optimizers[0]))

    trainer = Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Measure()],
    )
    trainer.fit(module, data)
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = trainer.global_rank
    Path(f"{args.result}.{rank}").write_text(json.dumps(figures))


def run(solver: str, world: int, args: argparse.Namespace, folder: Path) -> list[dict]:
    """Start one fit at ``world`` ranks; every rank's figures."""
    result = folder / f"{solver}-{world}"
    tail = ["--worker", solver, "--result", str(result), "--model", args.model]
    tail += ["--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        command = [sys.executable, __file__, *tail]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), f"--nproc_per_node={world}", __file__, *tail]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(world)]


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    print(HEADER)
    with tempfile.TemporaryDirectory() as folder:
        for solver in args.solvers:
            base = None
            for world in args.worlds:
                ranks = run(solver, world, args, Path(folder))
                worst = max(ranks, key=lambda r: r["params"] + r["optimizer"])
                state = worst["params"] + worst["optimizer"]
                base = base or state
                count = worst["model_params"]
                rows.append(
                    {
                        "solver": solver,
                        "ranks": world,
                        "model_params": count,
                        "params_bytes": worst["params"],
                        "learnable_bytes": worst["learnable"],
                        "optimizer_bytes": worst["optimizer"],
                        "state_bytes": state,
                        "bytes_per_param": state / count,
                        "ratio_to_1_rank": state / base,
                        "peak_rss_bytes": max(r["peak_rss"] for r in ranks),
                    }
                )
                print_row(rows[-1])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    print(f"wrote {args.output}")


HEADER = (
    "solver    ranks  params MB  learnable MB  optimizer MB  bytes/param  vs 1 rank  peak RSS MB"
)


def print_row(row: dict) -> None:
    mb = 1 << 20
    print(
        f"{row['solver']:<9} {row['ranks']:>5}  {row['params_bytes'] / mb:>9.1f}  "
        f"{row['learnable_bytes'] / mb:>12.1f}  {row['optimizer_bytes'] / mb:>12.1f}  "
        f"{row['bytes_per_param']:>11.2f}  {row['ratio_to_1_rank']:>9.3f}  "
        f"{row['peak_rss_bytes'] / mb:>11.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
