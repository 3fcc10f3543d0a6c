"""Export formats as plugins (``lightning_prune.exporters``): the built-ins, refusals that list
the formats that would work, and a third-party format (a fixture distribution) used by
``run_export``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from test_registry import install

from lightning_prune.commands import run_export
from lightning_prune.errors import ConfigError
from lightning_prune.export.base import exporter_for, exporters
from lightning_prune.export.compressed import CompressedNMExporter
from lightning_prune.export.hf import HFExporter
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.masks.structured import UniformStructuredFamily
from lightning_prune.module import PruningModule
from lightning_prune.registry import get_registry
from lightning_prune.solvers.minimax import MinimaxSolver
from lightning_prune.solvers.proximal import ProximalSolver


@pytest.fixture()
def format_plugin(tmp_path_factory, monkeypatch) -> Iterator[None]:
    """``lp-format-plugin`` (format ``mask-report``, N:M families) installed in this process."""
    target = tmp_path_factory.mktemp("site-format")
    install(["lp-format-plugin"], target)
    monkeypatch.syspath_prepend(str(target))
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()  # the next registry is read without the fixture's folder


def structured() -> UniformStructuredFamily:
    return UniformStructuredFamily(keep_channels=0.5)


def test_builtin_formats_register_through_entry_points() -> None:
    assert get_registry().info("exporters", "hf").distribution == "lightning-prune"
    found = exporters()
    assert isinstance(found["hf"], HFExporter)
    assert isinstance(found["compressed-nm"], CompressedNMExporter)
    assert found["compressed-nm"].casts_dtype and not found["hf"].casts_dtype


def test_each_format_says_which_families_it_writes() -> None:
    assert isinstance(exporter_for("hf", NMMaskFamily(2, 4)), HFExporter)
    assert isinstance(exporter_for("hf", structured()), HFExporter)  # its own sliced writer
    assert isinstance(exporter_for("compressed-nm", NMMaskFamily(2, 4)), CompressedNMExporter)


def test_unsupported_family_is_refused_before_any_work(tmp_path) -> None:
    module = PruningModule(structured(), MinimaxSolver(), model="unused")  # never loaded
    message = (
        r"--format compressed-nm does not support mask family UniformStructuredFamily; "
        r"formats that do: hf \(lightning-prune plugins"
    )
    with pytest.raises(ConfigError, match=message):
        run_export(module, str(tmp_path / "x.ckpt"), str(tmp_path / "out"), "compressed-nm", False)
    assert not (tmp_path / "out").exists()


def test_unknown_format_lists_the_family_s_formats() -> None:
    message = r"--format: unknown export format 'gguf'; formats for mask family NMMaskFamily: "
    with pytest.raises(ConfigError, match=message + "compressed-nm, hf"):
        exporter_for("gguf", NMMaskFamily(2, 4))


def test_a_third_party_format_is_used_by_run_export(format_plugin, tiny_models, tmp_path) -> None:
    model = tiny_models["llama"]
    source = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), model=model)
    source.configure_model()
    source.apply_initializer("magnitude")
    checkpoint = {"state_dict": source.state_dict()}
    source.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "fit.ckpt")

    module = PruningModule(NMMaskFamily(2, 4), ProximalSolver(), model=model)
    out = run_export(
        module,
        str(tmp_path / "fit.ckpt"),
        str(tmp_path / "report"),
        "mask-report",
        False,
        {"run": "test"},
    )
    record = json.loads((out / "mask-report.json").read_text())
    assert record["mask_family"] == "NMMaskFamily" and record["config"] == {"run": "test"}
    assert record["sparsity"] == pytest.approx(source.mask_family.sparsity_report())
    assert set(record["sparsity"]) == set(source.mask_family.targets())
    with pytest.raises(
        ConfigError,
        match="--format mask-report does not support mask family "
        "UniformStructuredFamily; formats that do: hf ",
    ):
        exporter_for("mask-report", structured())
    with pytest.raises(ConfigError, match="NMMaskFamily: compressed-nm, hf, mask-report "):
        exporter_for("gguf", NMMaskFamily(2, 4))
