"""Checkpoints and compressed-nm files that must be refused: never unpickled, never taken for
another model, never exported when broken, never decoded after a header edit.

Each CLI case runs the real CLI (in-process) against a workspace that already holds a finished
run (a checkpoint file), a finished FSDP2 run (a sharded checkpoint folder), a compressed-nm
export and two look-alike models (same shapes: other weights, other config); the workspace's
files are hashed before and after every case, and no case may run a checkpoint's payload
(it would create a marker file).

CLI cases (exit status 2, ``lightning-prune: error: ...``):
  pickle     1 crafted .metadata: export          2 crafted .metadata: evaluate
             3 crafted .metadata: report RUN      4 crafted .metadata: fit (resume)
             5 pickled optimizer entry in a .distcp shard: fit (resume)
             6 crafted last.ckpt folder found by ``fit --ckpt_path last``
             7 pickled object in a checkpoint file: report RUN
  folders    8 empty folder                       9 folder without meta.pt
            10 folder without .metadata          11 entry pointing outside the folder
            12 truncated shard file
  garbage   13 NaN learned tensor: export        14 inf learned tensor: evaluate
            15 NaN in a sharded folder: report   16 NaN in a checkpoint file: report
  identity  17 same shapes, other weights        18 same shapes, other config field
            19 stored hyperparameters naming another model
compressed-nm header edits (``load_pretrained``; case 20 also through ``lm-eval``, exit 2):
            20 flipped ``transposed`` on a square weight   21 ``tied`` entry added
            22 a tensor's dtype in the table               23 ``n``/``m`` changed
            24 a per-tensor digest changed                 25 a tensor's shape in the table
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from lightning_prune.checkpoints import read_sharded_state
from lightning_prune.cli import main
from lightning_prune.export.compressed_file import WEIGHTS_NAME, CompressedFormatError
from lightning_prune.loader import load_pretrained

CONFIGS = Path(__file__).parents[1] / "configs"
PROX = CONFIGS / "proxsparse_2of4.yaml"
FSDP2_ONE_RANK = [
    f"--config={CONFIGS / 'fsdp2.yaml'}",
    "--trainer.devices=1",
    "--trainer.strategy.init_args.data_parallel_size=1",
    "--data.batch_size=2",
]
SURROGATE = "model.model.layers.0.self_attn.q_proj.parametrizations.weight.0.surrogate"
SQUARE = "model.layers.0.self_attn.q_proj.weight"  # 576 x 576 in the truncated default model


@dataclass
class Workspace:
    root: Path
    model: str
    ckpt: Path
    sharded: Path
    compressed: Path


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Workspace, Path], list[str]]
    expected: tuple[str, ...]


class Payload:
    """Unpickling this creates the marker file: proof that a checkpoint's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def marker(tmp: Path) -> Path:
    return tmp / "payload-ran"


def fit_args(model: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--config={PROX}", *extra, f"--model.model={model}", "--model.init_mask=null",
        "--data.seq_len=32", "--data.num_samples=2", "--data.eval_tokens=64",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


def common(ws: Workspace, model: str | None = None) -> list[str]:
    return [f"--config={PROX}", f"--model.model={model or ws.model}", "--model.init_mask=null"]


MakeCkpt = Callable[[Workspace, Path], Path]


def export(make: MakeCkpt, model: Callable[[Workspace], str] | None = None):
    def build(ws: Workspace, tmp: Path) -> list[str]:
        chosen = model(ws) if model else None
        return ["export", *common(ws, chosen), f"--ckpt_path={make(ws, tmp)}",
                f"--output_dir={tmp / 'out'}"]  # fmt: skip

    return build


def evaluate(make: MakeCkpt):
    def build(ws: Workspace, tmp: Path) -> list[str]:
        return ["evaluate", *common(ws), f"--ckpt_path={make(ws, tmp)}", "--data.seq_len=32",
                "--data.eval_tokens=64", f"--output={tmp / 'eval.json'}"]  # fmt: skip

    return build


def resume(make: MakeCkpt, *extra: str):
    def build(ws: Workspace, tmp: Path) -> list[str]:
        return [*fit_args(ws.model, tmp / "run", *extra), f"--ckpt_path={make(ws, tmp)}"]

    return build


def report(make: MakeCkpt):
    """``report RUN`` on a copy of the finished run whose checkpoint ``make`` replaced."""

    def build(ws: Workspace, tmp: Path) -> list[str]:
        made = make(ws, tmp)
        run = tmp / "report-run"
        shutil.copytree(ws.ckpt.parents[1], run / "version_0", ignore=_checkpoints)
        target = run / "version_0" / "checkpoints" / "last.ckpt"
        target.parent.mkdir()
        made.rename(target)
        return ["report", str(run), "--output", str(tmp / "report.html")]

    return build


def _checkpoints(folder: str, names: list[str]) -> list[str]:
    return ["checkpoints"] if "checkpoints" in names else []


def resume_last(make: MakeCkpt):
    """``fit --ckpt_path last`` where the newest last.ckpt under the root is ``make``'s."""

    def build(ws: Workspace, tmp: Path) -> list[str]:
        made = make(ws, tmp)
        found = tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        found.parent.mkdir(parents=True)
        made.rename(found)
        return [*fit_args(ws.model, tmp / "run", *FSDP2_ONE_RANK), "--ckpt_path=last"]

    return build


# -- crafted sharded folders ----------------------------------------------------------------
def sharded_copy(ws: Workspace, tmp: Path, name: str = "sharded.ckpt") -> Path:
    folder = tmp / name
    shutil.copytree(ws.sharded, folder)
    return folder


def crafted_metadata(ws: Workspace, tmp: Path) -> Path:
    folder = sharded_copy(ws, tmp)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker(tmp))))
    return folder


