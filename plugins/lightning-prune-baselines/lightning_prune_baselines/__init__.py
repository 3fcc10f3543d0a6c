"""One-shot pruning baselines for lightning-prune, registered through entry points only.

N:M / unstructured (``nm`` family): ``wanda``, ``sparsegpt`` (the core ships ``magnitude``).
Uniform structured (``uniform_structured`` family): ``magnitude_structured``, ``wanda_sp``,
``flap``. Solver: ``oneshot`` (zero training steps: the ``init_mask`` is the result).
"""

__version__ = "0.1.0"
