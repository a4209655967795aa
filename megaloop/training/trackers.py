"""Experiment trackers behind `train.loggers`: TensorBoard, Weights & Biases, MLflow.

Each tracker receives the same scalars under the same names (`train/loss`, `valid/loss`,
`loops/residual_norm/loop01`, `memory/rank0`, ...), once per logging step, and the run's description once
at the start: the resolved config, the git commit of the megaloop checkout and the parallel layout.
metrics.jsonl (`jsonl`) is written by megaloop.training.run_logging itself. W&B and MLflow are imported only
when named (the `track` extra); both work without network: `train.wandb.mode: offline` (or WANDB_MODE=offline)
writes the run under `<output_dir>/wandb` for a later `wandb sync`, and MLflow defaults to a local file store
at `<output_dir>/mlruns` when no tracking URI is given. A resumed run continues the same W&B / MLflow run:
their run ids are kept in `<output_dir>/trackers.json`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from typing import Dict, List, Optional

from megaloop.config.schema import flat_dict

IDS_FILE = "trackers.json"


def git_commit() -> Dict[str, object]:
    """The megaloop checkout's commit and whether it has uncommitted changes ({} outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha, "git_dirty": bool(dirty)}


def run_description(cfg, state, world: int, accelerator: str) -> dict:
    """What every tracker records once: the layout and the code version (the config is passed beside it)."""
    return {**git_commit(), "layout": {
        "world": world, "tensor_parallel": state.tp_size, "pipeline_parallel": state.pp_size,
        "data_parallel": state.dp_size, "sequence_parallel": bool(state.sequence_parallel),
        "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision, "accelerator": accelerator}}


class _RunIds:
    """`<output_dir>/trackers.json`: the W&B / MLflow run ids, so that a resume logs into the same runs."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, IDS_FILE)
        try:
            with open(self.path) as f:
                self.ids = json.load(f)
        except (OSError, ValueError):
            self.ids = {}

    def get(self, key: str) -> Optional[str]:
        return self.ids.get(key)

    def set(self, key: str, value: str) -> None:
        self.ids[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.ids, f)
        os.replace(tmp, self.path)


class _QuietTensorBoardThreads:
    """threading.excepthook while a SummaryWriter is open: an OSError in TensorBoard's writer thread (a full disk)
    is left to the main thread, which tensorboard raises it in at the next write and TensorBoardTracker turns into
    one line; anything else goes to the hook that was there before."""

    def __init__(self):
        self.previous = threading.excepthook
        threading.excepthook = self

    def __call__(self, args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        self.previous(args)

    def restore(self):
        if threading.excepthook is self:
            threading.excepthook = self.previous


class TensorBoardTracker:
    """A write that fails (a full disk under tensorboard/) raises OutputError naming the folder."""

    def __init__(self, out_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.dir = os.path.join(out_dir, "tensorboard")
        self.writer, self._quiet = None, _QuietTensorBoardThreads()
        with self._failing_write():
            self.writer = SummaryWriter(self.dir)

    @contextlib.contextmanager
    def _failing_write(self):
        try:
            yield
        except OSError as e:  # (from the writer thread, raised at the next write)
            from megaloop.training.run_logging import output_error
            self._shut()
            raise output_error(e, self.dir, "the TensorBoard event file") from None

    def describe(self, config: dict, description: dict) -> None:
        import yaml
        with self._failing_write():
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
            self.writer.add_text("run", "```\n" + json.dumps(description, indent=1) + "\n```", 0)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        with self._failing_write():
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            with self._failing_write():
                self.writer.flush()
        self._shut()

    def _shut(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        except OSError:
            pass  # (reported already, or the run ends on another error)
        finally:
            self._quiet.restore()


class WandbTracker:
    def __init__(self, out_dir: str, wcfg, ids: _RunIds):
        import wandb
        run_id = ids.get("wandb_run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=wcfg.project, entity=wcfg.entity, name=wcfg.name or _run_name(out_dir),
                              mode=wcfg.mode, tags=list(wcfg.tags) or None, id=run_id, resume="allow",
                              dir=os.environ.get("WANDB_DIR") or out_dir)
        ids.set("wandb_run_id", run_id)

    def describe(self, config: dict, description: dict) -> None:
        self.run.config.update({**config, "run": description}, allow_val_change=True)

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, out_dir: str, mcfg, ids: _RunIds):
        uri = mcfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local store in the run folder: no server, no network. MLflow 3 keeps its file store in
            # maintenance mode and refuses it unless this opt-in is set (its SQLite store needs SQLAlchemy,
            # which mlflow-skinny does not bring).
            uri = "file:" + os.path.abspath(os.path.join(out_dir, "mlruns"))
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=uri)
        run_id = ids.get("mlflow_run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(mcfg.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(mcfg.experiment)
            run_id = self.client.create_run(exp_id, run_name=mcfg.run_name or _run_name(out_dir)).info.run_id
            ids.set("mlflow_run_id", run_id)
            self.resumed = False
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.resumed = True
        self.run_id = run_id

    def describe(self, config: dict, description: dict) -> None:
        from mlflow.entities import Param, RunTag
        layout = description.get("layout", {})
        tags = [RunTag(k, str(v)) for k, v in description.items() if k != "layout"]
        tags += [RunTag(f"layout.{k}", str(v)) for k, v in layout.items()]
        self.client.log_batch(self.run_id, tags=tags)
        if not self.resumed:  # (params are immutable in MLflow: a resumed run's config is its checkpoint's)
            params = [Param(k, str(v)[:6000]) for k, v in flat_dict(config).items()]
            for i in range(0, len(params), 100):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def scalars(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _run_name(out_dir: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(out_dir)))


def build_trackers(t, out_dir: str) -> List[object]:
    """The trackers train.loggers names (t: TrainConfig), besides jsonl. Logging rank only."""
    loggers = list(t.loggers)
    ids = _RunIds(out_dir)
    out = []
    if "tensorboard" in loggers and t.tensorboard:
        try:
            out.append(TensorBoardTracker(out_dir))
        except OSError:  # (OutputError: a full disk, a read-only folder)
            raise
        except Exception as exc:  # noqa: BLE001 - tensorboard missing: keep training, say so once
            print(f"[megaloop] TensorBoard disabled: {exc}", flush=True)
    for name, cls, section in (("wandb", WandbTracker, t.wandb), ("mlflow", MlflowTracker, t.mlflow)):
        if name not in loggers:
            continue
        try:
            out.append(cls(out_dir, section, ids))
        except Exception as exc:  # noqa: BLE001 - no network, a bad URI, no login: one line, not a traceback
            from megaloop.config import ConfigError
            why = " ".join(str(exc).split())[:300]
            raise ConfigError(f"train.loggers: {name} could not start ({type(exc).__name__}: {why}); check "
                              f"train.{name}.* (offline: train.wandb.mode=offline; MLflow: leave tracking_uri "
                              f"null for a file store in the run folder), or drop {name} from train.loggers") from exc
    return out
