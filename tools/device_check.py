"""One prepared device check: the GPU paths of lightning-prune in one run of at most 8 minutes.

Random-initialised models built from configs (no downloads): a ~1B Llama shape on CUDA (the
``llama-1b`` shape of tools/plan_memory.py), a tiny one with ``--cpu``. Sections, each in its own
``try`` (a failure is recorded as ``{"error": ...}`` and the others still run) and under one
time budget (a section that would start past it is ``{"skipped": ...}``):

- ``matmul_2to4``: ``torch.sparse.to_sparse_semi_structured`` against dense bf16 at Llama-3-8B
  Linear shapes, 1, 16 and 2048 tokens (CUDA only);
- ``prox``: the N:M prox alone per backend against one AdamW step of the same weight
  (``measure_prox_share`` of tools/bench_prox.py);
- ``train_proximal`` / ``train_minimax``: Lightning fits in ``bf16-mixed``: tokens/s, peak memory
  (``torch.cuda.max_memory_allocated``) against tools/plan_memory.py's plan, and the share of a
  step the prox takes (``NMSparsityRegularizer.prox_`` timed inside the fit);
- ``fsdp2``: the proximal fit under ``ModelParallelStrategy`` on one rank (NCCL; gloo on CPU);
- ``compressed_loader``: a 2:4-masked model exported as ``compressed-nm`` and loaded back through
  ``lightning_prune.load_pretrained`` (dense, and with 2:4 semi-structured Linears on CUDA);
- ``compile``: forward tokens/s of the exported model, eager against ``torch.compile``.

Writes JSON after every section to ``--output``, else ``$OUT/device_check.json`` when ``$OUT``
is set, else bench_results/device_check.json.

    python tools/device_check.py            # CUDA
    python tools/device_check.py --cpu      # every path but the 2:4 kernels, tiny, on CPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import plan_memory  # tools/ is on sys.path when this file runs as a script
import torch

SECTIONS = (
    "matmul_2to4",
    "prox",
    "train_proximal",
    "train_minimax",
    "fsdp2",
    "compressed_loader",
    "compile",
)
PACKAGES = ("torch", "lightning", "transformers", "torchmetrics", "accelerate", "safetensors")
PRECISION = "bf16-mixed"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and the tiny ``--cpu`` run."""

    model: dict[str, Any]  # LlamaConfig fields
    seq_len: int
    micro_batch: int
    warmup_steps: int
    steps: int  # measured steps after the warm-up
    matmul_shapes: tuple[tuple[int, int], ...]  # (out, in) of a Linear weight
    matmul_tokens: tuple[int, ...]
    prox_shapes: tuple[tuple[int, int], ...]  # (out, in) of the weights tools/bench_prox.py times
    forward_shape: tuple[int, int]  # (batch, seq) of the inference forwards
    compile_backend: str
    section_cap_s: float  # no section runs longer than this


CUDA_SIZES = Sizes(
    model=plan_memory.MODELS["llama-1b"],
    seq_len=2048,
    micro_batch=1,
    warmup_steps=3,
    steps=6,
    matmul_shapes=((4096, 4096), (14336, 4096), (4096, 14336)),
    matmul_tokens=(1, 16, 2048),
    prox_shapes=((2048, 8192), (4096, 14336)),  # ~1B MLP, Llama-3-8B MLP
    forward_shape=(4, 512),
    compile_backend="inductor",
    section_cap_s=150.0,
)
CPU_SIZES = Sizes(
    model=dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
    ),
    seq_len=32,
    micro_batch=2,
    warmup_steps=1,
    steps=2,
    matmul_shapes=((64, 64),),
    matmul_tokens=(1, 16),
    prox_shapes=((64, 256),),
    forward_shape=(2, 32),
    compile_backend="eager",  # inductor takes ~30 s to compile even the tiny model on 2 cores
    section_cap_s=60.0,
)


class SectionTimeout(Exception):
    """A section ran past its share of the time budget."""


