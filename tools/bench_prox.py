"""Time of the N:M prox per implementation, against a plain AdamW step on the same weight.

For every Linear shape ``[out, in]`` and every prox backend of the device (CPU: ``native`` (2:4)
and ``torch``; CUDA: ``torch`` and ``compiled``): the median over ``--repeats`` calls of
``nm_prox(W, lam, n, m, backend=...)`` on a N(0, 0.02) weight with the scale-free λ of the
``nm_sparsity`` regularizer (``lam / rms(W)^(n-1)``), next to the median of one AdamW step of
the same tensor (default torch implementation, random gradient) and their ratio.  The first
call of each backend (the compilation, for ``compiled``) is timed apart.  Every backend's result
is compared with the first backend's: largest entry difference and largest per-group objective
gap (relative to ``1 + |z_g|^2``).  Shapes that would not fit in the free memory are skipped.
Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python tools/bench_prox.py --device cpu --shapes 576x1536
    python tools/bench_prox.py --device cuda --output bench_results/prox_cuda.json

A device check can import ``measure_prox_share(shape, device, ...)`` (one shape, one dict).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_prune.evaluation import format_table, write_json
from lightning_prune.ops import nm_prox_native
from lightning_prune.ops.nm_prox import elementary_symmetric, nm_prox
from lightning_prune.ops.nm_prox_torch import compile_failure

SHAPES = {
    "cpu": [(576, 1536), (2048, 8192)],  # SmolLM2-135M MLP, ~1B MLP
    "cuda": [(576, 1536), (2048, 8192), (4096, 14336)],  # + Llama-3-8B MLP
}
BYTES_PER_ENTRY = 4 * 24  # weight, gradient, 2 AdamW moments, prox temporaries (float32)
COLUMNS = ["shape", "backend", "prox_ms", "adamw_ms", "prox/adamw", "first_call_s", "max_diff"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", help="OUTxIN (default: per device)")
    parser.add_argument("--backends", nargs="+", choices=["native", "torch", "compiled"])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--lam", type=float, default=0.1, help="scale-free λ")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="bench_results/prox.json")
    return parser.parse_args()


def default_backends(device: torch.device, n: int, m: int) -> list[str]:
    """The backends worth timing on ``device``: what ``auto`` picks, and the eager torch path."""
    if device.type == "cuda":
        return ["torch", "compiled"]
    if (n, m) == (2, 4) and nm_prox_native.kernel() is not None:
        return ["native", "torch"]
    return ["torch"]


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CPU: MemAvailable of /proc/meminfo, else unknown: huge)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def adamw_step_time(weight: torch.Tensor, repeats: int) -> float:
    """Median seconds of one ``torch.optim.AdamW`` step of a copy of ``weight``."""
    param = torch.nn.Parameter(weight.clone())
    param.grad = torch.randn_like(param) * 1e-3
    opt = torch.optim.AdamW([param], lr=1e-4)
    opt.step()  # creates the moments
    return _median_time(opt.step, weight.device, repeats)


def _group_objective(w: torch.Tensor, z: torch.Tensor, lam: float, n: int, m: int):
    w_g, z_g = w.double().reshape(-1, m), z.double().reshape(-1, m)
    pen = elementary_symmetric(w_g.abs(), n + 1)
    return 0.5 * ((w_g - z_g) ** 2).sum(-1) + lam * pen, 1.0 + (z_g**2).sum(-1)


def measure_prox_share(
    shape: tuple[int, int],
    device: str | torch.device,
    backends: list[str] | None = None,
    n: int = 2,
    m: int = 4,
    lam: float = 0.1,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    """Prox time per backend and AdamW step time for one ``[out, in]`` weight on ``device``.

    Returns ``{"shape", "device", "n", "m", "lam", "adamw_s", "backends": {name: {"median_s",
    "ratio_to_adamw", "first_call_s", "max_abs_diff", "max_objective_gap", "compile_failure"}}}``,
    or ``{"shape", "device", "skipped": reason}`` when the shape does not fit in memory.
    """
    device = torch.device(device)
    need = shape[0] * shape[1] * BYTES_PER_ENTRY
    if need > free_bytes(device):
        return {"shape": list(shape), "device": str(device), "skipped": f"needs ~{need >> 20} MiB"}
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * 0.02).to(device)
    lam_abs = lam / float(weight.pow(2).mean().sqrt()) ** (n - 1)
    result = {"shape": list(shape), "device": str(device), "n": n, "m": m, "lam": lam}
    result["adamw_s"] = adamw_step_time(weight, repeats)
    ref = None
    result["backends"] = {}
    for backend in backends or default_backends(device, n, m):

        def call(backend: str = backend) -> torch.Tensor:
            return nm_prox(weight, lam_abs, n, m, backend=backend)

        first = _timed(call, device)
        median = _median_time(call, device, repeats)
        out = call()
        ref = out if ref is None else ref
        obj, scale = _group_objective(out, weight, lam_abs, n, m)
        obj_ref, _ = _group_objective(ref, weight, lam_abs, n, m)
        result["backends"][backend] = {
            "median_s": median,
            "ratio_to_adamw": median / result["adamw_s"],
            "first_call_s": first,
            "max_abs_diff": float((out - ref).abs().max()),
            "max_objective_gap": float(((obj - obj_ref) / scale).max()),
            "compile_failure": compile_failure() if backend == "compiled" else None,
        }
    return result


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        shape = "x".join(map(str, res["shape"]))
        if "skipped" in res:
            rows.append({"shape": shape, "backend": f"skipped ({res['skipped']})"})
            continue
        for name, b in res["backends"].items():
            rows.append(
                {
                    "shape": shape,
                    "backend": name + (" (fell back)" if b["compile_failure"] else ""),
                    "prox_ms": 1e3 * b["median_s"],
                    "adamw_ms": 1e3 * res["adamw_s"],
                    "prox/adamw": b["ratio_to_adamw"],
                    "first_call_s": b["first_call_s"],
                    "max_diff": f"{b['max_abs_diff']:.1e}",
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else None
    results = []
    for shape in shapes or SHAPES[device.type]:
        options = {"n": args.n, "m": args.m, "lam": args.lam, "repeats": args.repeats}
        results.append(measure_prox_share(shape, device, args.backends, **options))
        print(f"done {shape}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    print(format_table(table_rows(results), COLUMNS))
    write_json(args.output, {"meta": meta, "results": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
