"""Native CPU kernel of the 2:4 prox: build, load and run ``csrc/nm_prox24.c``.

The C source ships inside the package.  On first use it is compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``; ``-march=native`` first, portable flags if that fails)
into a temporary directory and loaded through ``ctypes``, once per process.  The loaded kernel
must agree with the vectorised torch path on a small problem before it is used.  If anything
fails, ``kernel()`` returns None and warns once; ``LIGHTNING_PRUNE_NM_NATIVE=0`` disables it
without a warning.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import torch
from torch import Tensor

from lightning_prune.ops.nm_prox_torch import WARMUP_DAMPING, WARMUP_ITERS, prox_groups

NATIVE_ENV = "LIGHTNING_PRUNE_NM_NATIVE"
SOURCE = "nm_prox24.c"  # under lightning_prune/ops/csrc/
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_GROUPS_PER_THREAD = 32768
_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": callable | None, "reason": str
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (pid, workers): a forked child must not reuse the pool


# --------------------------------------------------------------------------------------------
# build and load
# --------------------------------------------------------------------------------------------
def _compiler() -> str | None:
    found = (shutil.which(name) for name in ("cc", "gcc", "clang"))
    return os.environ.get("CC") or next((path for path in found if path), None)


def _compile(cc: str, src: str, lib_path: str) -> str:
    """Compile ``src`` into the shared library ``lib_path``; return "" or the errors."""
    base = ["-O3", "-std=c99", "-fno-math-errno", "-shared", "-fPIC"]
    defines = [f"-DWARM_ITERS={WARMUP_ITERS}", f"-DWARM_DAMP={WARMUP_DAMPING!r}f"]
    errors = []
    for extra in (["-march=native"], []):
        cmd = [cc, *base, *defines, *extra, src, "-o", lib_path, "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
            continue
        if res.returncode == 0:
            return ""
        errors.append(res.stderr.strip()[-500:])
    return " | ".join(errors)


def _bind(lib: ctypes.CDLL):
    """The kernel's entry point with its ctypes signature (keeps ``lib`` alive)."""
    fn = lib.lp_nm_prox24_f32
    fn.restype = None
    i64 = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64,
        ctypes.c_void_p, i64, i64, ctypes.c_int32, ctypes.c_float,
    ]  # fmt: skip
    fn._lp_lib = lib  # type: ignore[attr-defined]  # ctypes stubs forbid extra attributes
    return fn