class Deadline:
    """The global time guard: what is left, and an alarm that interrupts a section at its cap."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @contextmanager
    def alarm(self, cap: float) -> Iterator[None]:
        def interrupt(signum: int, frame: Any) -> None:
            raise SectionTimeout(f"timed out after {cap:.0f} s (time budget)")

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, max(min(cap, self.left()), 1.0))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


class Context:
    """The device, the sizes, and the model folders the sections share (built on first use)."""

    def __init__(self, device: torch.device, sizes: Sizes, dtype: torch.dtype, workdir: Path):
        self.device, self.sizes, self.dtype, self.workdir = device, sizes, dtype, workdir
        self._dense: Path | None = None
        self._exported: Path | None = None
        self.export_s: float | None = None
        self.export_failed = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**self.sizes.model)

    def dense_folder(self) -> Path:
        """A random dense model saved as a Hugging Face folder, with a small tokenizer."""
        if self._dense is None:
            folder = self.workdir / "dense"
            model = random_model(self.config(), self.device, self.dtype)
            model.to("cpu").save_pretrained(folder)
            write_tokenizer(folder)
            self._dense = folder
        return self._dense

    def exported_folder(self) -> Path:
        """The dense model with 2:4 magnitude masks, exported as ``compressed-nm``."""
        if self._exported is None:
            from lightning_prune.export.compressed import write_compressed_folder

            model = random_model(self.config(), self.device, self.dtype)
            layout = mask_2to4(model)
            folder = self.workdir / "compressed"
            source = str(self.dense_folder())  # its tokenizer goes into the export
            started = time.perf_counter()
            self.export_failed = True  # until the export returns
            write_compressed_folder(model.to("cpu"), folder, layout, 2, 4, source, {})
            self.export_s = time.perf_counter() - started
            self.export_failed, self._exported = False, folder
        return self._exported

    def inference_folder(self) -> tuple[Path, str]:
        """The exported model, or the dense Hugging Face folder when the export failed."""
        if self.export_failed:
            return self.dense_folder(), "hf (the compressed-nm export failed)"
        return self.exported_folder(), "compressed-nm"


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A randomly initialised causal LM of ``config`` on ``device`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def mask_2to4(model) -> dict[str, bool]:
    """Zero all but the 2 largest of every 4 inputs in the pruned Linears; the export layout."""
    from lightning_prune.adapters import adapter_for
    from lightning_prune.ops.nm_prox import nm_topn_mask

    targets = adapter_for(model).target_linears(model)
    with torch.no_grad():
        for module in targets.values():
            module.weight.mul_(nm_topn_mask(module.weight, 2, 4).to(module.weight.dtype))
    return {f"{name}.weight": False for name in targets}


def write_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer (exports copy the source model's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Mean seconds of one call over ``repeat`` back-to-back calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeat


def clocked(fn: Callable[..., Any], device: torch.device, sink: list[float]) -> Callable:
    """``fn`` that appends the seconds of every call to ``sink`` (synchronised)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync(device)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        sync(device)
        sink.append(time.perf_counter() - started)
        return result

    return wrapper


# -- (a) 2:4 semi-structured matmul ------------------------------------------------------------
def matmul_2to4(ctx: Context) -> dict[str, Any]:
    """Dense bf16 ``F.linear`` against the 2:4 semi-structured weight, per shape and tokens."""
    if not ctx.cuda:
        return {"skipped": "needs CUDA (torch.sparse.to_sparse_semi_structured)"}
    from torch.sparse import to_sparse_semi_structured

    from lightning_prune.ops.nm_prox import nm_topn_mask
    from lightning_prune.runtime import semi_structured_backend

    rows = []
    for out_features, in_features in ctx.sizes.matmul_shapes:
        weight = torch.randn(out_features, in_features, device=ctx.device, dtype=torch.bfloat16)
        weight = weight * nm_topn_mask(weight, 2, 4).to(weight.dtype)
        sparse = to_sparse_semi_structured(weight)
        for tokens in ctx.sizes.matmul_tokens:
            x = torch.randn(tokens, in_features, device=ctx.device, dtype=torch.bfloat16)
            rows.append(linear_timing(x, weight, sparse, ctx.device))
    return {"backend": semi_structured_backend().BACKEND, "rows": rows}


