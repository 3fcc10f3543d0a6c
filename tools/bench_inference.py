"""Size and speed of the exports: dense vs 2:4 (dense zeros, compressed, CUDA semi-structured)
vs uniform structured.

Builds every export from one model (a magnitude 2:4 mask and an untrained 25% uniform structured
mask: speed and size do not depend on mask quality), writes the files in ``--file-dtype``, then
measures file bytes, and load time and peak memory of each variant in a fresh process; then
prefill and decode tokens/s (medians of ``--repeats`` runs, the variants taking turns run by run
so that a busy shared machine slows them alike) at every batch size and prompt length, next to
the FLOP bound of the kernels that actually run. Prints tables and writes JSON.

    OMP_NUM_THREADS=2 python tools/bench_inference.py --model smollm2-135m \
        --batch-sizes 1 4 --lengths 128 512 --output bench_results/inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from inference_timing import flops_per_token, interleaved_timings, timings

from lightning_prune.evaluation import format_table, write_json

EXPECTATION = {
    "dense": "baseline",
    "2:4 hf (dense zeros)": "no speed-up on any device: dense kernels multiply the zeros",
    "2:4 compressed-nm (restored)": "no speed-up: restored to the same dense tensors; the file "
    "is smaller, loading decodes it",
    "2:4 semi-structured (CUDA)": "CUDA sparse tensor cores (Ampere or newer), fp16/bf16: "
    "compute-bound prefill at larger batch and length; little for batch-1 decode",
    "structured (smaller dense)": "yes on every device, up to the FLOP bound (fewer FLOPs and "
    "bytes, ordinary dense kernels)",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or HF folder")
    parser.add_argument("--file-dtype", default="bfloat16", help="dtype the files are written in")
    parser.add_argument("--dtype", default=None, help="dtype to run in (CPU float32, CUDA fp16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--workdir", default="bench_results/inference_models")
    parser.add_argument("--reuse", action="store_true", help="reuse the exports in --workdir")
    parser.add_argument("--output", default="bench_results/inference.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one variant
    return parser.parse_args()


# -- building the exports ----------------------------------------------------------------------
def _nm_module(model: str):
    from lightning_prune.masks.nm import NMMaskFamily
    from lightning_prune.module import PruningModule
    from lightning_prune.solvers.proximal import ProximalSolver

    module = PruningModule(NMMaskFamily(n=2, m=4), ProximalSolver(), model=model)
    module.configure_model()
    module.apply_initializer("magnitude")
    return module


def _save_as(src: Path, dst: Path, dtype: torch.dtype, remove_src: bool = False) -> None:
    """Write ``src``'s weights in ``dtype`` to ``dst`` (a cast of a verified export)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(dst)
    if remove_src:
        shutil.rmtree(src)


