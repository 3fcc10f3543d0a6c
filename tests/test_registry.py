"""The plugin registry against real installed distributions (built and installed by the test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_prune.registry import PluginError, get_registry

FIXTURES = Path(__file__).parent / "fixtures" / "plugins"
CLI = [sys.executable, "-c", "from lightning_prune.cli import main; main()"]


def install(packages: list[str], target: Path) -> dict[str, str]:
    """pip-install fixture distributions into ``target``; return an env that sees them."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            *(str(FIXTURES / p) for p in packages),
        ],
        check=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory) -> dict[str, str]:
    plugins = ["lp-demo-plugin", "lp-broken-plugin", "lp-format-plugin"]
    return install(plugins, tmp_path_factory.mktemp("site-demo"))


@pytest.fixture(scope="module")
def clash_env(tmp_path_factory) -> dict[str, str]:
    return install(["lp-clash-plugin"], tmp_path_factory.mktemp("site-clash"))


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def test_builtins_register_through_entry_points() -> None:
    registry = get_registry()
    assert registry.info("solvers", "proximal").distribution == "lightning-prune"
    assert {"llama", "gpt2", "gemma3"} <= set(registry.names("adapters"))
    assert registry.get("mask_families", "nm").__name__ == "NMMaskFamily"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(PluginError, match=r"unknown solvers plugin 'nope'.*proximal"):
        get_registry().info("solvers", "nope")


def test_plugins_command_lists_third_party_and_broken(demo_env) -> None:
    result = run_cli(["plugins"], demo_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    demo = next(line for line in lines if "l1_surrogate" in line)
    assert "lp-demo-plugin" in demo and "0.3.0" in demo and demo.rstrip().endswith("ok")
    broken = next(line for line in lines if "broken_solver" in line)
    assert "BROKEN" in broken and "needs a library that is not installed" in broken
    assert any("proximal" in line and "lightning-prune" in line for line in lines)
    formats = {line.split()[1]: line for line in lines if line.split()[:1] == ["exporters"]}
    assert {"hf", "compressed-nm", "mask-report"} <= set(formats)
    assert "lightning-prune" in formats["hf"] and "lp-format-plugin" in formats["mask-report"]


def test_broken_plugin_does_not_break_other_commands(demo_env) -> None:
    result = run_cli(["fit", "--help"], demo_env)
    assert result.returncode == 0, result.stderr
    assert "--model.solver" in result.stdout


def test_third_party_plugin_resolves_by_short_name(demo_env) -> None:
    args = [
        "fit",
        "--model.mask_family=nm",
        "--model.solver=proximal",
        "--model.regularizers+=l1_surrogate",
        "--print_config",
    ]
    result = run_cli(args, demo_env)
    assert result.returncode == 0, result.stderr
    assert "lp_demo_plugin.L1Surrogate" in result.stdout
    assert "lightning_prune.solvers.proximal.ProximalSolver" in result.stdout


def test_name_clash_is_reported_not_resolved(clash_env) -> None:
    listing = run_cli(["plugins"], clash_env)
    assert listing.returncode == 0
    clash = [
        line for line in listing.stdout.splitlines() if line.split()[:2] == ["mask_families", "nm"]
    ]
    assert len(clash) == 2 and all("CONFLICT" in line for line in clash)
    result = run_cli(
        ["fit", "--model.mask_family=nm", "--model.solver=proximal", "--print_config"], clash_env
    )
    assert result.returncode != 0
    assert "claimed by several distributions" in result.stderr + result.stdout


def test_top_level_help_lists_every_command(capsys) -> None:
    from lightning_prune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    usage = out.splitlines()[0]
    out = " ".join(out.split())  # help text is wrapped to the terminal width
    assert "{fit,validate,export,evaluate}" in usage  # test / predict have nothing to run here
    for command in ("plugins", "report", "recover", "lm-eval"):
        assert f"{command} (" in out, command