def linear_timing(
    x: torch.Tensor, weight: torch.Tensor, sparse: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """``F.linear(x, ·)`` with the dense and the semi-structured weight: time and agreement."""
    from torch.nn import functional as F

    dense_s = seconds_per_call(lambda: F.linear(x, weight), device, 50)
    sparse_s = seconds_per_call(lambda: F.linear(x, sparse), device, 50)
    want, got = F.linear(x, weight).float(), F.linear(x, sparse).float()
    return {
        "shape": list(weight.shape),
        "tokens": x.shape[0],
        "dense_us": dense_s * 1e6,
        "sparse_us": sparse_s * 1e6,
        "speedup": dense_s / sparse_s,
        "max_rel_error": relative_error(got, want),
    }


# -- (b) training steps ------------------------------------------------------------------------
def prox(ctx: Context) -> dict[str, Any]:
    """The prox alone per backend against one AdamW step (tools/bench_prox.py's measure)."""
    from bench_prox import measure_prox_share

    return {"results": [measure_prox_share(shape, ctx.device) for shape in ctx.sizes.prox_shapes]}


def build_module(solver: str, folder: Path, dtype: torch.dtype):
    """The solver's default recipe on the model in ``folder`` (as tools/bench_memory.py)."""
    from lightning_prune.module import PruningModule

    family = plan_memory.build_family(solver)
    if solver == "proximal":
        from lightning_prune.regularizers.nm_sparsity import NMSparsityRegularizer
        from lightning_prune.solvers.proximal import ProximalSolver

        solver_, regularizer = ProximalSolver(), NMSparsityRegularizer()
    else:
        from lightning_prune.regularizers.uniform_lagrangian import UniformLagrangian
        from lightning_prune.solvers.minimax import MinimaxSolver

        solver_, regularizer = MinimaxSolver(), UniformLagrangian()
    dtype_name = str(dtype).removeprefix("torch.")
    return PruningModule(family, solver_, [regularizer], model=str(folder), dtype=dtype_name)


def token_batches(vocab: int, sizes: Sizes) -> torch.utils.data.DataLoader:
    """Random token windows, one micro-batch per step."""
    generator = torch.Generator().manual_seed(0)
    count = (sizes.warmup_steps + sizes.steps) * sizes.micro_batch
    ids = torch.randint(0, vocab, (count, sizes.seq_len), generator=generator)
    samples = [{"input_ids": row, "labels": row} for row in ids]
    return torch.utils.data.DataLoader(samples, batch_size=sizes.micro_batch)


def step_clock(device: torch.device):
    """A Lightning callback timing every training batch (forward, backward, step, prox)."""
    from lightning.pytorch import Callback

    class StepClock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            sync(device)
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self.started)

    return StepClock()


def make_strategy(name: str) -> Any:
    """Lightning's strategy for ``single`` (one device) or ``fsdp2`` (one rank)."""
    if name == "single":
        return "auto"
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)


def fit(ctx: Context, solver: str, strategy: str = "single") -> dict[str, Any]:
    """A short fit: median step time, tokens/s, prox time and share, peak memory."""
    from lightning.pytorch import Trainer

    sizes = ctx.sizes
    module = build_module(solver, ctx.dense_folder(), ctx.dtype)
    prox_times: list[float] = []
    for regularizer in module.regularizers:
        if regularizer.has_prox:
            regularizer.prox_ = clocked(regularizer.prox_, ctx.device, prox_times)
    clock = step_clock(ctx.device)
    trainer = Trainer(
        accelerator=ctx.device.type, devices=1, strategy=make_strategy(strategy),
        precision=PRECISION,
        max_steps=sizes.warmup_steps + sizes.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[clock],
    )
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    trainer.fit(module, train_dataloaders=token_batches(ctx.config().vocab_size, sizes))
    step_s = statistics.median(clock.times[sizes.warmup_steps:])
    result = {
        "steps": len(clock.times) - sizes.warmup_steps,
        "step_s": step_s,
        "tokens_per_s": sizes.seq_len * sizes.micro_batch / step_s,
        "mask_state_dtype": sorted({str(p.dtype) for p in module.parameters() if p.requires_grad}),
    }
    if prox_times:
        result["prox_s"] = statistics.median(prox_times[sizes.warmup_steps:])
        result["prox_share"] = result["prox_s"] / step_s
    result.update(memory_figures(ctx, solver, strategy))
    result["surrogates_sharded"] = sharded(module)
    return result


