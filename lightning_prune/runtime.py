"""Inference-time conversions of a loaded model: CUDA 2:4 semi-structured Linears, torch.compile.

:func:`semi_structured_plan` decides, on any device, which Linears qualify for
``torch.sparse.to_sparse_semi_structured`` (2:4 pattern, float16/bfloat16, the kernel's shape
multiples) and why the others do not; :func:`to_semi_structured` converts them on CUDA.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lightning_prune.errors import ConfigError
from lightning_prune.ops.nm_prox import is_nm

if TYPE_CHECKING:
    from torch.sparse import SparseSemiStructuredTensor

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_backend() -> type[SparseSemiStructuredTensor]:
    """The sparse tensor class ``to_sparse_semi_structured`` builds (cuSPARSELt, else CUTLASS)."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = cusparselt is not None and cusparselt.is_available()
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not available:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def semi_structured_plan(
    model: nn.Module,
    names: list[str] | None = None,
    backend: type[SparseSemiStructuredTensor] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Linears that qualify for 2:4 semi-structured conversion, and ``{name: reason}`` for the
    others among ``names`` (default: every Linear but the output head)."""
    backend = backend or semi_structured_backend()
    if names is None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        names = [
            n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not head
        ]
    eligible, skipped = [], {}
    for name in names:
        module = model.get_submodule(name)
        weight = cast(torch.Tensor, module.weight)
        if not isinstance(module, nn.Linear):
            skipped[name] = f"{type(module).__name__} is not nn.Linear (weights stored [in, out])"
        elif weight.dtype not in SEMI_STRUCTURED_DTYPES:
            skipped[name] = f"dtype {weight.dtype} (the 2:4 kernels take float16 or bfloat16)"
        elif not _fits(weight.shape, backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]):
            limits = backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
            skipped[name] = (
                f"shape {tuple(weight.shape)} is not a multiple of ({limits.sparse_min_rows}, "
                f"{limits.sparse_min_cols}) for {backend.BACKEND}"
            )
        elif not is_nm(weight.detach(), 2, 4):
            skipped[name] = "weight is not 2:4 sparse"
        else:
            eligible.append(name)
    return eligible, skipped


def _fits(shape: torch.Size, limits: Any) -> bool:
    rows, cols = shape
    return rows % limits.sparse_min_rows == 0 and cols % limits.sparse_min_cols == 0


def to_semi_structured(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """Replace qualifying 2:4 Linear weights by semi-structured sparse tensors (CUDA only).

    Returns ``{"backend", "converted": [...], "skipped": {name: reason}}``.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ConfigError(
            f"semi_structured: needs the model on a CUDA device (to_sparse_semi_structured "
            f"runs on CUDA only), got {device}"
        )
    from torch.sparse import to_sparse_semi_structured

    backend = semi_structured_backend()
    eligible, skipped = semi_structured_plan(model, names, backend)
    for name in eligible:
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear)  # the plan makes only Linears eligible
        sparse = to_sparse_semi_structured(module.weight.detach())
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return {"backend": backend.BACKEND, "converted": eligible, "skipped": skipped}


def compile_model(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> str:
    """Wrap ``model.forward`` in ``torch.compile`` and compile it once on a short probe.

    Returns ``"compiled (<backend>)"``, or ``"eager (<reason>)"`` with a warning when compilation
    is unavailable or fails (the model is then left as it was).
    """
    eager = model.forward
    try:
        compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=True)
        device = next(model.parameters()).device
        probe = torch.zeros(2, 8, dtype=torch.long, device=device)  # sizes 0/1 specialise
        with torch.no_grad():
            compiled(input_ids=probe)
    except Exception as err:  # any compiler failure means: run eager
        torch._dynamo.reset()
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"torch.compile unavailable, running eager ({reason})", stacklevel=2)
        return f"eager ({reason})"
    model.forward = compiled
    return f"compiled ({backend})"
