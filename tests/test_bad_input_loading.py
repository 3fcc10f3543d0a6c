"""Model folders, corpora and plugins that would hang, exhaust memory, run foreign code or end
in a library traceback: each gets one clear error naming the file or field (exit status 2, no
traceback unless ``--debug``), and every existing file stays byte-identical.

Cases (27), each a real in-process ``lightning-prune fit`` on a copy of the tiny model:
  sizes    1 no hidden_size              2 no num_hidden_layers        3 no vocab_size
           4 no intermediate_size
  corpus   5 a FIFO                      6 a link to /dev/zero         7 a folder with a link to
                                                                         /dev/urandom
           8 a file above the limit      9 a folder above the limit
  code    10 auto_map in config.json    11 auto_map in tokenizer_config.json
  records 12 JSONL null                 13 JSONL number               14 JSONL object
          15 JSONL array                16 parquet null cell          17 parquet int column
  files   18 truncated model.safetensors 19 tokenizer.json not JSON   20 tokenizer.json not a
                                                                         tokenizer
          21 tokenizer_config.json not JSON 22 config.json not JSON (not "the hub")
          23 config.json a list         24 config.json field of the wrong type
          25 '.parquet' that is not parquet 26 model path is a file   27 recover from an export
                                                                         whose pruning.json is
                                                                         not JSON
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from snapshots import snapshot

from lightning_prune.cli import main
from lightning_prune.errors import DEBUG_ENV
from lightning_prune.models.loading import ModelLoadError, refuse_custom_code

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"
PLUGINS = Path(__file__).parent / "fixtures" / "plugins"
TEXT = "\n\n".join(f"Document {i} is about topic {i % 5} and says a few words." * 4
                   for i in range(40))


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[str, Path], list[str]]
    expected: tuple[str, ...]
    absent: tuple[str, ...] = ()


def fit_args(model: str | Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--config={CONFIG}", f"--model.model={model}", "--model.init_mask=null",
        "--data.seq_len=32", "--data.num_samples=2", "--data.eval_tokens=64",
        f"--trainer.default_root_dir={tmp / 'run'}", "--trainer.enable_progress_bar=false",
        *extra,
    ]


def model_change(change: Callable[[Path], None]) -> Callable[[str, Path], list[str]]:
    def build(model: str, tmp: Path) -> list[str]:
        folder = tmp / "model"
        shutil.copytree(model, folder)
        change(folder)
        (tmp / "c.txt").write_text(TEXT)
        return fit_args(folder, tmp, f"--data.source={tmp / 'c.txt'}")

    return build


def corpus(make: Callable[[Path], Path], *extra: str) -> Callable[[str, Path], list[str]]:
    def build(model: str, tmp: Path) -> list[str]:
        return fit_args(model, tmp, f"--data.source={make(tmp)}", *extra)

    return build


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        value = json.loads((folder / name).read_text())
        change(value)
        (folder / name).write_text(json.dumps(value))

    return apply


def drop(field: str) -> Callable[[Path], None]:
    def apply(config: dict) -> None:
        del config[field]

    return edit_json("config.json", apply)


def write(name: str, content: bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(content)

    return apply


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:keep])

    return apply


def fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "c.txt")
    return tmp / "c.txt"


def link_to(device: str, name: str = "z.txt") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).symlink_to(device)
        return tmp / name

    return make


def folder_with_device(tmp: Path) -> Path:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "a.txt").write_text(TEXT)
    (tmp / "docs" / "r.txt").symlink_to("/dev/urandom")
    return tmp / "docs"


def text_file(tmp: Path) -> Path:
    (tmp / "c.txt").write_text(TEXT)
    return tmp / "c.txt"


def text_folder(tmp: Path) -> Path:
    (tmp / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp / "docs" / name).write_text(TEXT[:1500])
    return tmp / "docs"


def jsonl(value: object) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        lines = [{"text": "A first document that is fine."}, {"text": value}]
        (tmp / "c.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        return tmp / "c.jsonl"

    return make


def parquet(values: list, kind: pa.DataType) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        pq.write_table(pa.table({"text": pa.array(values, type=kind)}), tmp / "c.parquet")
        return tmp / "c.parquet"

    return make


def not_parquet(tmp: Path) -> Path:
    (tmp / "c.parquet").write_text(TEXT)
    return tmp / "c.parquet"


def model_is_file(model: str, tmp: Path) -> list[str]:
    (tmp / "model.bin").write_bytes(b"weights?")
    (tmp / "c.txt").write_text(TEXT)
    return fit_args(tmp / "model.bin", tmp, f"--data.source={tmp / 'c.txt'}")


def recover_bad_record(model: str, tmp: Path) -> list[str]:
    export = tmp / "export"
    shutil.copytree(model, export)
    (export / "pruning.json").write_text('{"pattern": "2:4",')
    return [
        "recover", f"--model.export_dir={export}", f"--model.output_dir={tmp / 'out'}",
        "--model.method=full", f"--trainer.default_root_dir={tmp / 'run'}",
    ]


AUTO_MAP = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
TOKENIZER_MAP = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}

CASES = [
    Case("config-no-hidden-size", model_change(drop("hidden_size")),
         ("config.json", "does not state hidden_size", "explicitly")),
    Case("config-no-layers", model_change(drop("num_hidden_layers")),
         ("config.json", "num_hidden_layers")),
    Case("config-no-vocab", model_change(drop("vocab_size")), ("config.json", "vocab_size")),
    Case("config-no-intermediate", model_change(drop("intermediate_size")),
         ("config.json", "intermediate_size")),
    Case("source-fifo", corpus(fifo), ("data.source", "c.txt", "named pipe (FIFO)")),
    Case("source-dev-zero", corpus(link_to("/dev/zero")),
         ("data.source", "z.txt", "/dev/zero", "character device", "regular")),
    Case("source-folder-urandom", corpus(folder_with_device),
         ("data.source", "r.txt", "/dev/urandom", "character device")),
    Case("source-too-large", corpus(text_file, "--data.max_source_bytes=1000"),
         ("data.source", "c.txt", "above the limit of 1000 bytes", "data.max_source_bytes")),
    Case("source-folder-too-large", corpus(text_folder, "--data.max_source_bytes=2000"),
         ("data.source", "docs", "above the limit of 2000 bytes")),
    Case("auto-map-config",
         model_change(edit_json("config.json", lambda c: c.update(auto_map=AUTO_MAP))),
         ("config.json", "auto_map", "does not run code", "trust_remote_code")),
    Case("auto-map-tokenizer",
         model_change(edit_json("tokenizer_config.json",
                                lambda c: c.update(auto_map=TOKENIZER_MAP))),
         ("tokenizer_config.json", "auto_map", "does not run code")),
    Case("jsonl-null", corpus(jsonl(None)),
         ("data.text_column", "c.jsonl line 2", "'text' is null", "expected a string")),
    Case("jsonl-number", corpus(jsonl(42)), ("c.jsonl line 2", "a number (42)")),
    Case("jsonl-object", corpus(jsonl({"body": "hi"})), ("c.jsonl line 2", "an object")),
    Case("jsonl-array", corpus(jsonl(["a", "b"])), ("c.jsonl line 2", "an array")),
    Case("parquet-null", corpus(parquet(["fine text", None], pa.string())),
         ("c.parquet row 2", "null", "expected a string")),
    Case("parquet-numbers", corpus(parquet([1, 2], pa.int64())),
         ("c.parquet row 1", "a number (1)")),
    Case("safetensors-truncated", model_change(truncate("model.safetensors", 100_000)),
         ("model.safetensors", "not a readable safetensors file", "truncated")),
    Case("tokenizer-json-not-json", model_change(truncate("tokenizer.json", 5000)),
         ("tokenizer.json", "not valid JSON")),
    Case("tokenizer-json-not-a-tokenizer",
         model_change(write("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE"}}')),
         ("tokenizer.json", "not a valid tokenizers file")),
    Case("tokenizer-config-not-json", model_change(write("tokenizer_config.json", b"{oops")),
         ("tokenizer_config.json", "not valid JSON")),
    Case("config-not-json", model_change(write("config.json", b'{"model_type": "llama",')),
         ("config.json", "not valid JSON"), ("hub",)),
    Case("config-a-list", model_change(write("config.json", b"[1, 2]")),
         ("config.json", "JSON list, expected an object")),
    Case("config-wrong-type",
         model_change(edit_json("config.json", lambda c: c.update(hidden_size="big"))),
         ("config.json", "hidden_size", "expected int"), ("hub",)),
    Case("parquet-not-parquet", corpus(not_parquet),
         ("data.source", "c.parquet", "not a readable parquet file")),
    Case("model-path-is-file", model_is_file, ("model.bin", "is a file, expected a model folder")),
    Case("recover-bad-pruning-json", recover_bad_record,
         ("model.export_dir", "pruning.json", "not valid JSON")),
]


def test_case_count_is_visible() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case, small_model, tmp_path, capsys) -> None:
    args = case.args(small_model, tmp_path)
    before = snapshot(Path(small_model), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    for expected in case.expected:
        assert expected in err, f"{case.id}: {expected!r} not in:\n{err[-2000:]}"
    for absent in case.absent:
        assert absent not in err.split("lightning-prune: error:")[-1], err[-2000:]
    assert "Traceback" not in err
    after = snapshot(Path(small_model), tmp_path)
    assert {path: after.get(path) for path in before} == before  # nothing changed or deleted
    new = set(after) - set(before)  # the refused run's own log folder (config.yaml) at most
    assert all(path.startswith(str(tmp_path / "run")) for path in new), new
    assert not list(tmp_path.rglob("*.ckpt"))


def test_debug_flag_shows_the_traceback(small_model, tmp_path, capsys) -> None:
    args = corpus(jsonl(None))(small_model, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--debug", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" in err and "DataSourceError" in err
    assert err.rstrip().splitlines()[-1].startswith("lightning-prune: error: data.text_column")


def test_debug_variable_shows_the_library_error(small_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(SystemExit) as exit_info:
        main(model_change(truncate("model.safetensors", 100_000))(small_model, tmp_path))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" in err and "SafetensorError" in err and "ModelLoadError" in err


def test_debug_flag_reaches_report(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--debug", "report", str(tmp_path / "missing"), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err and "ReportError" in err


def test_custom_code_runs_only_when_asked(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": AUTO_MAP}))
    refuse_custom_code(tmp_path, trust_remote_code=True)  # the explicit opt-in
    with pytest.raises(ModelLoadError, match="auto_map"):
        refuse_custom_code(tmp_path, trust_remote_code=False)


# -- plugins whose import hangs or calls sys.exit ----------------------------------------------


@pytest.fixture(scope="module")
def bad_plugins_env(tmp_path_factory) -> dict[str, str]:
    """An environment that sees the hanging and the exiting fixture plugins."""
    target = tmp_path_factory.mktemp("site-bad-plugins")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PLUGINS / "lp-hanging-plugin"),
         str(PLUGINS / "lp-exiting-plugin")],
        check=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return env


def list_plugins(env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "from lightning_prune.cli import main; main()", "plugins", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )
    return result, time.monotonic() - start


def test_plugins_lists_a_hanging_plugin_instead_of_hanging(bad_plugins_env) -> None:
    result, seconds = list_plugins(bad_plugins_env, "--timeout", "2")
    assert result.returncode == 0, result.stderr
    hanging = next(line for line in result.stdout.splitlines() if "hanging_solver" in line)
    assert "BROKEN: its import did not finish within 2 s" in hanging
    assert any("proximal" in line and line.rstrip().endswith("ok")
               for line in result.stdout.splitlines())
    assert seconds < 120


def test_plugins_survives_a_plugin_calling_sys_exit(bad_plugins_env) -> None:
    result, _ = list_plugins(bad_plugins_env, "--timeout", "2")
    assert result.returncode == 0, result.stderr
    exiting = next(line for line in result.stdout.splitlines() if "exiting_regularizer" in line)
    assert "BROKEN: its import called sys.exit(3)" in exiting
    assert any("nm_sparsity" in line for line in result.stdout.splitlines())


def test_plugins_timeout_must_be_positive(bad_plugins_env) -> None:
    result, _ = list_plugins(bad_plugins_env, "--timeout", "0")
    assert result.returncode == 2 and "--timeout" in result.stderr


def test_a_corrupt_token_cache_is_rebuilt(small_model, tmp_path) -> None:
    from lightning_prune.data.tokens import tokenize_splits
    from lightning_prune.models import load_tokenizer

    tokenizer, documents = load_tokenizer(small_model), TEXT.split("\n\n")
    first = tokenize_splits(documents, tokenizer, cache_dir=tmp_path)
    (cached,) = (tmp_path / "tokens").glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:50])  # a damaged cache file
    again = tokenize_splits(documents, tokenizer, cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint
    assert again.calibration.equal(first.calibration) and again.heldout.equal(first.heldout)