def build_exports(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Write the dense, 2:4 hf, 2:4 compressed and structured folders under ``work``."""
    from lightning_prune.export.compressed import export_compressed_nm
    from lightning_prune.export.hf import export_hf
    from lightning_prune.export.structured import export_structured_hf
    from lightning_prune.masks.structured import UniformStructuredFamily
    from lightning_prune.models.loading import resolve_model_path
    from lightning_prune.module import PruningModule
    from lightning_prune.solvers.minimax import MinimaxSolver

    file_dtype = getattr(torch, args.file_dtype)
    folders = {
        name: work / slug
        for name, slug in (
            ("dense", "dense"),
            ("2:4 hf (dense zeros)", "hf-2of4"),
            ("2:4 compressed-nm (restored)", "compressed-2of4"),
            ("structured (smaller dense)", "structured"),
        )
    }
    if args.reuse and all((folder / "config.json").is_file() for folder in folders.values()):
        return folders
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print("building exports ...", flush=True)
    _save_as(Path(resolve_model_path(args.model)), folders["dense"], file_dtype)
    export_hf(_nm_module(args.model), work / "hf-fp32")
    _save_as(work / "hf-fp32", folders["2:4 hf (dense zeros)"], file_dtype, True)
    export_compressed_nm(
        _nm_module(args.model), folders["2:4 compressed-nm (restored)"], dtype=file_dtype
    )
    family = UniformStructuredFamily(budget=0.25)
    structured = PruningModule(family, MinimaxSolver(), model=args.model)
    structured.configure_model()
    export_structured_hf(structured, work / "structured-fp32")
    _save_as(work / "structured-fp32", folders["structured (smaller dense)"], file_dtype, True)
    return folders


# -- measuring one variant in a fresh process --------------------------------------------------
def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so imports do not count (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _load(spec: dict) -> torch.nn.Module:
    from lightning_prune import load_pretrained

    return load_pretrained(
        spec["folder"],
        dtype=spec["dtype"],
        device=spec["device"],
        semi_structured=spec["semi_structured"],
        compile=spec["compile"],
    )


def measure_load(spec: dict) -> dict:
    """Load time and peak memory of one variant, in a fresh interpreter (see run_worker).

    The peak covers loading plus one prefill and decode at the largest batch and length.
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    device = torch.device(spec["device"])
    before = _rss_mb()
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = _load(spec)
    load_s = time.perf_counter() - start
    batch, length = max(spec["batch_sizes"]), max(spec["lengths"])
    timings(model, batch, length, spec["new_tokens"], repeats=1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _rss_mb("VmHWM") - before
    info = model.lightning_prune_info
    return {
        "load_s": load_s,
        "peak_mb": peak,
        "peak_kind": "CUDA max allocated" if device.type == "cuda" else "CPU RSS above start",
        "params": sum(p.numel() for p in model.parameters()),
        "info": {k: v for k, v in info.items() if k != "path"},
    }


def run_worker(spec: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['name']}: {result.stderr.strip().splitlines()[-3:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure_load(json.loads(args.worker))))
        return
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("float16" if cuda else "float32")
    folders = build_exports(args, Path(args.workdir))
    variants = [(name, folder, False) for name, folder in folders.items()]
    if cuda:
        compressed = folders["2:4 compressed-nm (restored)"]
        variants.insert(3, ("2:4 semi-structured (CUDA)", compressed, True))
    results, models, dense_bytes = [], {}, _bytes(folders["dense"])
    for name, folder, semi in variants:
        print(f"loading {name} in a fresh process ...", flush=True)
        spec = {
            "name": name,
            "folder": str(folder),
            "dtype": dtype,
            "device": args.device,
            "semi_structured": semi,
            "compile": args.compile,
            "batch_sizes": args.batch_sizes,
            "lengths": args.lengths,
            "new_tokens": args.new_tokens,
        }
        result = {"variant": name, "file_bytes": _bytes(folder), **run_worker(spec), "rows": []}
        result["file_ratio"] = result["file_bytes"] / dense_bytes
        result["speedup_expected"] = EXPECTATION[name]
        results.append(result)
        models[name] = _load(spec)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    for batch in args.batch_sizes:
        for length in args.lengths:
            print(f"timing batch {batch}, length {length} (variants take turns) ...", flush=True)
            rates = interleaved_timings(models, batch, length, args.new_tokens, args.repeats)
            for result in results:
                model = models[result["variant"]]
                sparse = frozenset(result["info"].get("semi_structured", {}).get("converted", []))
                context = length + args.new_tokens // 2
                result["rows"].append(
                    {
                        "batch": batch,
                        "length": length,
                        **rates[result["variant"]],
                        "flops_per_token": flops_per_token(model, context, sparse),
                    }
                )
    _report(args, dtype, results)


def _report(args: argparse.Namespace, dtype: str, results: list[dict]) -> None:
    dense = {(r["batch"], r["length"]): r for r in results[0]["rows"]}
    summary, speed = [], []
    for result in results:
        summary.append(
            {
                "variant": result["variant"],
                "file MB": result["file_bytes"] / 1e6,
                "x dense file": result["file_ratio"],
                "load s": result["load_s"],
                "peak MB": result["peak_mb"],
                "compile": result["info"].get("compile", "off"),
            }
        )
        for row in result["rows"]:
            base = dense[(row["batch"], row["length"])]
            row["prefill_speedup"] = row["prefill_tok_s"] / base["prefill_tok_s"]
            row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["flop_bound"] = base["flops_per_token"] / row["flops_per_token"]
            speed.append(
                {
                    "variant": result["variant"],
                    "batch": row["batch"],
                    "length": row["length"],
                    "prefill tok/s": row["prefill_tok_s"],
                    "prefill x": row["prefill_speedup"],
                    "decode tok/s": row["decode_tok_s"],
                    "decode x": row["decode_speedup"],
                    "FLOP bound": row["flop_bound"],
                }
            )
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    where = f"{args.device}, {dtype} compute, {threads} threads"
    print(f"\nfiles ({args.file_dtype}) and load ({where}; peak: {results[0]['peak_kind']})")
    print(format_table(summary, list(summary[0])))
    print(f"\ntokens/s, median of {args.repeats} runs, {args.new_tokens} decoded tokens ({where})")
    print(format_table(speed, list(speed[0])))
    print("\nwhere a speed-up is expected:")
    for result in results:
        print(f"- {result['variant']}: {result['speedup_expected']}")
    write_json(
        Path(args.output),
        {
            "config": {k: v for k, v in vars(args).items() if k != "worker"},
            "compute_dtype": dtype,
            "torch": torch.__version__,
            "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "2")),
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else "cpu",
            "results": results,
        },
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
