"""Quality benchmark: one-shot methods against the learned solvers, on the same calibration tokens.

Held-out perplexity on Wikipedia (the split every setting was chosen on) and Shakespeare (a
domain nothing is tuned on) of every row below, with the wall-clock seconds and the calibration
tokens each row consumed (one pass for a one-shot method or a refit; steps × batch × seq_len
for learning). Every row uses the same calibration windows (``bench_common``).

2:4 rows: ``dense``, ``magnitude``, ``wanda``, ``wanda+refit``, ``sparsegpt`` (with its weight
update), ``proximal-e2e-w0`` / ``proximal-e2e-wanda`` (end-to-end, the default recipe, from the
pretrained weights or Wanda's mask), ``proximal-blockwise-w0`` / ``proximal-blockwise-wanda``;
``+refit`` after any learned row adds the closed-form refit of its kept weights.
Structured rows (``--budget`` of the decoder parameters removed, same counts for every row):
``minimax`` (learns the head/channel split the others then use), ``minimax+refit``,
``wanda_sp``, ``wanda_sp+refit``, ``flap``. Block-wise minimax is not supported by the solver.

One process measures the ``--rows`` it is given and merges them into ``--output`` (re-read and
rewritten after every row, each row with the commit it measured), so parts can run side by side
on a shared box:

    cd tools && OMP_NUM_THREADS=1 python bench_quality.py --rows dense magnitude wanda \
        wanda+refit sparsegpt --output ../bench_results/quality/smollm2.json
    python bench_quality.py --model /tmp/small --samples 2 --seq-len 32 --eval-tokens 64 \
        --rows wanda proximal-e2e-wanda+refit --output /tmp/q.json   # smoke test

Needs the lightning-prune-baselines plugin (Wanda, SparseGPT, Wanda-sp, FLAP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_common import calibration_data, calibration_parser, cpu_trainer
from lightning.pytorch import seed_everything

from lightning_prune.evaluation import format_table, perplexity, write_json
from lightning_prune.masks.init import build_initializer, one_shot_applied
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.models.loading import load_config
from lightning_prune.module import PruningModule
from lightning_prune.refit import compute_refit
from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver

NM_ONE_SHOT = ("magnitude", "wanda", "sparsegpt")
LEARNED_NM = tuple(
    f"proximal-{objective}-{start}"
    for objective in ("e2e", "blockwise")
    for start in ("w0", "wanda")
)
STRUCTURED = ("minimax", "minimax+refit", "wanda_sp", "wanda_sp+refit", "flap")
ROWS = (
    "dense",
    *NM_ONE_SHOT,
    "wanda+refit",
    *LEARNED_NM,
    *(f"{name}+refit" for name in LEARNED_NM),
    *STRUCTURED,
)


def parse_args() -> argparse.Namespace:
    parser = calibration_parser(__doc__)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--lr", type=float, default=0.026, help="proximal end-to-end lr")
    parser.add_argument("--epochs", type=int, default=1, help="proximal end-to-end epochs")
    parser.add_argument("--blockwise-lr", type=float, default=0.1)
    parser.add_argument("--lr-scale", choices=["absolute", "weight_rms"], default="weight_rms")
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ of nm_sparsity")
    parser.add_argument("--steps-per-block", type=int, default=20)
    parser.add_argument("--e2e-steps", type=int, default=0, help="block-wise end-to-end phase")
    parser.add_argument("--damping", type=float, default=0.1, help="refit damping")
    parser.add_argument("--budget", type=float, default=0.25, help="structured: share removed")
    parser.add_argument("--channel-multiple", type=int, default=32)
    parser.add_argument("--minimax-lr", type=float, default=0.2)
    parser.add_argument("--output", default="bench_results/quality.json")
    parser.add_argument(
        "--summary", action="store_true", help="print the table of --output and measure nothing"
    )
    return parser.parse_args()


def commit() -> str:
    """The measured commit, with ``+dirty`` when the working tree differs from it."""
    here = Path(__file__).parent
    run = lambda *a: subprocess.run(a, cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("git", "rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if run("git", "status", "--porcelain", "--untracked-files=no") else "")


class Results:
    """The JSON result of one model: rows merged by name, rewritten after every row."""

    def __init__(self, path: Path, args: argparse.Namespace, sources: dict[str, torch.Tensor]):
        self.path, self.sources = path, sources
        self.commit = commit()  # the code this process loaded
        previous = json.loads(path.read_text()) if path.exists() else {}
        self.rows: dict[str, dict] = {r["row"]: r for r in previous.get("rows", [])}
        settings = {k: v for k, v in vars(args).items() if k not in ("rows", "output")}
        if previous and previous.get("settings") != settings:
            raise SystemExit(
                f"{path} holds rows measured with other settings; use another --output"
            )
        self.header = {
            "settings": settings,
            "calibration_tokens": args.samples * args.seq_len,
            "eval_tokens": {k: int(v.numel()) for k, v in sources.items()},
            "torch_threads": torch.get_num_threads(),
            "structured_shape": previous.get("structured_shape"),
        }

    def measure(self, name: str, model: torch.nn.Module, seconds: float, tokens: int) -> None:
        row = {"row": name, "seconds": round(seconds, 1), "tokens": tokens, "commit": self.commit}
        for source, windows in self.sources.items():
            row[source] = perplexity(model, windows, desc=f"{name}/{source}")
        self.rows[name] = row
        print(format_table([row], ["row", *self.sources, "seconds", "tokens"]).splitlines()[-1])
        self.write()

    def write(self) -> None:
        """Rewrite the file with its rows (another process may have added some) and ours."""
        stored = json.loads(self.path.read_text()) if self.path.exists() else {}
        merged = {r["row"]: r for r in stored.get("rows", [])} | self.rows
        order = {name: i for i, name in enumerate(ROWS)}
        rows = sorted(merged.values(), key=lambda r: order[r["row"]])
        shape = self.header["structured_shape"] or stored.get("structured_shape")
        write_json(self.path, {**self.header, "structured_shape": shape, "rows": rows})


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


class Bench:
    """Builds and measures the rows of one model."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.data, sources = calibration_data(
            args.model, args.samples, args.seq_len, args.eval_tokens
        )
        self.results = Results(Path(args.output), args, sources)
        self.pass_tokens = args.samples * args.seq_len  # one pass over the calibration windows

    def batches(self) -> Any:
        return self.data.calibration_dataloader()

    def with_refit(self, name: str, module: PruningModule, seconds: float, tokens: int) -> None:
        """Measure ``name + '+refit'``: the refit of the module's final masks."""
        update, took = timed(
            lambda: compute_refit(
                module.model, module.mask_family, self.batches(), self.args.damping
            )
        )
        with one_shot_applied(module.mask_family, update):
            self.results.measure(
                f"{name}+refit", module.model, seconds + took, tokens + self.pass_tokens
            )

    # -- 2:4 ----------------------------------------------------------------------------------
    def nm_module(self, **kwargs: Any) -> PruningModule:
        return PruningModule(
            NMMaskFamily(2, 4),
            kwargs.pop("solver", ProximalSolver()),
            [NMSparsityRegularizer(lam=self.args.lam, lam_mode="scale_free")],
            model=self.args.model,
            **kwargs,
        )

    def one_shot_nm(self, rows: list[str]) -> None:
        module = self.nm_module()
        module.configure_model()
        family = module.mask_family
        family.set_mode("off")
        if "dense" in rows:
            self.results.measure("dense", module.model, 0.0, 0)
        for name in NM_ONE_SHOT:
            if name not in rows and not (name == "wanda" and "wanda+refit" in rows):
                continue
            update, seconds = timed(
                lambda n=name: build_initializer(n).compute_update(
                    module.model, family, self.batches()
                )
            )
            tokens = self.pass_tokens if name != "magnitude" else 0
            if name in rows:
                with one_shot_applied(family, update):
                    self.results.measure(name, module.model, seconds, tokens)
            if name == "wanda" and "wanda+refit" in rows:
                family.apply_initial_masks(update.masks)
                self.with_refit(name, module, seconds, tokens)

    def learned_nm(self, name: str, refit: bool) -> None:
        args = self.args
        objective, start = name.split("-")[1:]
        blockwise = objective == "blockwise"
        lr = args.blockwise_lr if blockwise else args.lr
        kwargs: dict[str, Any] = {
            "solver": ProximalSolver(lr=lr, lr_scale=args.lr_scale),
            "init_mask": "wanda" if start == "wanda" else None,
        }
        layers = load_config(args.model).num_hidden_layers
        steps = -1
        if blockwise:
            kwargs.update(
                objective="blockwise",
                steps_per_block=args.steps_per_block,
                e2e_steps=args.e2e_steps,
            )
            steps = layers * args.steps_per_block + args.e2e_steps
        module = self.nm_module(**kwargs)
        trainer = cpu_trainer(epochs=-1 if blockwise else args.epochs, max_steps=steps)
        _, seconds = timed(lambda: trainer.fit(module, datamodule=self.data))
        tokens = trainer.global_step * self.data.batch_size * args.seq_len
        if start == "wanda":
            tokens += self.pass_tokens
        module.mask_family.harden()
        if name in args.rows:
            self.results.measure(name, module.model, seconds, tokens)
        if refit:
            self.with_refit(name, module, seconds, tokens)

    # -- uniform structured -------------------------------------------------------------------
    def structured(self, rows: list[str]) -> None:
        """Minimax first (it learns the head/channel split), then the one-shot methods at the
        same counts."""
        args = self.args
        gqa = (
            "query"
            if getattr(load_config(args.model), "num_key_value_heads", 2) == 1
            else ("kv_group")
        )  # one KV head (Gemma-3-270M) leaves no KV group to remove: prune query heads per group
        family = UniformStructuredFamily(
            budget=args.budget, gqa=gqa, channel_multiple=args.channel_multiple
        )
        module = PruningModule(
            family, MinimaxSolver(lr=args.minimax_lr), [UniformLagrangian()], model=args.model
        )
        trainer = cpu_trainer()
        _, seconds = timed(lambda: trainer.fit(module, datamodule=self.data))
        tokens = trainer.global_step * self.data.batch_size * args.seq_len
        family.harden()
        self.results.header["structured_shape"] = family.exported_shape()
        if "minimax" in rows:
            self.results.measure("minimax", module.model, seconds, tokens)
        if "minimax+refit" in rows:
            self.with_refit("minimax", module, seconds, tokens)
        for name in ("wanda_sp", "flap"):
            if name not in rows and f"{name}+refit" not in rows:
                continue
            update, took = timed(
                lambda n=name: build_initializer(n).compute_update(
                    module.model, family, self.batches()
                )
            )
            if name in rows:
                with one_shot_applied(family, update):
                    self.results.measure(name, module.model, took, self.pass_tokens)
            if f"{name}+refit" in rows:
                family.apply_initial_masks(update.masks)
                self.with_refit(name, module, took, self.pass_tokens)

    def run(self) -> None:
        rows = self.args.rows
        if any(r in rows for r in ("dense", *NM_ONE_SHOT, "wanda+refit")):
            self.one_shot_nm(rows)
        for name in LEARNED_NM:
            if name in rows or f"{name}+refit" in rows:
                seed_everything(0)
                self.learned_nm(name, refit=f"{name}+refit" in rows)
        if any(r in rows for r in STRUCTURED):
            seed_everything(0)
            self.structured(rows)