def read_metadata(folder: Path):
    """Test side only: the metadata of a folder this test suite wrote itself."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def rewrite_entry(folder: Path, fqn: str, relative_path: str, data: bytes | None) -> None:
    """Point storage entry ``fqn`` at ``data`` appended to its shard (or at another file)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = read_metadata(folder)
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    offset, length = info.offset, info.length
    if data is not None:
        shard = folder / relative_path
        offset, length = shard.stat().st_size, len(data)
        with shard.open("ab") as handle:
            handle.write(data)
    metadata.storage_data[index] = _StorageInfo(relative_path, offset, length)
    metadata.storage_meta = None
    with (folder / ".metadata").open("wb") as handle:
        pickle.dump(metadata, handle)


def pickled_optimizer_entry(ws: Workspace, tmp: Path) -> Path:
    folder = sharded_copy(ws, tmp)
    blob = io.BytesIO()
    torch.save(Payload(marker(tmp)), blob)  # what DCP loads with weights_only=False
    rewrite_entry(folder, "optimizer_0.param_groups.0.lr", "__0_0.distcp", blob.getvalue())
    return folder


def outside_entry(ws: Workspace, tmp: Path) -> Path:
    folder = sharded_copy(ws, tmp)
    rewrite_entry(folder, "optimizer_0.param_groups.0.lr", "../secret.distcp", None)
    return folder


def truncated_shard(ws: Workspace, tmp: Path) -> Path:
    folder = sharded_copy(ws, tmp)
    shard = folder / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-5000])
    return folder


def empty_folder(ws: Workspace, tmp: Path) -> Path:
    (tmp / "empty.ckpt").mkdir()
    return tmp / "empty.ckpt"


def without(name: str) -> MakeCkpt:
    def make(ws: Workspace, tmp: Path) -> Path:
        folder = sharded_copy(ws, tmp)
        (folder / name).unlink()
        return folder

    return make


def nan_sharded(ws: Workspace, tmp: Path) -> Path:
    """The FSDP2 run's folder rewritten with one NaN in a surrogate (torch's own writer)."""
    import torch.distributed.checkpoint as dcp

    header, state = read_sharded_state(ws.sharded)
    state[SURROGATE][0, 0] = float("nan")
    folder = tmp / "nan-sharded.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=str(folder), no_dist=True)
    torch.save(header, folder / "meta.pt")
    return folder


# -- edited checkpoint files ----------------------------------------------------------------
def edited(change: Callable[[dict, Workspace, Path], None], name: str) -> MakeCkpt:
    def make(ws: Workspace, tmp: Path) -> Path:
        checkpoint = torch.load(ws.ckpt, map_location="cpu", weights_only=True)
        change(checkpoint, ws, tmp)
        torch.save(checkpoint, tmp / name)
        return tmp / name

    return make


def poison(value: float) -> Callable[[dict, Workspace, Path], None]:
    def change(checkpoint: dict, ws: Workspace, tmp: Path) -> None:
        checkpoint["state_dict"][SURROGATE][1, 2] = value

    return change


def pickled(checkpoint: dict, ws: Workspace, tmp: Path) -> None:
    checkpoint["payload"] = Payload(marker(tmp))


def stored_model(checkpoint: dict, ws: Workspace, tmp: Path) -> None:
    checkpoint["hyper_parameters"] = {"model": str(ws.root / "other-weights")}


def same(ws: Workspace, tmp: Path) -> Path:
    return ws.ckpt


