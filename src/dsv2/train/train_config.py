"""TrainConfig: every setting of a pretraining run, saved as RUN_DIR/train_config.json and read back on --resume.
Defaults follow the paper (MODEL_SPEC section 6) except the learning rate and warm-up, which are sized for the
small models dsv2 trains on one machine."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..fileio import atomic_write
from .optim import SCHEDULES

TRAIN_CONFIG = "train_config.json"
# each kind of run directory and the command that continues it
RUN_KINDS = {TRAIN_CONFIG: "dsv2 train", "sft_config.json": "dsv2 sft", "grpo_config.json": "dsv2 grpo"}


def need(settings, cond: bool, name: str, why: str) -> None:
    if not cond:
        raise ValueError(f"training setting {name} = {getattr(settings, name)!r}: {why}")


class RunSettings:
    """A frozen dataclass of a run's settings, saved as RUN_DIR/FILE and read back on --resume."""
    FILE = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        d = dict(d)
        for name, value in d.items():  # JSON has lists where the dataclass keeps tuples
            if isinstance(value, list) and "tuple" in str(known[name].type):
                d[name] = tuple(value)
        return cls(**d)

    def save(self, run_dir: str) -> None:
        with atomic_write(os.path.join(run_dir, self.FILE)) as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, run_dir: str):
        path = os.path.join(run_dir, cls.FILE)
        if not os.path.isfile(path):
            other = [f"{command} --resume" for name, command in RUN_KINDS.items()
                     if name != cls.FILE and os.path.isfile(os.path.join(run_dir, name))]
            raise FileNotFoundError(f"{run_dir} is not a `{RUN_KINDS[cls.FILE]}` run directory (no "
                                    f"{cls.FILE})" + (f"; it holds a run that `{other[0]}` continues" if other else ""))
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    data: str  # a directory written by `dsv2 data prepare`
    model: str = "tiny-stdlib"  # preset name or config.json
    seq_len: int = 512
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "step"
    decay_points: tuple[float, ...] = (0.6, 0.9)
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False
    decay_router: bool = False
    init_std: float | None = None  # None: the model config's initializer_range (0.006)
    aux_expert: float | None = None  # alpha_1; None: the model config's aux_loss_alpha
    aux_device: float = 0.0  # alpha_2
    aux_comm: float = 0.0  # alpha_3
    capacity_factor: float | None = None  # token dropping off
    no_drop_fraction: float = 0.1
    bf16: bool = False
    grad_checkpointing: bool = False
    eval_every: int = 200
    eval_batches: int = 8
    final_eval: bool = True
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    expert_parallel: int = 1  # under torchrun: routed experts split over groups of this many ranks

    FILE = TRAIN_CONFIG

    def __post_init__(self):
        check_optimizer_settings(self)
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "save_every", "eval_every",
                     "eval_batches", "keep_checkpoints"):
            need(self, getattr(self, name) >= 1, name, "must be >= 1")
        need(self, self.lr > 0, "lr", "must be positive")
        need(self, self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor", "must be positive")
        need(self, 0 <= self.no_drop_fraction <= 1, "no_drop_fraction", "must be in [0, 1]")
        need(self, self.init_std is None or self.init_std > 0, "init_std", "must be positive")
        need(self, self.expert_parallel >= 1, "expert_parallel", "must be >= 1")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def check_optimizer_settings(s) -> None:
    """The checks every run's schedule and optimizer settings share (TrainConfig, SftConfig)."""
    need(s, s.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(s, s.schedule in SCHEDULES, "schedule", f"choose one of {SCHEDULES}")
    need(s, all(0 < p <= 1 for p in s.decay_points), "decay_points", "fractions of training in (0, 1]")
    need(s, s.grad_clip > 0, "grad_clip", "must be positive")
    need(s, s.weight_decay >= 0, "weight_decay", "must be >= 0")
