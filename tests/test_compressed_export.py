"""``export --format compressed-nm``, ``load_pretrained`` and the inference-time conversions."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lightning_prune import load_pretrained
from lightning_prune.cli import main
from lightning_prune.errors import ConfigError
from lightning_prune.export.compressed import export_compressed_nm, write_compressed_folder
from lightning_prune.export.compressed_file import WEIGHTS_NAME, CompressedFormatError
from lightning_prune.export.nm_codec import (
    NMPatternError,
    decode_nm,
    encode_nm,
    pack_codes,
    position_bits,
    unpack_codes,
)
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.models.loading import ModelLoadError
from lightning_prune.module import PruningModule
from lightning_prune.runtime import compile_model, semi_structured_plan, to_semi_structured
from lightning_prune.solvers.proximal import ProximalSolver

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


def magnitude_module(model: str, n: int = 2, m: int = 4) -> PruningModule:
    module = PruningModule(NMMaskFamily(n=n, m=m), ProximalSolver(), model=model)
    module.configure_model()
    module.apply_initializer("magnitude")
    return module


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 and +0.0, or NaN payloads, differ)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


# -- the codec ---------------------------------------------------------------------------------
def test_2of4_positions_pack_four_to_a_byte_lsb_first() -> None:
    packed = pack_codes(torch.tensor([0, 1, 2, 3, 3, 2]), bits=2)
    assert packed.tolist() == [0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2]
    assert position_bits(4) == 2 and position_bits(8) == 3 and position_bits(2) == 1


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (2, 8), (1, 2), (4, 16)])
def test_encode_decode_round_trip_is_bit_exact(n: int, m: int) -> None:
    generator = torch.Generator().manual_seed(n * 100 + m)
    weight = torch.randn(12, 5 * m, generator=generator)
    keep = torch.rand(12, 5, m, generator=generator).argsort(-1).argsort(-1) < n
    keep[0, 0] = False  # a group with no nonzero at all
    keep[1, 1, 1:] = False  # a group with fewer than n nonzeros
    weight = weight * keep.reshape(12, -1) + 0.0  # the format stores zeros as +0.0
    values, packed = encode_nm(weight, n, m)
    assert values.shape == (12, 5 * n)
    assert packed.numel() == -(-12 * 5 * n * position_bits(m) // 8)
    restored = decode_nm(values, packed, n, m, (12, 5 * m))
    assert torch.equal(bits(restored), bits(weight))
    for codes in unpack_codes(packed, position_bits(m), values.numel()).view(12, 5, n):
        assert bool((codes[:, 1:] > codes[:, :-1]).all())  # ascending within each group


def test_encode_names_the_group_with_too_many_nonzeros() -> None:
    weight = torch.zeros(3, 8)
    weight[2, 4:7] = 1.0
    with pytest.raises(NMPatternError, match=r"row 2, group 1 \(inputs 4..7\) has 3 nonzeros"):
        encode_nm(weight, 2, 4)


def test_decode_rejects_repeated_positions() -> None:
    values, packed = encode_nm(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), 2, 4)
    with pytest.raises(NMPatternError, match="strictly ascending"):
        decode_nm(values, pack_codes(torch.tensor([1, 1]), 2), 2, 4, (1, 4))


# -- an independent decoder, written from docs/compressed-nm.md alone ---------------------------
ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8}


def spec_decode(path: Path) -> dict[str, np.ndarray]:
    """Decode a compressed-nm file with struct/json/numpy only: raw element bits per tensor."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    data = blob[8 + length :]
    meta = header.pop("__metadata__")
    assert meta["format"] == "lightning-prune-compressed-nm" and meta["format_version"] == "1"
    n, m, b = int(meta["n"]), int(meta["m"]), int(meta["position_bits"])
    assert b == max(1, int(np.ceil(np.log2(m))))

    def raw(name: str) -> np.ndarray:
        entry = header[name]
        start, end = entry["data_offsets"]
        width = ELEMENT_BYTES[entry["dtype"]]
        dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
        return np.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"])

    out = {name: raw(name) for name in header if not name.endswith((".nm_values", ".nm_positions"))}
    for name, layout in json.loads(meta["compressed"]).items():
        rows, cols = layout["shape"][::-1] if layout["transposed"] else layout["shape"]
        values = raw(name + ".nm_values")
        packed = raw(name + ".nm_positions")
        stream = [(int(byte) >> i) & 1 for byte in packed for i in range(8)]
        dense = np.zeros((rows, cols), dtype=values.dtype)
        for r in range(rows):
            for k in range(cols // m * n):
                code_index = r * (cols // m * n) + k
                pos = sum(stream[code_index * b + i] << i for i in range(b))
                dense[r, (k // n) * m + pos] = values[r, k]
        out[name] = dense.T if layout["transposed"] else dense
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decoder_written_from_the_spec_reads_the_file(tiny_models, tmp_path, arch) -> None:
    module = magnitude_module(tiny_models[arch])
    module.mask_family.bake()
    expected = {k: v.clone() + 0.0 for k, v in module.model.state_dict().items()}
    module = magnitude_module(tiny_models[arch])
    out = export_compressed_nm(module, tmp_path / "c", dtype="bfloat16")
    decoded = spec_decode(out / WEIGHTS_NAME)
    tied = json.loads(_metadata(out)["tied"])
    assert tied == ({"lm_head.weight": "transformer.wte.weight"} if arch == "gpt2" else {})
    assert set(decoded) | set(tied) == set(expected)
    for name, array in decoded.items():
        want = expected[name].to(torch.bfloat16) if expected[name].is_floating_point() else None
        want = bits(expected[name] if want is None else want).numpy()
        assert np.array_equal(np.ascontiguousarray(array).reshape(-1).view(np.uint8), want), name


def _metadata(folder: Path) -> dict[str, str]:
    blob = (folder / WEIGHTS_NAME).read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length])["__metadata__"]


# -- export through the CLI on the truncated real model ----------------------------------------
@pytest.fixture(scope="module")
def fitted(small_model, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("run")
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--model.model={small_model}",
            "--model.init_mask=magnitude",
            "--data.seq_len=32",
            "--data.num_samples=2",
            "--data.eval_tokens=128",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0",
        ]
    )
    return small_model, root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def export_args(model: str, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "export",
        "--config",
        str(CONFIG),
        f"--model.model={model}",
        f"--ckpt_path={ckpt}",
        f"--output_dir={out}",
        *extra,
    ]


def test_cli_compressed_export_restores_the_hf_export_bit_exactly(fitted, tmp_path) -> None:
    model, ckpt = fitted
    main(export_args(model, ckpt, tmp_path / "hf"))
    main(export_args(model, ckpt, tmp_path / "c32", "--format=compressed-nm"))
    dense = load_file(tmp_path / "hf" / "model.safetensors")
    restored = load_pretrained(tmp_path / "c32")
    assert restored.lightning_prune_info["format"] == "compressed-nm"
    assert type(restored).__name__ == "LlamaForCausalLM" and not restored.training
    state = restored.state_dict()
    assert set(dense) <= set(state)
    for name, tensor in dense.items():
        assert torch.equal(bits(state[name]), bits(tensor + 0.0)), name  # -0.0 stored as +0.0
    record = json.loads((tmp_path / "c32" / "pruning.json").read_text())
    assert record["format"] == "compressed-nm" and record["pattern"] == "2:4"
    assert not (tmp_path / "c32" / "model.safetensors").exists()  # plain HF cannot misload it


def test_bf16_export_meets_the_size_target(fitted, tmp_path) -> None:
    model, ckpt = fitted
    out = tmp_path / "c16"
    main(export_args(model, ckpt, out, "--format=compressed-nm", "--dtype=bfloat16"))
    sizes = json.loads((out / "pruning.json").read_text())["bytes"]
    assert sizes["nm_stored_over_dense"] <= 0.57  # 2:4: (n·2 + n·2/8) / (m·2) = 0.5625
    assert sizes["file"] == (out / WEIGHTS_NAME).stat().st_size
    unpruned = sizes["dense_tensors"] - sizes["nm_tensors_dense"]  # embeddings and norms
    header = 64 * 1024  # JSON header with digests, at most
    assert sizes["file"] <= unpruned + 0.5625 * sizes["nm_tensors_dense"] + header
    restored = load_pretrained(out, dtype="float32")
    assert restored.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(restored(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_cli_refuses_dtype_for_hf_and_compressed_for_structured(fitted, tmp_path, capsys) -> None:
    model, ckpt = fitted
    with pytest.raises(SystemExit):
        main(export_args(model, ckpt, tmp_path / "x", "--dtype=float16"))
    assert "dtype: only --format compressed-nm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(export_args(model, ckpt, tmp_path / "y", "--format=gguf"))
    assert "unknown export format 'gguf'" in capsys.readouterr().err


def test_structured_family_is_refused(tiny_models, tmp_path) -> None:
    from lightning_prune.masks.structured import UniformStructuredFamily
    from lightning_prune.solvers.minimax import MinimaxSolver

    family = UniformStructuredFamily(keep_channels=0.5)
    module = PruningModule(family, MinimaxSolver(), model=tiny_models["llama"])
    module.configure_model()
    with pytest.raises(ConfigError, match="needs an N:M mask family"):
        export_compressed_nm(module, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture()
def exported(tiny_models, tmp_path) -> Path:
    return export_compressed_nm(magnitude_module(tiny_models["llama"]), tmp_path / "c")


def rewrite_metadata(folder: Path, **changes: str) -> None:
    path = folder / WEIGHTS_NAME
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob[8 + length :])


def test_truncated_file_names_the_tensor(exported) -> None:
    path = exported / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CompressedFormatError, match=r"tensor '.+' is truncated"):
        load_pretrained(exported)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CompressedFormatError, match="truncated"):
        load_pretrained(exported)


def test_tampered_tensor_fails_its_digest(exported) -> None:
    path = exported / WEIGHTS_NAME
    blob = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    start, _ = header["model.layers.1.mlp.down_proj.weight.nm_values"]["data_offsets"]
    blob[8 + length + start] ^= 0x40
    path.write_bytes(bytes(blob))
    with pytest.raises(
        CompressedFormatError,
        match=r"tensor 'model.layers.1.mlp.down_proj.weight.nm_values' fails its SHA-256",
    ):
        load_pretrained(exported)


def test_unknown_header_version_is_refused(exported) -> None:
    rewrite_metadata(exported, format_version="2")
    with pytest.raises(CompressedFormatError, match="unknown header version '2'"):
        load_pretrained(exported)
    rewrite_metadata(exported, format_version="1", format="something-else")
    with pytest.raises(CompressedFormatError, match="header field 'format'"):
        load_pretrained(exported)


def test_shape_disagreeing_with_config_names_the_tensor(exported) -> None:
    config = json.loads((exported / "config.json").read_text())
    config["intermediate_size"] = 96
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CompressedFormatError,
        match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 128\) in the "
        r"file, but the config expects \(64, 96\)",
    ):
        load_pretrained(exported)


