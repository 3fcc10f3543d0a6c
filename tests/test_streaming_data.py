"""Streamed calibration data (``data.streaming``): budget, mixture, rank split, resume, errors.

Local jsonl and parquet folders are written through ``datasets`` and streamed back with its
``json``/``parquet`` builders. Most tests use a word tokenizer whose ids are the integers
written in the text, so every token says which source and document it came from.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from lightning_prune.cli import main
from lightning_prune.data import CalibrationDataModule
from lightning_prune.data.mixture import WindowStream, interleave, open_mixture
from lightning_prune.data.streaming import check_streaming, is_heldout
from lightning_prune.errors import ConfigError

SEQ_LEN = 8
WEB, CODE = 1, 2  # token id // SOURCE_BASE: the source a token was written by
SOURCE_BASE = 10_000_000
CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"


class WordTokenizer:
    """Token ids are the integers of the text; 0 separates documents."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [int(word) for word in text.split()]}


def numbered_docs(source: int, count: int) -> list[str]:
    """``count`` documents of 5 to 19 tokens, every token id unique to its document."""
    base = source * SOURCE_BASE
    return [
        " ".join(str(base + doc * 100 + k) for k in range(5 + doc % 15)) for doc in range(count)
    ]


def write(folder: Path, column: str, docs: list[str], kind: str, files: int = 2) -> Path:
    """``docs`` split over ``files`` files of ``kind`` (``jsonl``/``parquet``) in ``folder``."""
    import datasets

    folder.mkdir(parents=True)
    share = -(-len(docs) // files)
    for index in range(files):
        part = datasets.Dataset.from_dict({column: docs[index * share : (index + 1) * share]})
        path = str(folder / f"part{index}.{kind}")
        part.to_json(path) if kind == "jsonl" else part.to_parquet(path)
    return folder


@pytest.fixture
def corpus(tmp_path) -> dict[str, str]:
    """A jsonl web folder (field ``text``) and a parquet code folder (column ``content``)."""
    return {
        "web": str(write(tmp_path / "web", "text", numbered_docs(WEB, 300), "jsonl")),
        "code": str(write(tmp_path / "code", "content", numbered_docs(CODE, 300), "parquet")),
    }


def mixture_config(corpus: dict[str, str], budget: int, web: float = 0.7, code: float = 0.3):
    return {
        "sources": [
            {"path": corpus["web"], "weight": web},
            {"path": corpus["code"], "weight": code, "text_column": "content"},
        ],
        "token_budget": budget,
    }


def open_words(config: dict):
    return open_mixture(check_streaming(config, SEQ_LEN).sources, WordTokenizer(), SEQ_LEN)


def keep_all(text: str) -> bool:
    return True


def word_datamodule(monkeypatch, config: dict, **kwargs) -> CalibrationDataModule:
    monkeypatch.setattr("lightning_prune.models.load_tokenizer", lambda *args: WordTokenizer())
    return CalibrationDataModule(seq_len=SEQ_LEN, streaming=config, **kwargs)


def sources_of(window: torch.Tensor) -> set[int]:
    return set((window[window > 0] // SOURCE_BASE).tolist())


def tokens(windows) -> set[int]:
    return {t for w in windows for t in w.tolist() if t}


def test_budget_gives_whole_windows_and_reads_lazily(tmp_path, monkeypatch) -> None:
    docs = numbered_docs(WEB, 400)
    folder = write(tmp_path / "web", "text", docs, "jsonl")
    (folder / "part1.jsonl").write_text('{"text": null}\n' * 10)  # beyond the budget: unread
    budget = 20 * SEQ_LEN + 5
    dm = word_datamodule(monkeypatch, {"sources": [{"path": str(folder)}], "token_budget": budget})
    windows = list(dm.stream())
    assert len(windows) == 20 and all(w.shape == (SEQ_LEN,) for w in windows)
    assert len(dm.train_dataloader()) == 20 and len(list(dm.train_dataloader())) == 20
    ids = [t for doc in docs if not is_heldout(doc, 0, 0.1) for t in [*map(int, doc.split()), 0]]
    assert torch.equal(torch.cat(windows), torch.tensor(ids[: 20 * SEQ_LEN]))  # packed in order


def test_mixture_follows_the_weights_and_is_deterministic(corpus) -> None:
    mixture = open_words(mixture_config(corpus, 100 * SEQ_LEN))
    windows = list(WindowStream(mixture, 100, keep_all))
    assert all(len(sources_of(w)) == 1 for w in windows)  # a window comes from one source
    web = [sources_of(w) == {WEB} for w in windows]
    for count in range(1, 101):
        assert abs(sum(web[:count]) - 0.7 * count) <= 1
    assert sum(web) == 70
    again = list(WindowStream(open_words(mixture_config(corpus, 100 * SEQ_LEN)), 100, keep_all))
    assert all(torch.equal(a, b) for a, b in zip(windows, again))


def test_interleave_keeps_three_shares() -> None:
    order = list(itertools.islice(interleave([5.0, 3.0, 2.0]), 1000))
    assert [order.count(i) for i in range(3)] == [500, 300, 200]


@pytest.mark.parametrize("files", [2, 1])  # whole files per rank; every other row
def test_ranks_read_disjoint_shares(tmp_path, files) -> None:
    web = str(write(tmp_path / "web", "text", numbered_docs(WEB, 200), "jsonl", files))
    code = str(write(tmp_path / "code", "content", numbered_docs(CODE, 200), "parquet", files))
    mixture = open_words(mixture_config({"web": web, "code": code}, 40 * SEQ_LEN))
    ranks = [list(WindowStream(mixture, 20, keep_all, rank, 2)) for rank in range(2)]
    assert [len(windows) for windows in ranks] == [20, 20]
    assert tokens(ranks[0]) and not tokens(ranks[0]) & tokens(ranks[1])


def test_datamodule_splits_the_budget_over_ranks_and_holds_out_documents(
    corpus, monkeypatch
) -> None:
    dm = word_datamodule(monkeypatch, mixture_config(corpus, 40 * SEQ_LEN), eval_tokens=64)
    ranks = [list(dm.stream(world=2, rank=rank)) for rank in range(2)]
    assert [len(windows) for windows in ranks] == [20, 20]
    heldout = dm.heldout_windows()
    assert heldout.shape == (64 // SEQ_LEN, SEQ_LEN)
    assert not tokens(heldout) & (tokens(ranks[0]) | tokens(ranks[1]))
    assert len(dm.calibration_dataloader()) == 40  # one-shot calibration: all of it


def test_resumed_stream_yields_the_same_windows(corpus) -> None:
    stream = WindowStream(open_words(mixture_config(corpus, 30 * SEQ_LEN)), 30, keep_all)
    whole = list(stream)
    for start in (1, 13, 29):
        resumed = list(stream.windows(start))
        assert len(resumed) == 30 - start
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole[start:]))


def test_datamodule_state_resumes_mid_epoch(corpus, monkeypatch) -> None:
    config = mixture_config(corpus, 12 * SEQ_LEN)
    whole = list(word_datamodule(monkeypatch, config, batch_size=2).train_dataloader())
    dm = word_datamodule(monkeypatch, config, batch_size=2)
    dm.load_state_dict({"epoch": 1, "batches_done": 4})
    loader = dm.train_dataloader()
    resumed, next_epoch = list(loader), list(loader)
    assert len(resumed) == 2 and len(next_epoch) == 6
    for got, expected in zip(resumed + next_epoch, whole[4:] + whole):
        assert torch.equal(got["input_ids"], expected["input_ids"])


def test_fit_resumed_from_a_mid_run_checkpoint_matches(tmp_path) -> None:
    from conftest import build_tiny_random

    model = str(build_tiny_random("llama", tmp_path / "llama"))
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    text = [" ".join(words[(i + k) % 12] for k in range(20 + i % 30)) for i in range(200)]
    code = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    corpus = {
        "web": str(write(tmp_path / "web", "text", text, "jsonl")),
        "code": str(write(tmp_path / "code", "content", code, "parquet")),
    }
    data = tmp_path / "data.yaml"  # 8 windows of 32 tokens, 2 per batch: 4 steps an epoch
    data.write_text(f"""
data:
  seq_len: 32
  batch_size: 2
  eval_tokens: 64
  streaming:
    sources:
      - {{path: {corpus["web"]}, weight: 0.7}}
      - {{path: {corpus["code"]}, weight: 0.3, text_column: content}}
    token_budget: 256
trainer:
  max_epochs: 2
  enable_progress_bar: false
  log_every_n_steps: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 1, save_top_k: -1, filename: "{{step}}"}}
""")

    def fit(root: Path, *extra: str) -> dict[str, torch.Tensor]:
        args = [f"--config={CONFIG}", f"--config={data}", f"--model.model={model}"]
        main(["fit", *args, "--model.init_mask=null", f"--trainer.default_root_dir={root}", *extra])
        last = sorted(root.glob("lightning_logs/version_*/checkpoints/step=8.ckpt"))[-1]
        return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]

    straight = fit(tmp_path / "straight")
    middle = next((tmp_path / "straight").glob("lightning_logs/*/checkpoints/step=6.ckpt"))
    resumed = fit(tmp_path / "resumed", f"--ckpt_path={middle}")  # 2 batches into epoch 2
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c["sources"][0].update(text_field="x"), r"sources\[0\]: unknown field"),
        (lambda c: c.update(budget=5), r"data.streaming: unknown field\(s\) \['budget'\]"),
        (lambda c: c["sources"][1].update(weight=0), r"sources\[1\].weight: expected a positive"),
        (lambda c: c["sources"][1].update(weight=-0.3), r"sources\[1\].weight"),
        (lambda c: c["sources"][0].update(weight=float("nan")), r"sources\[0\].weight"),
        (lambda c: c["sources"][0].update(weight="big"), r"sources\[0\].weight"),
        (lambda c: c.update(sources=[]), r"data.streaming.sources: expected at least one"),
        (lambda c: c["sources"][0].pop("path"), r"sources\[0\].path: required"),
        (lambda c: c.update(token_budget=SEQ_LEN - 1), r"token_budget: expected an integer of"),
        (lambda c: c.pop("token_budget"), r"data.streaming.token_budget: required"),
    ],
)
def test_bad_config_names_the_field(corpus, change, field) -> None:
    config = mixture_config(corpus, 40 * SEQ_LEN)
    change(config)
    with pytest.raises(ConfigError, match=field):
        CalibrationDataModule(seq_len=SEQ_LEN, streaming=config)


def empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def blank_rows(tmp: Path) -> str:
    return str(write(tmp / "blank", "text", ["", "  \n"], "jsonl", files=1))


def mixed_folder(tmp: Path) -> str:
    folder = write(tmp / "mixed", "text", ["a b", "c d"], "jsonl", files=1)
    write(tmp / "mixed" / "sub", "text", ["e f"], "parquet", files=1)
    return str(folder)


def null_text(tmp: Path) -> str:
    (tmp / "null.jsonl").write_text('{"text": null, "id": 1}\n')
    return str(tmp / "null.jsonl")


@pytest.mark.parametrize(
    "make, column, message",
    [
        (lambda t, c: c["code"], "text", r"sources\[0\].text_column: .* no column 'text'"),
        (lambda t, c: c["web"], "body", r"sources\[0\].text_column: .* no column 'body'"),
        (lambda t, c: str(t / "nope.jsonl"), "text", r"sources\[0\].path: .* does not exist"),
        (lambda t, c: empty_folder(t), "text", r"sources\[0\].path: folder .* has no"),
        (lambda t, c: blank_rows(t), "text", r"sources\[0\].path: .* holds no text"),
        (lambda t, c: mixed_folder(t), "text", r"sources\[0\].path: .* mixes .parquet and .jsonl"),
        (lambda t, c: null_text(t), "text", r"sources\[0\].text_column: .* row 1: .* null"),
    ],
)
def test_bad_source_names_the_field(tmp_path, corpus, make, column, message) -> None:
    config = {"sources": [{"path": make(tmp_path, corpus), "text_column": column}]}
    with pytest.raises(ConfigError, match=message):
        open_words({**config, "token_budget": 10 * SEQ_LEN})