def summary(path: Path) -> str:
    """The rows of ``path`` with each one's change against SparseGPT (2:4 rows) or Wanda-sp
    (structured rows) and, for 2:4 rows, the share of the Wanda→dense gap it closes."""
    result = json.loads(path.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    sources = list(result["eval_tokens"])
    table = []
    for name, row in rows.items():
        line = {"row": name, **{s: row[s] for s in sources}, "seconds": row["seconds"]}
        line["tokens"] = row["tokens"]
        structured = name.split("+")[0] in ("minimax", "wanda_sp", "flap")
        reference = rows.get("wanda_sp" if structured else "sparsegpt")
        for source in sources:
            if reference is not None and name != "dense":
                change = 100 * (row[source] / reference[source] - 1)
                line[f"{source} vs {reference['row']}"] = f"{change:+.1f}%"
            if not structured and {"dense", "wanda"} <= rows.keys() and name != "dense":
                wanda, dense = rows["wanda"][source], rows["dense"][source]
                line[f"{source} gap closed"] = (
                    f"{100 * (wanda - row[source]) / (wanda - dense):.1f}%"
                )
        table.append(line)
    columns = list(dict.fromkeys(key for line in table for key in line))
    return format_table(table, columns)


def main() -> None:
    args = parse_args()
    if args.summary:
        print(summary(Path(args.output)))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    Bench(args).run()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