def sharded(module) -> bool:
    """Whether the mask state is sharded (FSDP2 DTensors)."""
    from lightning_prune.sharding import is_sharded

    return any(is_sharded(p) for p in module.parameters() if p.requires_grad)


def memory_figures(ctx: Context, solver: str, strategy: str) -> dict[str, Any]:
    """Measured peak memory (CUDA) next to tools/plan_memory.py's plan of the same fit."""
    dtype = str(ctx.dtype).removeprefix("torch.")
    sizes = ctx.sizes
    planned = plan_memory.plan(
        ctx.config(), solver, strategy, 1, sizes.seq_len, sizes.micro_batch, dtype, PRECISION
    )
    figures: dict[str, Any] = {"planned_total_bytes": planned["total"]}
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device)
        figures.update(peak_memory_bytes=peak, peak_over_plan=peak / planned["total"])
    return figures


def train_proximal(ctx: Context) -> dict[str, Any]:
    return fit(ctx, "proximal")


def train_minimax(ctx: Context) -> dict[str, Any]:
    return fit(ctx, "minimax")


# -- (c) FSDP2 on one rank ---------------------------------------------------------------------
def fsdp2(ctx: Context) -> dict[str, Any]:
    """The proximal fit under ``ModelParallelStrategy`` with one rank, torn down after."""
    import torch.distributed as dist

    environment = dict(os.environ)
    try:
        return fit(ctx, "proximal", "fsdp2")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


# -- (a) the compressed-nm loader, (d) torch.compile -------------------------------------------
def forward_tokens_per_s(model, ctx: Context) -> tuple[float, torch.Tensor]:
    """Forward tokens/s (no grad, no cache) and the logits of the probe batch."""
    batch, seq = ctx.sizes.forward_shape
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    probe = torch.randint(0, vocab, (batch, seq), generator=generator).to(ctx.device)
    with torch.no_grad():
        seconds = seconds_per_call(lambda: model(input_ids=probe, use_cache=False), ctx.device, 5)
        logits = model(input_ids=probe, use_cache=False).logits.float()
    return batch * seq / seconds, logits


def timed_load(ctx: Context, folder: Path, **kwargs: Any) -> tuple[Any, float]:
    from lightning_prune.loader import load_pretrained

    started = time.perf_counter()
    model = load_pretrained(folder, dtype=ctx.dtype, device=ctx.device, **kwargs)
    sync(ctx.device)
    return model, time.perf_counter() - started


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def compressed_loader(ctx: Context) -> dict[str, Any]:
    """Export a 2:4-masked model, load it back dense (and 2:4 semi-structured on CUDA)."""
    folder = ctx.exported_folder()
    record = json.loads((folder / "pruning.json").read_text())
    dense, load_s = timed_load(ctx, folder)
    dense_tps, want = forward_tokens_per_s(dense, ctx)
    result = {
        "export_s": ctx.export_s,
        "file_bytes": record["bytes"]["file"],
        "file_over_dense": record["bytes"]["file_over_dense"],
        "load_s": load_s,
        "dense_tokens_per_s": dense_tps,
    }
    del dense
    if not ctx.cuda:
        result["semi_structured"] = "skipped: needs CUDA"
        return result
    sparse, sparse_load_s = timed_load(ctx, folder, semi_structured=True)
    sparse_tps, got = forward_tokens_per_s(sparse, ctx)
    report = sparse.lightning_prune_info["semi_structured"]
    result.update(
        load_semi_structured_s=sparse_load_s,
        converted_linears=len(report["converted"]),
        semi_structured_tokens_per_s=sparse_tps,
        semi_structured_speedup=sparse_tps / dense_tps,
        semi_structured_max_rel_error=relative_error(got, want),
    )
    return result