def _build() -> tuple[object | None, str]:
    """Compile and load the C kernel; return ``(function, "")`` or ``(None, reason)``."""
    if os.environ.get(NATIVE_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {NATIVE_ENV}"
    if sys.platform.startswith("win"):
        return None, "native kernel not supported on Windows"
    cc = _compiler()
    if not cc:
        return None, "no C compiler found"
    source = resources.files("lightning_prune.ops").joinpath("csrc", SOURCE)
    if not source.is_file():
        return None, f"C source {SOURCE} missing from the installed package"
    with (
        resources.as_file(source) as src,
        tempfile.TemporaryDirectory(prefix="lightning_prune_nm_") as tmp,
    ):
        lib_path = os.path.join(tmp, "nm_prox24.so")
        errors = _compile(cc, str(src), lib_path)
        if errors:
            return None, "compilation failed: " + errors
        try:
            lib = ctypes.CDLL(lib_path)  # the mapping outlives the deleted file
        except OSError as err:
            return None, f"could not load compiled kernel: {err}"
    fn = _bind(lib)
    if not _self_check(fn):
        return None, "self-check against the vectorised torch implementation failed"
    return fn, ""


def kernel() -> object | None:
    """The loaded native kernel, or None (building it on first use, warning once on failure)."""
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                fn, reason = _build()
                _state["fn"], _state["reason"] = fn, reason
                if fn is None and not reason.startswith("disabled"):
                    warnings.warn(
                        f"nm_prox: native 2:4 kernel unavailable ({reason}); "
                        "using the slower vectorised torch path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _state["fn"]


def unavailable_reason() -> str:
    """Why ``kernel()`` is None ("" when it is loaded or not built yet)."""
    return str(_state.get("reason", ""))


def _self_check(fn) -> bool:
    """Compare the kernel's objective with the torch implementation on a small random problem."""
    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(37, 4 * 45, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    lam = torch.rand(37, 1, generator=gen) * 3
    g = z.view(37, 45, 4)
    ref = prox_groups(g.reshape(-1, 4), lam.repeat_interleave(45), 2, 100, 1e-8).view_as(g)
    got = torch.empty_like(g)
    fn(g.data_ptr(), got.data_ptr(), 0, 37 * 45, 45, lam.data_ptr(), 1, 0, 100, 1e-8)

    def obj(w: Tensor) -> Tensor:
        w = w.double().abs()
        a0, a1, a2, a3 = w.unbind(-1)
        pen = a0 * a1 * (a2 + a3) + a2 * a3 * (a0 + a1)
        return 0.5 * ((w - g.double().abs()) ** 2).sum(-1) + lam.double() * pen

    scale = (g.double() ** 2).sum(-1) + 1e-12
    signs_ok = bool(((got * g) >= 0).all())
    return signs_ok and bool(((obj(got) - obj(ref)).abs() <= 1e-5 * scale).all())


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads (rebuilt after a fork or a size change)."""
    global _pool, _pool_key
    with _lock:
        key = (os.getpid(), workers)
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool, _pool_key = ThreadPoolExecutor(workers, "nm_prox"), key
        return _pool


def _run(
    fn: Callable[..., None], src: Tensor, dst: Tensor, lam2d: Tensor, max_sweeps: int, tol: float
) -> None:
    """Run the kernel on contiguous fp32 ``src``/``dst`` ``[R, C, 4]``; ``lam2d`` is ``[R, C]``."""
    rows, c_groups = src.shape[0], src.shape[1]
    for t in (src, dst, lam2d):  # raw pointers below: insist on the layout the C code assumes
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise RuntimeError(
                f"native nm_prox kernel needs float32 CPU tensors, got {t.dtype} on {t.device} "
                f"(shape {tuple(t.shape)})"
            )
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise RuntimeError(
            f"native nm_prox kernel needs contiguous [rows, cols // 4, 4] tensors, got shape "
            f"{tuple(src.shape)} with strides {src.stride()} -> {dst.stride()}"
        )
    total = rows * c_groups
    if total == 0:
        return
    ls0, ls1 = lam2d.stride()
    args = (src.data_ptr(), dst.data_ptr())
    tail = (c_groups, lam2d.data_ptr(), ls0, ls1, int(max_sweeps), float(tol))
    nthreads = max(1, min(torch.get_num_threads(), total // _MIN_GROUPS_PER_THREAD))
    if nthreads == 1:
        fn(*args, 0, total, *tail)
        return
    pool = _thread_pool(nthreads)
    step = -(-total // nthreads)
    step = -(-step // 32) * 32
    futures = [
        pool.submit(fn, *args, g, min(g + step, total), *tail) for g in range(0, total, step)
    ]
    for fut in futures:
        fut.result()


def prox24(fn, z: Tensor, lam_g: Tensor, max_sweeps: int, tol: float, out: Tensor | None) -> Tensor:
    """2:4 prox of a CPU float32/bf16/fp16 ``z`` through the kernel ``fn``; ``lam_g`` has the
    per-group shape ``[..., cols // 4]``.  Writes ``out`` if given, never modifies ``z``."""
    c_groups = z.shape[-1] // 4
    rows = z.numel() // max(z.shape[-1], 1)
    lam2d = lam_g.reshape(rows, c_groups)
    if z.dtype == torch.float32 and z.is_contiguous():
        src = z
        if (
            out is not None
            and out.dtype == torch.float32
            and out.is_contiguous()
            and out.shape == z.shape
        ):
            dst = out
        else:
            dst = torch.empty_like(z, memory_format=torch.contiguous_format)
    else:
        src = z.to(torch.float32).contiguous()
        if src.data_ptr() == z.data_ptr():  # never write into the caller's tensor
            src = src.clone()
        dst = src
    _run(fn, src.view(rows, c_groups, 4), dst.view(rows, c_groups, 4), lam2d, max_sweeps, tol)
    if out is not None:
        return out if dst is out else out.copy_(dst)
    return dst.to(z.dtype)
