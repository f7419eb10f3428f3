"""Metrics: ``metrics.jsonl`` in the run directory and, optionally, Weights & Biases.

Only the logging rank builds a real Tracker; every other rank gets ``NullTracker``.
W&B runs offline when no WANDB_API_KEY is set; its run id is kept in the run directory, and a
resumed job continues that W&B run from the checkpoint's step (``LoggerConfig.resume``).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Optional

from recipes.choices import Choice

METRICS = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"


class Backend(Choice):
    none = "none"
    wandb = "wandb"


class WandbMode(Choice):
    online = "online"
    offline = "offline"


class WandbResume(Choice):
    """How a resumed job continues its W&B run. A crash or signal leaves steps logged after the
    checkpoint; the resumed job trains them again."""

    rewind = "rewind"  # the same run, its history cut back to the checkpoint's step (resume_from)
    fork = "fork"  # a new run that shares the old one's history up to the checkpoint's step (fork_from)
    # the same run as is (resume="allow"): W&B keeps the steps past the checkpoint and rejects
    # the re-trained ones as not increasing -- for servers without rewind and fork
    append = "append"


@dataclass
class LoggerConfig:
    backend: Backend = Backend.none
    project: str = "ringattn"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: Optional[WandbMode] = None  # None: offline when WANDB_API_KEY is unset
    # rewind and fork are W&B preview features (not on self-managed servers): append there
    resume: WandbResume = WandbResume.rewind

    def wandb_mode(self) -> str:
        return (self.mode or (WandbMode.online if os.environ.get("WANDB_API_KEY") else WandbMode.offline)).value


def configure_logging() -> None:
    """Concise INFO logs for a recipe; DeepSpeed's per-rank chatter only from WARNING up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class NullTracker:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def wandb_run_args(cfg: LoggerConfig, run_dir: str, resume_step: int) -> dict:
    """``wandb.init``'s run identity for this job: the id kept in the run dir and, for a job that
    resumed from a checkpoint, where its history continues (``cfg.resume``). Keeps the id file."""
    id_file = os.path.join(run_dir, RUN_ID_FILE)
    previous = open(id_file).read().strip() if os.path.exists(id_file) else None
    if previous is None or resume_step == 0:  # nothing of an earlier W&B run is kept: a new run
        args, run_id = {}, uuid.uuid4().hex[:12]
    elif cfg.resume == WandbResume.rewind:
        args, run_id = {"resume_from": f"{previous}?_step={resume_step}"}, previous
    elif cfg.resume == WandbResume.fork:
        run_id = uuid.uuid4().hex[:12]
        args = {"fork_from": f"{previous}?_step={resume_step}"}
    else:
        args, run_id = {"resume": "allow"}, previous
    if run_id != previous:
        with open(id_file + ".tmp", "w") as f:
            f.write(run_id)
        os.replace(id_file + ".tmp", id_file)
    return dict(args, id=run_id)


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: str, config: dict, resume_step: int):
        self.path = os.path.join(run_dir, METRICS)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.wandb = None
        if cfg.backend == Backend.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, dir=run_dir,
                                    mode=cfg.wandb_mode(), config=config,
                                    settings=wandb.Settings(console="off", quiet=True),
                                    **wandb_run_args(cfg, run_dir, resume_step))

    def _truncate_after(self, step: int) -> None:
        """Drop lines past the resumed step (logged after the checkpoint, before a crash)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
