"""Every malformed input gets a clear error naming what is wrong and what was expected, and
nothing already on disk changes.

Each case runs the real CLI (in-process) against a workspace that already holds a finished run
(its checkpoint) and an export; the workspace's files are hashed before and after every case.

Cases (41):
  configs   1 unknown key (CLI)            2 unknown key (YAML)           3 wrong type
            4 seq_len 0                    5 num_samples -1               6 batch_size 0
            7 N:M with n = m               8 N:M with n = 0               9 negative lambda
           10 unknown lam_mode            11 zero learning rate          12 warmup_ratio > 1
           13 budget outside (0, 1)       14 keep 0% of heads            15 unknown GQA option
           16 unknown solver              17 unknown mask family         18 minimax with nm
           19 unknown init_mask           20 seq_len above the context   21 heldout_fraction 1.5
           22 NumericGuard on_fault       23 grad_clip negative
  corpora  24 empty file                  25 binary file                 26 wrong encoding
           27 JSONL without the field     28 malformed JSONL             29 missing path
           30 corpus too short
  models   31 folder without config.json  32 config without weights      33 wrong architecture
           34 weights partly missing      40 pickled object in a .bin (never unpickled)
  ckpts    35 truncated                   36 from another model          37 not a lightning-prune
                                                                             checkpoint
           38 pickled object inside       39 path does not exist
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_prune.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
PROX = CONFIGS / "proxsparse_2of4.yaml"
MINIMAX = CONFIGS / "maskprune_uniform.yaml"


@dataclass
class Workspace:
    root: Path
    model: str
    ckpt: Path


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Workspace, Path], list[str]]
    expected: tuple[str, ...]


def fit(*extra: str, config: Path = PROX) -> Callable[[Workspace, Path], list[str]]:
    def build(ws: Workspace, tmp: Path) -> list[str]:
        return [
            "fit", f"--config={config}", f"--model.model={ws.model}", "--model.init_mask=null",
            "--data.seq_len=32", "--data.num_samples=2", "--data.eval_tokens=64",
            f"--trainer.default_root_dir={tmp / 'run'}", "--trainer.enable_progress_bar=false",
            *[e.format(tmp=tmp, ws=ws) for e in extra],
        ]

    return build


def with_file(name: str, content: bytes, *extra: str) -> Callable[[Workspace, Path], list[str]]:
    def build(ws: Workspace, tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return fit(f"--data.source={tmp / name}", *extra)(ws, tmp)

    return build


class Payload:
    """Anything that is not a tensor: ``weights_only`` loading refuses to build it."""


def with_model(change: Callable[[Path], None]) -> Callable[[Workspace, Path], list[str]]:
    def build(ws: Workspace, tmp: Path) -> list[str]:
        folder = tmp / "model"
        shutil.copytree(ws.model, folder)
        change(folder)
        args = fit()(ws, tmp)
        flag = "--model.model="
        return [f"{flag}{folder}" if a.startswith(flag) else a for a in args]

    return build


def export(make_ckpt: Callable[[Workspace, Path], Path]) -> Callable[[Workspace, Path], list[str]]:
    def build(ws: Workspace, tmp: Path) -> list[str]:
        return [
            "export", f"--config={PROX}", f"--model.model={ws.model}", "--model.init_mask=null",
            f"--ckpt_path={make_ckpt(ws, tmp)}", f"--output_dir={tmp / 'out'}",
        ]

    return build


def rewrite_config(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def drop_some_weights(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def pickled_bin(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "payload": Payload()}, folder / "pytorch_model.bin")


def truncated(ws: Workspace, tmp: Path) -> Path:
    path = tmp / "cut.ckpt"
    path.write_bytes(ws.ckpt.read_bytes()[:1000])
    return path


def edited(change: Callable[[dict], None], name: str) -> Callable[[Workspace, Path], Path]:
    def make(ws: Workspace, tmp: Path) -> Path:
        checkpoint = torch.load(ws.ckpt, map_location="cpu", weights_only=True)
        change(checkpoint)
        path = tmp / name
        torch.save(checkpoint, path)
        return path

    return make


def other_model(checkpoint: dict) -> None:
    checkpoint["lightning_prune"].update(model_type="gpt2", hidden_size=48, model="tiny-gpt2")


def future_version(checkpoint: dict) -> None:
    checkpoint["lightning_prune"].update(format=2, version="9.0.0")


def not_ours(checkpoint: dict) -> None:
    del checkpoint["lightning_prune"]


def pickled(checkpoint: dict) -> None:
    checkpoint["payload"] = Payload()


CASES = [
    Case("unknown-key-cli", fit("--model.sparsity=0.5"), ("sparsity",)),
    Case("unknown-key-yaml", fit("--config={tmp}/bad.yaml"), ("bogus",)),
    Case("wrong-type", fit("--data.seq_len=long"), ("data.seq_len", "long")),
    Case("seq-len-zero", fit("--data.seq_len=0"), ("data.seq_len", "positive integer")),
    Case("num-samples-negative", fit("--data.num_samples=-1"), ("data.num_samples",)),
    Case("batch-size-zero", fit("--data.batch_size=0"), ("data.batch_size", "positive")),
    Case("nm-n-equals-m", fit("--model.mask_family.init_args.n=4"), ("mask_family.n",)),
    Case("nm-n-zero", fit("--model.mask_family.init_args.n=0"), ("mask_family.n",)),
    Case("lambda-negative", fit("--model.regularizers.init_args.lam=-1"), ("lam",)),
    Case("lam-mode-unknown", fit("--model.regularizers.init_args.lam_mode=relative"),
         ("lam_mode", "relative")),
    Case("lr-zero", fit("--model.solver.init_args.lr=0"), ("lr",)),
    Case("warmup-above-one", fit("--model.solver.init_args.warmup_ratio=1.5"),
         ("warmup_ratio",)),
    Case("budget-outside", fit("--model.mask_family.init_args.budget=1.5", config=MINIMAX),
         ("budget", "(0, 1)")),
    Case("keep-no-heads", fit("--model.mask_family.init_args.budget=null",
                              "--model.mask_family.init_args.keep_heads=0",
                              "--model.mask_family.init_args.keep_channels=0.5",
                              config=MINIMAX), ("keep_heads",)),
    Case("gqa-unknown", fit("--model.mask_family.init_args.gqa=heads", config=MINIMAX),
         ("gqa", "heads")),
    Case("unknown-solver", fit("--model.solver=proxymal"), ("proxymal", "proximal")),
    Case("unknown-family", fit("--model.mask_family=two_four"), ("two_four", "nm")),
    Case("minimax-with-nm", fit("--model.solver=minimax"), ("minimax", "uniform_structured")),
    Case("unknown-init-mask", fit("--model.init_mask=wandaa"), ("wandaa",)),
    Case("seq-len-above-context", fit("--data.seq_len=100000"),
         ("data.seq_len", "exceeds the model's context")),
    Case("heldout-fraction", fit("--data.heldout_fraction=1.5"), ("data.heldout_fraction",)),
    Case("guard-on-fault", fit("--trainer.callbacks+=lightning_prune.callbacks.NumericGuard",
                               "--trainer.callbacks.init_args.on_fault=ignore"),
         ("on_fault", "ignore")),
    Case("grad-clip-negative", fit("--model.solver.init_args.grad_clip=-1"), ("grad_clip",)),
    Case("corpus-empty", with_file("empty.txt", b"\n \n"), ("data.source", "holds no text")),
    Case("corpus-binary", with_file("bin.txt", bytes(range(256)) * 4), ("data.source",)),
    Case("corpus-encoding", with_file("latin.txt", "café crème".encode("latin-1") * 50),
         ("data.source", "UTF-8")),
    Case("jsonl-no-field", with_file("x.jsonl", b'{"content": "hello"}\n'),
         ("data.text_column", "x.jsonl", "'text'")),
    Case("jsonl-malformed", with_file("y.jsonl", b'{"text": "hello"\n'), ("data.source", "line 1")),
    Case("corpus-missing", fit("--data.source={tmp}/nope.txt"), ("data.source", "does not exist")),
    Case("corpus-too-short", with_file("short.txt", b"tiny text.\n\n" * 40, "--data.seq_len=64",
                                       "--data.num_samples=50"), ("data.num_samples",)),
    Case("model-no-config", with_model(lambda f: (f / "config.json").unlink()),
         ("config.json",)),
    Case("model-no-weights", with_model(drop_weights), ("model.safetensors",)),
    Case("model-wrong-architecture", with_model(rewrite_config(model_type="bert",
                                                               architectures=["BertModel"])),
         ("model",)),
    Case("model-weights-partly-missing", with_model(drop_some_weights),
         ("missing", "layers.1.mlp")),
    Case("model-pickled-bin", with_model(pickled_bin), ("could not be loaded", "Weights only")),
    Case("ckpt-truncated", export(truncated), ("ckpt_path", "not a readable checkpoint")),
    Case("ckpt-other-model", export(edited(other_model, "other.ckpt")),
         ("ckpt_path", "another model", "model_type")),
    Case("ckpt-other-version", export(edited(future_version, "future.ckpt")),
         ("ckpt_path", "checkpoint format 2 written by lightning-prune 9.0.0", "reads format 1")),
    Case("ckpt-not-ours", export(edited(not_ours, "plain.ckpt")),
         ("ckpt_path", "not a lightning-prune checkpoint")),
    Case("ckpt-pickled-object", export(edited(pickled, "pickled.ckpt")),
         ("ckpt_path", "not a readable checkpoint")),
    Case("ckpt-missing", export(lambda ws, tmp: tmp / "nope.ckpt"),
         ("ckpt_path", "does not exist")),
]


@pytest.fixture(scope="module")
def workspace(small_model, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    main(fit(f"--trainer.default_root_dir={root}")(Workspace(root, small_model, root), root))
    ckpt = next(root.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    ws = Workspace(root, small_model, ckpt)
    main(export(lambda *_: ckpt)(ws, root))
    return ws


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_case_count_is_visible() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_answered_clearly(case, workspace, tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("model:\n  bogus: 1\n")
    before = snapshot(workspace.root)
    args = case.args(workspace, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for expected in case.expected:
        assert expected in err, f"{case.id}: {expected!r} not in:\n{err[-2000:]}"
    assert "Traceback" not in err
    assert snapshot(workspace.root) == before
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*.ckpt")) or case.id.startswith("ckpt")
