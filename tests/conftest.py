"""Shared fixtures: tiny real models built from the embedded default model and random configs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")


def build_truncated_default(out: Path, layers: int = 2) -> Path:
    """The first ``layers`` decoder layers of the embedded default model (real weights)."""
    from transformers import AutoModelForCausalLM

    from lightning_prune.models import load_causal_lm, load_tokenizer

    full = load_causal_lm("smollm2-135m")
    config = full.config
    config.num_hidden_layers = layers
    small = AutoModelForCausalLM.from_config(config)
    small.load_state_dict(full.state_dict(), strict=False)
    small.save_pretrained(out)
    load_tokenizer("smollm2-135m").save_pretrained(out)
    return out


def build_tiny_random(arch: str, out: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised model of architecture ``arch`` with the default tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_prune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    vocab = len(tokenizer)
    if arch == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab
        )
    else:
        extra = {"head_dim": 16} if arch in ("qwen3", "gemma3_text") else {}
        config = AutoConfig.for_model(
            arch,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
            **extra,
        )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """Folder of the 2-layer truncated default model."""
    return str(build_truncated_default(tmp_path_factory.mktemp("smollm2-2l")))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny random models, one per supported architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(build_tiny_random(arch, root / arch)) for arch in TINY_ARCHS}


#: variables a distributed launch writes into ``os.environ`` (Lightning, torch.distributed)
LAUNCH_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)
SESSION_ENVIRONMENT = dict(os.environ)


@pytest.fixture(autouse=True)
def no_leaked_distributed_state():
    """An in-process fit under a distributed strategy (FSDP2 on one rank) initialises a process
    group and writes MASTER_PORT, LOCAL_RANK and friends into ``os.environ``; a later test that
    launches real multi-process fits would inherit them, bind the same port or take itself for
    an already launched rank and wait forever. Every test starts without launch variables the
    session did not start with (module fixtures may have set some) and ends with the process
    group torn down and the environment as it found it."""
    for key in LAUNCH_VARIABLES:
        if key not in SESSION_ENVIRONMENT:
            os.environ.pop(key, None)
    before = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)
