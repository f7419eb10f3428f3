"""Metrics: ``metrics.jsonl`` in the run directory and, optionally, Weights & Biases.

Only the logging rank builds a real Tracker; every other rank gets ``NullTracker``.
W&B runs offline when no WANDB_API_KEY is set; its run id is kept in the run directory
so a resumed job continues the same W&B run.
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


@dataclass
class LoggerConfig:
    backend: Backend = Backend.none
    project: str = "ringattn"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: Optional[WandbMode] = None  # None: offline when WANDB_API_KEY is unset

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


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: str, config: dict, resume_step: int):
        self.path = os.path.join(run_dir, METRICS)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.wandb = None
        if cfg.backend == Backend.wandb:
            import wandb

            id_file = os.path.join(run_dir, RUN_ID_FILE)
            if os.path.exists(id_file):
                run_id = open(id_file).read().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                with open(id_file, "w") as f:
                    f.write(run_id)
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, id=run_id,
                                    resume="allow", dir=run_dir, mode=cfg.wandb_mode(), config=config,
                                    settings=wandb.Settings(console="off", quiet=True))

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
