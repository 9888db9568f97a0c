"""`train.report_to`: every tracker, offline, logs exactly what metrics.jsonl holds.

One real `sftkit train` (a 1-layer GPT-2 with ChatML, 6 steps, evals at 3 and 6 with a sample reply)
into all four trackers; each one's own files are then read back with its own reader (TensorBoard's
EventAccumulator, Trackio's SQLite store, MLflow's client, the W&B offline log's records) and compared
value for value with metrics.jsonl. A tracker whose library is missing is one message naming the extra.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sftkit import trackers
from sftkit.cli import main
from tests.conftest import tiny_chat_recipe

WORDS = ("red", "blue", "green", "black")
TRAIN = {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "log_every": 1, "eval_every": 3, "device": "cpu",
         "sample_max_new_tokens": 3, "sample_prompt": "Say red."}
ALL = ["tensorboard", "trackio", "mlflow", "wandb"]


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    for name in ALL[1:]:
        if not importable(name):
            pytest.skip(f"{name} is not installed here (pip install 'sftkit[trackers]')")
    root = tmp_path_factory.mktemp("trackers")
    recipe = tiny_chat_recipe(root, WORDS, TRAIN)
    out = root / "out"
    assert main(["train", str(recipe), f"output_dir={out}", f"train.report_to=[{','.join(ALL)}]",
                 "data.eval_fraction=0.25"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "sample" in rows[2] and "eval_loss" in rows[5]
    return out, rows


def expected(rows: list[dict]) -> dict[str, dict[int, float]]:
    """metric -> {step: value}: what every tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in trackers.scalars(row).items():
            series.setdefault(key, {})[row["step"]] = value
    return series


def samples(rows: list[dict]) -> dict[int, str]:
    return {r["step"]: r["sample"] for r in rows if "sample" in r}


def assert_same(got: dict[str, dict[int, float]], rows: list[dict], rel: float = 0.0) -> None:
    want = expected(rows)
    assert set(got) == set(want), set(got) ^ set(want)
    for key, by_step in want.items():
        assert set(got[key]) == set(by_step), key
        for step, value in by_step.items():
            assert math.isclose(got[key][step], value, rel_tol=rel, abs_tol=0.0), (key, step, got[key][step], value)


def test_tensorboard(run: tuple[Path, list[dict]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = run
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert_same(got, rows, rel=1e-6)  # TensorBoard stores float32
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("sample/text_summary")}
    assert texts == samples(rows)


def test_trackio(run: tuple[Path, list[dict]]) -> None:
    import os

    out, rows = run
    assert os.environ["TRACKIO_DIR"] == str(out / "trackio") and (out / "trackio" / "sftkit.db").is_file()
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(trackers.PROJECT, out.name)
    got: dict[str, dict[int, float]] = {}
    for log in logs:
        for key, value in log.items():
            if key not in ("step", "timestamp", "sample"):
                got.setdefault(key, {})[log["step"]] = value
    assert_same(got, rows)
    assert {log["step"]: log["sample"] for log in logs if "sample" in log} == samples(rows)
    assert SQLiteStorage.get_run_config(trackers.PROJECT, out.name)["train"]["max_steps"] == 6


def test_mlflow(run: tuple[Path, list[dict]]) -> None:
    from mlflow.tracking import MlflowClient

    out, rows = run
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    [mlrun] = client.search_runs([client.get_experiment_by_name(trackers.PROJECT).experiment_id])
    assert mlrun.info.run_name == out.name and mlrun.info.status == "FINISHED"
    got = {key: {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
           for key in mlrun.data.metrics}
    assert_same(got, rows)
    assert mlrun.data.params["train.max_steps"] == "6" and mlrun.data.params["train.report_to"] == str(ALL)
    artifacts = out / "mlflow" / "artifacts" / mlrun.info.run_id / "artifacts"
    assert {int(p.stem.split("-")[1]): p.read_text() for p in (artifacts / "samples").iterdir()} == samples(rows)
    assert (artifacts / "sftkit_config.yaml").is_file()


def wandb_records(path: Path):
    """The protobuf records of a W&B offline log: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    chunks carry (crc32, length, type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4) headers."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def test_wandb(run: tuple[Path, list[dict]]) -> None:
    out, rows = run
    [log] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    config: dict[str, object] = {}
    tables = 0
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            tables += "samples/_type" in items  # a table is stored as its nested fields
            for key, value in items.items():
                if not key.startswith(("_", "samples/")):
                    got.setdefault(key, {})[items["_step"]] = value
        elif kind == "run":  # the config travels in the run record
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert_same(got, rows)
    assert tables == len(samples(rows))
    assert config["train"]["max_steps"] == 6 and config["train"]["report_to"] == ALL
    table = max((log.parent / "files" / "media" / "table").glob("samples_*.table.json"), key=lambda p: p.stat().st_mtime)
    assert {step: text for step, text in json.loads(table.read_text())["data"]} == samples(rows)


def test_missing_tracker_library_is_one_message_before_any_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(trackers.LIBRARIES, "wandb", (("wandb_is_not_installed_here",), "sftkit[wandb]"))
    recipe = tiny_chat_recipe(tmp_path, WORDS, TRAIN)
    (tmp_path / "train.jsonl").write_text("not json\n")  # reading the data would fail differently
    capsys.readouterr()  # the tiny model's own progress bars
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out'}", "train.report_to=[tensorboard,wandb]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftkit: error: train.report_to: wandb needs the wandb_is_not_installed_here library")
    assert "pip install 'sftkit[wandb]'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_unknown_tracker_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tiny_chat_recipe(tmp_path, WORDS, TRAIN)
    assert main(["train", str(recipe), "train.report_to=[tensorbord]"]) == 2
    assert "train.report_to: 'tensorbord' is not one of tensorboard, trackio, mlflow, wandb" in capsys.readouterr().err
