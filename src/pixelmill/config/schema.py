"""The typed config schema: every key pixelmill accepts, its type and its default.

OmegaConf merges packaged YAML defaults, a user file and ``key=value`` overrides onto
these dataclasses, so an unknown key or a value of the wrong type is caught before any
work starts. Value checks that a type cannot express (choices, ranges) live in
``CHOICES`` and ``RANGES`` below, one table each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Optional

from pixelmill.data.choices import AUTO_AUGMENTS, CACHE_MODES, INTERPOLATIONS, LAYOUTS, SAMPLERS
from pixelmill.tasks import TASKS

# Choice lists of the keys outside data.* (those live in pixelmill.data.choices), each defined
# here only; the module that acts on a key checks its own table against the list.
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh")  # model.activation: models/nets.py
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop")  # optim.name: training/module.py
SCHEDULERS: tuple[str, ...] = ("none", "step", "cosine", "onecycle", "plateau")  # scheduler.name: training/module.py
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "mlflow", "wandb")  # logger (a list of them): tracking.py
MONITORS: tuple[str, ...] = ("val/acc", "val/loss", "val/f1_macro")  # trainer.monitor


@dataclass
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    color_jitter: float = 0.0
    random_resized_crop: bool = False
    scale_min: float = 0.8
    auto_augment: str = "none"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class DataConfig:
    kind: str = "image"
    path: Optional[str] = None
    layout: str = "auto"
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    # Decoded, resized images kept after their first read: none, memory (shared RAM) or disk (mmap file).
    cache: str = "none"
    sampler: str = "shuffle"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    target: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    pretrained: bool = False
    weights: Optional[str] = None
    in_chans: int = 3
    drop_rate: Optional[float] = None
    freeze_backbone: bool = False
    class_weights: str = "none"
    label_smoothing: float = 0.0
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9


@dataclass
class SchedulerConfig:
    name: str = "none"
    warmup_epochs: int = 0
    step_size: int = 10
    gamma: float = 0.1
    patience: int = 3
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    sync_batchnorm: bool = False
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    deterministic: bool = False
    monitor: str = "val/acc"
    mode: str = "max"
    early_stopping_patience: int = 0
    # Lightning's meaning: an int is a number of batches, a float in (0, 1] a fraction.
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class MlflowConfig:
    uri: str = "sqlite:///mlruns.db"
    artifact_location: str = "./mlartifacts"
    parent_run_id: Optional[str] = None  # nests the run under another (hyper-parameter search)


@dataclass
class WandbConfig:
    project: str = "pixelmill"
    mode: str = "auto"


@dataclass
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    top_k: list[int] = field(default_factory=lambda: [1, 5])
    splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated after training


@dataclass
class PixelmillConfig:
    experiment: str = "default"
    run_name: Optional[str] = None
    output_dir: str = "runs"
    seed: int = 42
    resume: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: list[str] = field(default_factory=lambda: ["csv", "tensorboard", "mlflow"])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values for string keys: dotted key -> choices.
CHOICES: dict[str, Collection[str]] = {
    "data.kind": TASKS.keys(),  # a live view: a task registered by a plug-in is a valid data.kind
    "data.layout": LAYOUTS,
    "data.sampler": SAMPLERS,
    "data.cache": CACHE_MODES,
    "data.interpolation": INTERPOLATIONS,
    "data.augment.auto_augment": AUTO_AUGMENTS,
    "model.class_weights": ("none", "auto"),
    "model.activation": ACTIVATIONS,
    "optim.name": OPTIMIZERS,
    "scheduler.name": SCHEDULERS,
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "trainer.precision": ("32", "16-mixed", "bf16-mixed", "64"),
    "trainer.mode": ("min", "max"),
    "tracking.wandb.mode": ("auto", "online", "offline", "disabled"),
}

# Numeric ranges: dotted key -> (low, high, inclusive_low); None is unbounded.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "data.val_ratio": (0.0, 1.0, True),
    "data.test_ratio": (0.0, 1.0, True),
    "data.image_size": (8, 4096, True),
    "data.crop_pct": (0.0, 1.0, False),
    "data.batch_size": (1, None, True),
    "data.eval_batch_size": (1, None, True),
    "data.num_workers": (0, 256, True),
    "data.augment.rotation": (0.0, 180.0, True),
    "data.augment.color_jitter": (0.0, 1.0, True),
    "data.augment.scale_min": (0.0, 1.0, False),
    "data.augment.mixup_alpha": (0.0, None, True),
    "data.augment.cutmix_alpha": (0.0, None, True),
    "model.in_chans": (1, 4, True),
    "model.drop_rate": (0.0, 1.0, True),
    "model.label_smoothing": (0.0, 1.0, True),
    "optim.lr": (0.0, None, False),
    "optim.weight_decay": (0.0, None, True),
    "optim.momentum": (0.0, 1.0, True),
    "scheduler.warmup_epochs": (0, None, True),
    "scheduler.step_size": (1, None, True),
    "scheduler.gamma": (0.0, 1.0, False),
    "scheduler.patience": (0, None, True),
    "scheduler.min_lr": (0.0, None, True),
    "trainer.max_epochs": (1, None, True),
    "trainer.accumulate_grad_batches": (1, None, True),
    "trainer.gradient_clip_val": (0.0, None, True),
    "trainer.early_stopping_patience": (0, None, True),
    "trainer.limit_train_batches": (0.0, None, False),
    "trainer.limit_val_batches": (0.0, None, True),
    "trainer.log_every_n_steps": (1, None, True),
    "trainer.num_nodes": (1, None, True),
    "seed": (0, 2**32 - 1, True),
}