CASES = [
    Case("metadata-pickle-export", export(crafted_metadata),
         ("ckpt_path", "is refused", "names 'io.open'", "it was not unpickled")),
    Case("metadata-pickle-evaluate", evaluate(crafted_metadata),
         ("ckpt_path", "is refused", "names 'io.open'")),
    Case("metadata-pickle-report", report(crafted_metadata),
         ("run checkpoint refused", "names 'io.open'")),
    Case("metadata-pickle-resume", resume(crafted_metadata, *FSDP2_ONE_RANK),
         ("ckpt_path", "names 'io.open'")),
    Case("distcp-pickled-entry-resume", resume(pickled_optimizer_entry, *FSDP2_ONE_RANK),
         ("entry 'optimizer_0.param_groups.0.lr'", "holds objects other than tensors",
          "it was not unpickled")),
    Case("metadata-pickle-resume-last", resume_last(crafted_metadata),
         ("ckpt_path", "names 'io.open'")),
    Case("file-pickle-report", report(edited(pickled, "pickled.ckpt")),
         ("run checkpoint refused", "not a readable checkpoint", "never unpickled")),
    Case("folder-empty", export(empty_folder),
         ("ckpt_path", "is an empty folder, not a checkpoint", "meta.pt, .metadata")),
    Case("folder-no-meta", export(without("meta.pt")), ("ckpt_path", "it has no meta.pt")),
    Case("folder-no-metadata", export(without(".metadata")),
         ("ckpt_path", "it has no .metadata")),
    Case("entry-outside-folder", export(outside_entry),
         ("entry 'optimizer_0.param_groups.0.lr' points outside the folder", "../secret")),
    Case("shard-truncated", export(truncated_shard), ("of '__0_0.distcp'", "(truncated)")),
    Case("nan-export", export(edited(poison(float("nan")), "nan.ckpt")),
         ("ckpt_path", f"learned tensor '{SURROGATE}'", "non-finite", "(nan)")),
    Case("inf-evaluate", evaluate(edited(poison(float("inf")), "inf.ckpt")),
         ("ckpt_path", f"learned tensor '{SURROGATE}'", "(inf)")),
    Case("nan-sharded-report", report(nan_sharded),
         ("run checkpoint refused", f"learned tensor '{SURROGATE}'", "(nan)")),
    Case("nan-file-report", report(edited(poison(float("-inf")), "ninf.ckpt")),
         ("run checkpoint refused", f"learned tensor '{SURROGATE}'", "(inf)")),
    Case("other-weights-same-shapes", export(same, lambda ws: str(ws.root / "other-weights")),
         ("ckpt_path", "another model", "weights_sha256: checkpoint")),
    Case("other-config-same-shapes", export(same, lambda ws: str(ws.root / "other-config")),
         ("ckpt_path", "another model", "config.rms_norm_eps: checkpoint", "vs model 0.001")),
    Case("stored-hyperparameters", export(edited(stored_model, "hparams.ckpt")),
         ("ckpt_path", "stores hyperparameters that contradict the config",
          "model.model: checkpoint", "other-weights")),
]  # fmt: skip


