"""Where a run's records go besides metrics.jsonl: TensorBoard, Trackio, MLflow, Weights & Biases.

    sftkit train RECIPE.yaml                                          # train.report_to: [tensorboard] (default)
    sftkit train RECIPE.yaml 'train.report_to=[tensorboard,trackio,mlflow,wandb]'

Each tracker is its own library in its own offline mode, writing under output_dir; nothing leaves
the machine and no account is needed:

    tensorboard  output_dir/tb/                tensorboard --logdir output_dir/tb
    trackio      output_dir/trackio/           TRACKIO_DIR=output_dir/trackio trackio show --project sftkit
    mlflow       output_dir/mlflow/mlflow.db   mlflow ui --backend-store-uri sqlite:///output_dir/mlflow/mlflow.db
    wandb        output_dir/wandb/ (offline)   wandb sync output_dir/wandb/offline-run-*   (to upload later)

Every tracker gets the same things: every number of every metrics.jsonl row but `step` as a scalar
at that row's step, the eval `sample` reply as text (TensorBoard text, a Trackio string, an MLflow
artifact samples/step-N.txt, a W&B table `samples`), and the resolved config once (output_dir/
sftkit_config.yaml). `sftkit.runlog.RunLog` is the only caller: one record goes to metrics.jsonl and
then to each tracker here. The libraries are optional extras (`pip install 'sftkit[trackers]'`, or
one of `sftkit[trackio]`, `sftkit[mlflow]`, `sftkit[wandb]`); a missing one is refused by `check`
before any data or weights are read. A resumed run continues the same Trackio and MLflow run
(TensorBoard drops what the stopped run logged after its checkpoint); W&B offline starts a second
offline run directory beside the first.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from sftkit.config import CONFIG_FILE, ConfigError

PROJECT = "sftkit"  # the Trackio / MLflow / W&B project every run logs into; the run is named after output_dir
# tracker -> (modules it imports, the pip extra that installs them); MLflow's SQLite store needs SQLAlchemy
LIBRARIES = {"tensorboard": (("tensorboard",), "sftkit"), "trackio": (("trackio",), "sftkit[trackio]"),
             "mlflow": (("mlflow", "sqlalchemy", "alembic"), "sftkit[mlflow]"), "wandb": (("wandb",), "sftkit[wandb]")}


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row that every tracker logs (all but `step`, which is the x axis)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check(names: list[str]) -> None:
    """Refuse a tracker whose library is not installed, naming the extra that installs it (cheap: no import)."""
    for name in names:
        if name not in LIBRARIES:
            raise ConfigError(f"train.report_to: {name!r} is not one of {', '.join(LIBRARIES)}")
        modules, extra = LIBRARIES[name]
        for module in modules:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"train.report_to: {name} needs the {module} library, which is not installed here: "
                                  f"pip install '{extra}' (or 'sftkit[trackers]' for all of them), or remove {name} "
                                  "from train.report_to")


def run_config(output_dir: Path) -> dict[str, Any]:
    """The resolved config the run wrote (empty before it is written)."""
    path = output_dir / CONFIG_FILE
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}: the dotted keys of the recipe."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoard:
    def __init__(self, output_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=purge_step)
        if config := run_config(output_dir):
            self.writer.add_text("config", "    " + yaml.safe_dump(config).replace("\n", "\n    "), 0)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        if "sample" in record:
            self.writer.add_text("sample", record["sample"], record["step"])

    def close(self) -> None:
        self.writer.close()


class Trackio:
    """Trackio's local SQLite store in output_dir/trackio (unless TRACKIO_DIR is set: then there)."""

    def __init__(self, output_dir: Path) -> None:
        os.environ.setdefault("TRACKIO_DIR", str(output_dir / "trackio"))  # read when trackio is imported
        import trackio

        self.run = trackio.init(project=PROJECT, name=output_dir.resolve().name, config=run_config(output_dir),
                                resume="allow", auto_log_cpu=False, auto_log_gpu=False, embed=False)

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = dict(scalars(record))
        if "sample" in record:
            values["sample"] = record["sample"]
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow SQLite store in output_dir/mlflow (artifacts beside it): `mlflow ui` over that file."""

    def __init__(self, output_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        root = (output_dir / "mlflow").resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            PROJECT, artifact_location=(root / "artifacts").as_uri())
        name = output_dir.resolve().name
        earlier = self.client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'")
        if earlier:  # a resumed run continues its MLflow run
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            config = run_config(output_dir)
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, yaml.safe_dump(config), CONFIG_FILE)

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, record["step"])
                                                    for k, v in scalars(record).items()])
        if "sample" in record:
            self.client.log_text(self.run_id, record["sample"], f"samples/step-{record['step']:06d}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """A W&B run in offline mode under output_dir/wandb: `wandb sync` uploads it later if you want."""

    def __init__(self, output_dir: Path) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(output_dir.resolve()), project=PROJECT,
                              name=output_dir.resolve().name, config=run_config(output_dir),
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        self.samples: list[list[Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = dict(scalars(record))
        if "sample" in record:  # W&B's way: the whole table again, one row more each eval
            self.samples.append([record["step"], record["sample"]])
            values["samples"] = self.wandb.Table(columns=["step", "sample"], data=list(self.samples))
        self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], output_dir: Path, purge_step: int | None = None) -> list[Tracker]:
    """The trackers of `train.report_to`, opened (their libraries imported now: only when a record comes)."""
    check(names)
    made = {"tensorboard": lambda: TensorBoard(output_dir, purge_step), "trackio": lambda: Trackio(output_dir),
            "mlflow": lambda: MLflow(output_dir), "wandb": lambda: WandB(output_dir)}
    return [made[name]() for name in names]