def test_budget_above_the_corpus_names_the_source(corpus) -> None:
    mixture = open_words(mixture_config(corpus, 10**6))
    with pytest.raises(ConfigError, match=r"token_budget: .*sources\[\d\] .* ran out"):
        list(WindowStream(mixture, 10**6 // SEQ_LEN, keep_all))


def test_budget_below_one_window_per_rank(corpus, monkeypatch) -> None:
    dm = word_datamodule(monkeypatch, mixture_config(corpus, 3 * SEQ_LEN))
    with pytest.raises(ConfigError, match="token_budget: 24 tokens over 4 ranks"):
        dm.stream(world=4)


def cli_fit_error(tmp_path: Path, capsys, source: str) -> str:
    """stderr of a ``fit`` whose only streamed source is the flow mapping ``source``."""
    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  streaming: {{sources: [{source}], token_budget: 64}}\n")
    with pytest.raises(SystemExit):
        main(["fit", f"--config={CONFIG}", f"--config={data}"])
    return capsys.readouterr().err


def test_cli_names_an_unknown_streaming_field(tmp_path, corpus, capsys) -> None:
    err = cli_fit_error(tmp_path, capsys, f"{{path: {corpus['web']}, text_field: x}}")
    assert "data.streaming" in err and "text_field" in err, err


def test_cli_reports_a_bad_weight_in_one_line(tmp_path, corpus, capsys) -> None:
    err = cli_fit_error(tmp_path, capsys, f"{{path: {corpus['web']}, weight: 0}}")
    assert "lightning-prune: error: data.streaming.sources[0].weight: expected a positive" in err