def test_pickle_only_folder_is_refused(tiny_models, tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((Path(tiny_models["llama"]) / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"safetensors only \(never pickle\)"):
        load_pretrained(folder)


def test_export_of_a_dense_weight_names_it_and_leaves_nothing(tiny_models, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    layout = {"model.layers.0.self_attn.q_proj.weight": False}
    out = tmp_path / "out"
    with pytest.raises(
        CompressedFormatError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight': breaks"
    ):
        write_compressed_folder(model, out, layout, 2, 4, tiny_models["llama"], {})
    assert list(tmp_path.iterdir()) == []  # no output folder, no partial sibling


KILLED_EXPORT = """
import os, signal, sys
import lightning_prune.export.compressed as compressed
from lightning_prune.masks.nm import NMMaskFamily
from lightning_prune.module import PruningModule
from lightning_prune.solvers.proximal import ProximalSolver

real = compressed.write_compressed


def write_then_die(*args, **kwargs):  # the process dies right after the weights are written
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


compressed.write_compressed = write_then_die
module = PruningModule(NMMaskFamily(), ProximalSolver(), model=sys.argv[1])
module.configure_model()
module.apply_initializer("magnitude")
compressed.export_compressed_nm(module, sys.argv[2])
"""


def test_killed_export_leaves_no_complete_looking_folder(tiny_models, tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "c"
    args = [sys.executable, "-c", KILLED_EXPORT, tiny_models["llama"], str(out)]
    assert subprocess.run(args, capture_output=True).returncode == -9
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(".c.partial-") for p in leftovers)
    assert (leftovers[0] / WEIGHTS_NAME).is_file()  # killed after the weights ...
    assert not (leftovers[0] / "config.json").exists()  # ... so no loader takes it for a model
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(leftovers[0])


def test_failed_overwrite_keeps_the_previous_export(exported, tiny_models) -> None:
    from transformers import AutoModelForCausalLM

    before = (exported / WEIGHTS_NAME).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    layout = {"model.layers.1.mlp.up_proj.weight": False}
    with pytest.raises(CompressedFormatError):
        write_compressed_folder(model, exported, layout, 2, 4, tiny_models["llama"], {}, True)
    assert (exported / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in exported.parent.iterdir()] == ["c"]


# -- runtime: semi-structured plan (CPU) / conversion (CUDA), torch.compile --------------------
def test_semi_structured_plan_and_cpu_refusal(exported) -> None:
    model = load_pretrained(exported, dtype="bfloat16")
    pruned = [n.removesuffix(".weight") for n in json.loads(_metadata(exported)["compressed"])]
    eligible, skipped = semi_structured_plan(model, pruned)
    assert sorted(eligible) == sorted(pruned) and skipped == {}  # tiny llama fits (32, 64)
    _, skipped = semi_structured_plan(model)  # every Linear: nothing else exists here
    assert skipped == {}
    fp32 = load_pretrained(exported)
    eligible, skipped = semi_structured_plan(fp32, pruned)
    assert eligible == [] and all("float16 or bfloat16" in r for r in skipped.values())
    dense = load_pretrained(exported, dtype="bfloat16")
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    _, skipped = semi_structured_plan(dense, ["model.layers.0.mlp.up_proj"])
    assert skipped == {"model.layers.0.mlp.up_proj": "weight is not 2:4 sparse"}
    with pytest.raises(ConfigError, match="semi_structured: needs the model on a CUDA device"):
        to_semi_structured(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 kernels need CUDA")
def test_semi_structured_cuda_matches_the_dense_restore(exported) -> None:
    dense = load_pretrained(exported, dtype="float16", device="cuda")
    sparse = load_pretrained(exported, dtype="float16", device="cuda", semi_structured=True)
    report = sparse.lightning_prune_info["semi_structured"]
    assert len(report["converted"]) == 14
    probe = torch.randint(0, 1000, (2, 64), device="cuda")
    with torch.no_grad():
        want, got = dense(input_ids=probe).logits.float(), sparse(input_ids=probe).logits.float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_compile_runs_and_falls_back_to_eager(exported) -> None:
    model = load_pretrained(exported)
    probe = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=probe).logits
    compiled = load_pretrained(exported, compile=True, compile_backend="eager")
    assert compiled.lightning_prune_info["compile"] == "compiled (eager)"
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=probe).logits, want, atol=1e-5)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        status = compile_model(model, backend="no-such-backend")
    assert status.startswith("eager (")
    with warnings.catch_warnings(), torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, want)


def test_load_pretrained_reads_an_ordinary_hf_folder(tiny_models) -> None:
    model = load_pretrained(tiny_models["gpt2"], dtype="bfloat16")
    assert model.lightning_prune_info["format"] == "hf" and model.dtype == torch.bfloat16