# -- the workspace --------------------------------------------------------------------------
def look_alike(source: str, folder: Path, weights: bool) -> None:
    """A copy of ``source`` with every shape kept: weights scaled, or one config field set."""
    shutil.copytree(source, folder)
    if weights:
        state = load_file(folder / "model.safetensors")
        save_file({k: v * 1.01 for k, v in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
    else:
        config = json.loads((folder / "config.json").read_text())
        config["rms_norm_eps"] = 1e-3
        (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def workspace(small_model, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("checkpoint-workspace")
    main(fit_args(small_model, root / "run"))
    main(fit_args(small_model, root / "sharded", *FSDP2_ONE_RANK))
    if dist.is_initialized():  # the one-rank FSDP2 fit ran in this process
        dist.destroy_process_group()
    ckpt = root / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    sharded = root / "sharded" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (sharded / ".metadata").is_file()
    ws = Workspace(root, small_model, ckpt, sharded, root / "compressed")
    main(["export", *common(ws), f"--ckpt_path={ckpt}", f"--output_dir={ws.compressed}",
          "--format=compressed-nm"])  # fmt: skip
    look_alike(small_model, root / "other-weights", weights=True)
    look_alike(small_model, root / "other-config", weights=False)
    return ws


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_case_count_is_visible() -> None:
    assert len(CASES) >= 19 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_checkpoint_is_refused(case, workspace, tmp_path, capsys) -> None:
    before = snapshot(workspace.root)
    args = case.args(workspace, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for expected in case.expected:
        assert expected in err, f"{case.id}: {expected!r} not in:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert not marker(tmp_path).exists(), "a checkpoint's pickled payload ran"
    assert snapshot(workspace.root) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "report.html").exists()


# -- what still loads -------------------------------------------------------------------------
def test_verified_sharded_folder_exports_and_reports(workspace, tmp_path, capsys) -> None:
    """The guard lets a real FSDP2 folder through: export, and report of its run."""
    main(["export", *common(workspace), f"--ckpt_path={workspace.sharded}",
          f"--output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(workspace.root / "sharded"), "--output", str(tmp_path / "r.html")])
    assert exit_info.value.code == 0
    assert "mask view unavailable" not in (tmp_path / "r.html").read_text()


def test_checkpoint_without_content_fingerprint_loads_with_a_warning(workspace, tmp_path) -> None:
    """Checkpoints written before content fingerprints (format 1 without ``config`` and
    ``weights_sha256``) are still read; the warning says only shapes were checked."""
    checkpoint = torch.load(workspace.ckpt, map_location="cpu", weights_only=True)
    for key in ("config", "weights_sha256"):
        del checkpoint["lightning_prune"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="records no config or weights digest"):
        main(["export", *common(workspace), f"--ckpt_path={tmp_path / 'old.ckpt'}",
              f"--output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert (tmp_path / "out" / "pruning.json").is_file()


# -- compressed-nm: the header digest covers every per-tensor field --------------------------
def edit_header(folder: Path, change: Callable[[dict, dict], None]) -> None:
    """Rewrite the safetensors header of ``folder``'s weight file (data section unchanged)."""
    path = folder / WEIGHTS_NAME
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    change(header, header["__metadata__"])
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob[8 + length :])


def json_field(key: str, change: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    def edit(header: dict, meta: dict) -> None:
        value = json.loads(meta[key])
        change(value)
        meta[key] = json.dumps(value)

    return edit


def flip_transposed(compressed: dict) -> None:
    compressed[SQUARE]["transposed"] = not compressed[SQUARE]["transposed"]


def add_tie(tied: dict) -> None:
    tied["model.norm.weight"] = "model.layers.0.input_layernorm.weight"


def relabel_dtype(header: dict, meta: dict) -> None:
    header["model.norm.weight"]["dtype"] = "I32"  # same width: the bytes would decode


def change_pattern(header: dict, meta: dict) -> None:
    meta["n"], meta["m"] = "1", "2"


def change_digest(digests: dict) -> None:
    digests["model.norm.weight"] = "0" * 64


def reshape(header: dict, meta: dict) -> None:
    header["model.norm.weight"]["shape"] = [24, 24]  # 576 elements either way


HEADER_EDITS = {
    "flipped-transposed": json_field("compressed", flip_transposed),
    "tied-added": json_field("tied", add_tie),
    "dtype-relabelled": relabel_dtype,
    "pattern-changed": change_pattern,
    "digest-changed": json_field("sha256", change_digest),
    "shape-in-table": reshape,
}


@pytest.mark.parametrize("edit", HEADER_EDITS.values(), ids=HEADER_EDITS.keys())
def test_compressed_header_edit_is_refused(edit, workspace, tmp_path) -> None:
    folder = tmp_path / "c"
    shutil.copytree(workspace.compressed, folder)
    edit_header(folder, edit)
    before = snapshot(workspace.root)
    with pytest.raises(CompressedFormatError, match="the header fails its SHA-256 check"):
        load_pretrained(folder)
    assert snapshot(workspace.root) == before


def test_flipped_transposed_is_refused_by_lm_eval(workspace, tmp_path, capsys) -> None:
    """The same refusal through a command: ``lm-eval`` loads exports with load_pretrained."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    folder = tmp_path / "c"
    shutil.copytree(workspace.compressed, folder)
    edit_header(folder, HEADER_EDITS["flipped-transposed"])
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "One plus one is", "choices": ["two"], "label": 0}))
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
    )
    args = ["lm-eval", str(folder), "--tasks", "tiny_choice", "--include_path", str(tmp_path),
            "--no_default_tasks"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "the header fails its SHA-256 check" in capsys.readouterr().err


def test_compressed_file_without_header_digest_loads_with_a_warning(workspace, tmp_path) -> None:
    """Files written before ``header_sha256`` existed decode, with a warning."""
    folder = tmp_path / "c"
    shutil.copytree(workspace.compressed, folder)
    edit_header(folder, lambda header, meta: meta.pop("header_sha256"))
    with pytest.warns(UserWarning, match="has no header_sha256"):
        model = load_pretrained(folder)
    reference = load_pretrained(workspace.compressed)
    assert torch.equal(model.get_parameter(SQUARE), reference.get_parameter(SQUARE))