def compile_section(ctx: Context) -> dict[str, Any]:
    """Forward tokens/s of the exported model, eager and through ``torch.compile``."""
    folder, source = ctx.inference_folder()
    eager, _ = timed_load(ctx, folder)
    eager_tps, want = forward_tokens_per_s(eager, ctx)
    del eager
    backend = ctx.sizes.compile_backend
    compiled, load_s = timed_load(ctx, folder, compile=True, compile_backend=backend)
    status = compiled.lightning_prune_info["compile"]
    if not status.startswith("compiled"):
        raise RuntimeError(f"torch.compile fell back: {status}")
    compiled_tps, got = forward_tokens_per_s(compiled, ctx)
    result = {
        "model": source,
        "backend": backend,
        "status": status,
        "load_and_compile_s": load_s,
        "eager_tokens_per_s": eager_tps,
        "compiled_tokens_per_s": compiled_tps,
        "speedup": compiled_tps / eager_tps,
        "max_rel_error": relative_error(got, want),
    }
    if backend != "inductor":
        result["note"] = f"backend {backend}: dynamo only, no inductor code generation"
    return result


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "matmul_2to4": matmul_2to4,
    "prox": prox,
    "train_proximal": train_proximal,
    "train_minimax": train_minimax,
    "fsdp2": fsdp2,
    "compressed_loader": compressed_loader,
    "compile": compile_section,
}


# -- driver ------------------------------------------------------------------------------------
def run_section(name: str, ctx: Context, deadline: Deadline) -> dict[str, Any]:
    """One section under the time guard; any failure becomes ``{"error": ...}``."""
    if deadline.left() < 5:
        return {"skipped": "time budget spent"}
    started = time.perf_counter()
    try:
        with deadline.alarm(ctx.sizes.section_cap_s):
            result = RUNNERS[name](ctx)
    except Exception as err:  # recorded; the other sections still run
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result = {"error": f"{type(err).__name__}: {message}"}
    finally:
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    result["section_s"] = time.perf_counter() - started
    return result


def environment(ctx: Context) -> dict[str, Any]:
    """The machine and the package versions the figures come from."""
    info: dict[str, Any] = {"device": str(ctx.device), "cuda": torch.version.cuda}
    if ctx.cuda:
        properties = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    return info


def output_path(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "device_check.json"
    return Path("bench_results/device_check.json")


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(path)


def print_summary(result: dict[str, Any]) -> None:
    """The matmul table and one line per section."""
    matmul = result["sections"].get("matmul_2to4", {})
    if "rows" in matmul:
        print(f"2:4 semi-structured ({matmul['backend']}) vs dense bf16, F.linear")
        print(f"{'out x in':>14} {'tokens':>7} {'dense us':>10} {'2:4 us':>10} {'speedup':>8}")
        for row in matmul["rows"]:
            shape = "x".join(map(str, row["shape"]))
            print(f"{shape:>14} {row['tokens']:>7} {row['dense_us']:>10.1f} "
                  f"{row['sparse_us']:>10.1f} {row['speedup']:>8.2f}")
    fits = [n for n in ("train_proximal", "train_minimax", "fsdp2")
            if "tokens_per_s" in result["sections"].get(n, {})]
    if fits:
        print(f"{'fit':<16} {'tokens/s':>10} {'step s':>8} {'prox share':>10} {'peak GiB':>9} "
              f"{'plan GiB':>9}")
    for name in fits:
        section = result["sections"][name]
        prox = section.get("prox_share")
        peak = section.get("peak_memory_bytes")
        print(f"{name:<16} {section['tokens_per_s']:>10.0f} {section['step_s']:>8.3f} "
              f"{'-' if prox is None else f'{prox:.2f}':>10} "
              f"{'-' if peak is None else f'{peak / 2**30:.2f}':>9} "
              f"{section['planned_total_bytes'] / 2**30:>9.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (no 2:4 kernels)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--budget-s", type=float, default=450.0, help="global time guard")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--output", help="JSON path (default: $OUT/ or bench_results/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    deadline = Deadline(args.budget_s)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device; run with --cpu for the CPU paths")
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = CPU_SIZES if args.cpu else CUDA_SIZES
    path = output_path(args.output)
    with tempfile.TemporaryDirectory(prefix="device-check-") as workdir:
        ctx = Context(device, sizes, getattr(torch, args.dtype), Path(workdir))
        result = {
            "mode": "cpu" if args.cpu else "cuda",
            "dtype": args.dtype,
            "precision": PRECISION,
            "sizes": asdict(sizes),
            "environment": environment(ctx),
            "sections": {},
        }
        for name in args.sections:
            result["sections"][name] = run_section(name, ctx, deadline)
            print(f"[{name}] {result['sections'][name]}", flush=True)
            write_json(path, result)
    result["elapsed_s"] = args.budget_s - deadline.left()
    write_json(path, result)
    print_summary(result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
