"""Peak memory of the calibration loaders: today's whole-corpus one against ``data.streaming``.

Writes a JSONL corpus larger than the token budget (``--corpus-mb``, in a temporary folder
removed afterwards; never kept), then in a fresh process per loader builds the calibration
windows of one epoch (``--budget`` tokens in ``--seq-len`` windows) and the held-out windows:
- ``whole``: ``data.source`` = the corpus folder: every document read, split and tokenized in
  memory, then ``budget // seq_len`` windows drawn (its token cache goes to the temporary
  folder too, with a copy of the tokenizer);
- ``streaming``: ``data.streaming`` with the folder as its one source and ``token_budget`` =
  ``--budget``: documents streamed through ``datasets`` and packed until the budget is reached.

Memory is the process's resident set (RSS) read with the standard library: ``ru_maxrss`` of
``resource.getrusage`` (the peak over the process's life) and ``/proc/self/status`` (the RSS
before loading: interpreter, torch, datasets and the tokenizer). ``growth`` is peak minus
that baseline: what loading the data added, native buffers (Arrow, tokenizers) included.
Prints a table and writes JSON.

    python tools/bench_data_memory.py --corpus-mb 200 --budget 2000000 \
        --output bench_results/data_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOADERS = ("whole", "streaming")
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="smollm2-135m")
    parser.add_argument("--corpus-mb", type=int, default=200, help="size of the JSONL corpus")
    parser.add_argument("--budget", type=int, default=2_000_000, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--output", default="bench_results/data_memory.json")
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)  # the worker's corpus folder
    return parser.parse_args()


def write_corpus(folder: Path, megabytes: int, files: int = 4, seed: int = 0) -> int:
    """``files`` JSONL files of about ``megabytes`` MiB of pseudo-English documents in all."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "ren", "ti", "sa", "mor", "en", "vi", "dal", "un", "pe", "st"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(5000)]
    folder.mkdir(parents=True)
    per_file, written = megabytes * MIB // files, 0
    for index in range(files):
        with open(folder / f"part{index:02d}.jsonl", "w") as handle:
            size = 0
            while size < per_file:
                text = " ".join(rng.choices(words, k=rng.randint(200, 800))) + "."
                line = json.dumps({"text": text}) + "\n"
                handle.write(line)
                size += len(line)
        written += size
    return written


def rss_mib() -> float:
    """The current resident set size, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    """The peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def datamodule(loader: str, corpus: str, args: argparse.Namespace):
    from lightning_prune.data import CalibrationDataModule

    common = {"tokenizer": args.tokenizer, "seq_len": args.seq_len}
    common["eval_tokens"] = args.eval_tokens
    if loader == "whole":
        samples = args.budget // args.seq_len
        return CalibrationDataModule(source=corpus, num_samples=samples, **common)
    streaming = {"sources": [{"path": corpus}], "token_budget": args.budget}
    return CalibrationDataModule(streaming=streaming, **common)


def work(loader: str, corpus: str, args: argparse.Namespace) -> dict:
    """Build one epoch of calibration batches and the held-out windows; measure memory."""
    from lightning_prune.models import load_tokenizer

    load_tokenizer(args.tokenizer)  # loaded (and its libraries imported) before the baseline
    import datasets  # noqa: F401  (both loaders import it; counted in the baseline)

    baseline = rss_mib()
    start = time.perf_counter()
    data = datamodule(loader, corpus, args)
    windows = sum(batch["input_ids"].shape[0] for batch in data.train_dataloader())
    heldout = data.heldout_windows().shape[0]
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "loader": loader,
        "windows": windows,
        "tokens": windows * args.seq_len,
        "heldout_windows": heldout,
        "seconds": round(seconds, 1),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - baseline, 1),
    }


def save_tokenizer(name: str, folder: Path) -> Path:
    """A folder copy of tokenizer ``name``: the workers load it without the model cache."""
    from lightning_prune.models import load_tokenizer

    load_tokenizer(name).save_pretrained(folder)
    return folder


def run_worker(
    loader: str, corpus: Path, tokenizer: Path, cache: Path, args: argparse.Namespace
) -> dict:
    """``work`` in a fresh process (``ru_maxrss`` never goes down), caching under ``cache``."""
    settings = {
        "--corpus": corpus,
        "--tokenizer": tokenizer,
        "--budget": args.budget,
        "--seq-len": args.seq_len,
        "--eval-tokens": args.eval_tokens,
    }
    command = [sys.executable, __file__, "--worker", loader]
    command += [str(part) for pair in settings.items() for part in pair]
    env = {**os.environ, "LIGHTNING_PRUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the {loader} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    columns = ["loader", "windows", "tokens", "seconds", "baseline_rss_mib", "peak_rss_mib"]
    columns.append("growth_mib")
    print(" | ".join(f"{c:>16}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]!s:>16}" for c in columns))


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(work(args.worker, args.corpus, args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-memory-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus_bytes = write_corpus(corpus, args.corpus_mb)
        tokenizer = save_tokenizer(args.tokenizer, Path(tmp) / "tokenizer")
        rows = [
            run_worker(loader, corpus, tokenizer, Path(tmp) / "cache", args)
            for loader in args.loaders
        ]
    print_table(rows)
    record = {
        "measure": "process RSS: ru_maxrss peak, /proc/self/status baseline (MiB)",
        "corpus_bytes": corpus_bytes,
        "budget_tokens": args.budget,
        "seq_len": args.seq_len,
        "eval_tokens": args.eval_tokens,
        "tokenizer": args.tokenizer,
        "rows": rows,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
