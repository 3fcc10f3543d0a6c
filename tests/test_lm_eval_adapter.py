"""The lm-evaluation-harness adapter on a real export, with a local (offline) task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_prune.cli import main

pytest.importorskip(
    "lm_eval", reason="the lm-eval extra is not installed (pip install 'lightning-prune[lm-eval]')"
)

CONFIG = Path(__file__).parents[1] / "configs" / "proxsparse_2of4.yaml"
QUESTIONS = [
    ("The capital of France is", ["Paris", "a banana", "blue", "seven"]),
    ("Two plus two equals", ["four", "London", "green", "a dog"]),
    ("The sun rises in the", ["east", "fridge", "keyboard", "violin"]),
]
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def export(small_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval")
    common = ["--config", str(CONFIG), f"--model.model={small_model}", "--model.init_mask=null"]
    main(
        [
            "fit",
            *common,
            "--data.seq_len=32",
            "--data.num_samples=2",
            "--data.eval_tokens=64",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={root / 'export'}"])
    return root / "export"


@pytest.fixture()
def local_task(tmp_path) -> Path:
    data = tmp_path / "questions.jsonl"
    lines = [json.dumps({"question": q, "choices": c, "label": 0}) for q, c in QUESTIONS]
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "tiny_choice.yaml").write_text(TASK.format(data=data))
    return tmp_path


def test_lm_eval_runs_a_local_task_on_an_export(export, local_task, tmp_path, capsys) -> None:
    output = tmp_path / "zero_shot.json"
    args = [
        "lm-eval",
        str(export),
        "--tasks",
        "tiny_choice",
        "--include_path",
        str(local_task),
        "--no_default_tasks",
        "--output",
        str(output),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    record = json.loads(output.read_text())
    result = record["results"]["tiny_choice"]
    assert result["sample_len"] == len(QUESTIONS)
    assert result["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)  # a share of three questions
    assert record["pruning"]["pattern"] == "2:4"  # the export's own record travels along
    assert record["versions"]["lm-eval"] and record["versions"]["torch"]
    assert "tiny_choice" in capsys.readouterr().out


def test_lm_eval_names_an_unknown_task(export, local_task, capsys) -> None:
    args = [
        "lm-eval",
        str(export),
        "--tasks",
        "no_such_task",
        "--include_path",
        str(local_task),
        "--no_default_tasks",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "['no_such_task'] are not lm-evaluation-harness tasks" in capsys.readouterr().err
