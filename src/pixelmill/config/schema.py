"""The typed config schema: every key pixelmill accepts, its type and its default.

OmegaConf merges packaged YAML defaults, a user file and ``key=value`` overrides onto
these dataclasses, so an unknown key or a value of the wrong type is caught before any
work starts. Value checks that a type cannot express (choices, ranges) live in
``CHOICES`` and ``RANGES`` below, one table each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Optional

from pixelmill.data.choices import AUTO_AUGMENTS, CACHE_MODES, INTERPOLATIONS, LAYOUTS, LEAKAGE, SAMPLERS
from pixelmill.tasks import TASKS

# Choice lists of the keys outside data.* (those live in pixelmill.data.choices), each defined
# here only; the module that acts on a key checks its own table against the list.
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh")  # model.activation: models/nets.py
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop")  # optim.name: training/module.py
SCHEDULERS: tuple[str, ...] = ("none", "step", "cosine", "onecycle", "plateau")  # scheduler.name: training/module.py
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "mlflow", "wandb")  # logger (a list of them): tracking.py


@dataclass
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0
    color_jitter: float = 0.0
    random_resized_crop: bool = False
    scale_min: float = 0.8
    auto_augment: str = "none"
    translate: float = 0.0
    zoom: float = 0.0
    shear: float = 0.0
    blur: float = 0.0
    random_erasing: float = 0.0
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
    batch_size: Any = 64  # or auto: Lightning's batch-size finder (training/finders.py)
    eval_batch_size: Optional[int] = None
    num_workers: Any = "auto"  # auto: data/datamodule.py resolve_workers
    # Decoded, resized images kept after their first read: none, memory (shared RAM) or disk (mmap file).
    cache: str = "none"
    scan_cache: bool = True
    sampler: str = "shuffle"
    leakage: str = "warn"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    target: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)
    label_separator: str = "|"
    group_column: Optional[str] = None
    no_label: str = "No Finding"


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    pretrained: bool = False
    weights: Optional[str] = None
    in_chans: int = 3
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    freeze_backbone: bool = False
    ema: bool = False
    ema_decay: float = 0.9998  # timm train.py's --model-ema-decay
    ema_warmup: bool = True
    channels_last: Any = "auto"  # or true/false: training/recipe.py wants_channels_last
    grad_checkpointing: bool = False
    class_weights: str = "none"
    label_smoothing: float = 0.0
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: Any = 1e-3  # or auto: Lightning's learning-rate finder (training/finders.py)
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
    ddp_timeout_s: int = 1800  # PyTorch's default; a lost node stops the others after it
    sync_batchnorm: bool = False
    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    deterministic: bool = False
    monitor: str = "auto"  # the task's own default (tasks/*: default_monitor)
    mode: str = "max"
    early_stopping_patience: int = 0
    # Lightning's meaning: an int is a number of batches, a float in (0, 1] a fraction.
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    progress_bar: bool = True
    compile: bool = False
    swa: bool = False
    # Like limit_*: an int is an epoch number (1: the first), a float in (0, 1) a fraction of max_epochs.
    swa_epoch_start: Any = 0.8
    swa_lr: Optional[float] = None


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
    threshold: str = "auto"  # binary and multi-label decision rule (evaluation/rules.py), or a fixed probability
    positive_class: str = ""  # binary models: the class eval.threshold decides for ("": the second class)
    bootstrap: int = 1000  # resamples of the 95% confidence intervals (0: none)
    calibrate: str = "none"


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
    "data.leakage": LEAKAGE,
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
    "eval.calibrate": ("none", "temperature", "platt"),
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
    "data.augment.translate": (0.0, 0.5, True),
    "data.augment.zoom": (0.0, 0.9, True),
    "data.augment.shear": (0.0, 45.0, True),
    "data.augment.blur": (0.0, 1.0, True),
    "data.augment.random_erasing": (0.0, 1.0, True),
    "data.augment.mixup_alpha": (0.0, None, True),
    "data.augment.cutmix_alpha": (0.0, None, True),
    "model.in_chans": (1, 4, True),
    "model.drop_rate": (0.0, 1.0, True),
    "model.drop_path_rate": (0.0, 1.0, False),
    "model.ema_decay": (0.0, 1.0, False),
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
    "trainer.swa_lr": (0.0, None, False),
    "trainer.ddp_timeout_s": (1, None, True),
    "seed": (0, 2**32 - 1, True),
    "eval.bootstrap": (0, 100_000, True),
}

# What `pixelmill config` prints for the keys whose type annotation is Any.
SHOWN_TYPES: dict[str, str] = {
    "trainer.devices": "int | str | list",
    "trainer.limit_train_batches": "int | float",
    "trainer.limit_val_batches": "int | float",
    "trainer.swa_epoch_start": "int | float",
    "optim.lr": "float | auto",
    "data.batch_size": "int | auto",
    "data.num_workers": "int | auto",
    "model.channels_last": "bool | auto",
}

# Keys that take `auto` besides a number in their RANGES: what `auto` does is in DOCS.
AUTO_KEYS: tuple[str, ...] = ("optim.lr", "data.batch_size", "data.num_workers")
# Of those, the ones whose number must be whole.
INTEGER_KEYS: tuple[str, ...] = ("data.batch_size", "data.num_workers")

# One line per group, the headings of `pixelmill config` and of `pixelmill config --template`.
GROUP_DOCS: dict[str, str] = {
    "": "the run: where it is written, its name and seed",
    "data": "the data: where it is, how it is split, read and batched (data=image|digits|tabular|multilabel picks packaged defaults)",
    "data.augment": "training-time augmentation of images",
    "model": "the network (model=NAME takes any timm / torchvision / pixelmill name; pixelmill models lists them)",
    "optim": "the optimizer",
    "scheduler": "the learning-rate schedule",
    "trainer": "Lightning's Trainer: epochs, devices, precision, checkpoint metric (trainer=default|fast|ddp)",
    "tracking.mlflow": "the MLflow tracking store (when logger has mlflow)",
    "tracking.wandb": "Weights & Biases (when logger has wandb)",
    "eval": "the evaluation after training",
}

# One line per key: what `pixelmill config` prints. tests/config/test_config_docs.py fails when a
# schema key has none (or a line names a key the schema does not have).
DOCS: dict[str, str] = {
    "experiment": "experiment name: runs go to OUTPUT_DIR/EXPERIMENT/RUN and trackers group them by it",
    "run_name": "run folder name (default: the start time and a random suffix); needed by torchrun/SLURM",
    "output_dir": "folder that holds every experiment's runs",
    "seed": "seed of the split, the initial weights, the batch order and augmentation",
    "resume": "RUN_DIR of a stopped run to continue from its last checkpoint",
    "logger": "experiment trackers fed alike (a list, e.g. logger=[csv,mlflow])",
    "data.kind": "the task: what the data is and what the model predicts",
    "data.path": "an image folder (root/<class>/* or root/{train,val,test}/<class>/*), a CSV manifest, or for tabular a CSV file or a folder with train.csv",
    "data.layout": "how an image folder is laid out; auto detects train/ val/ test/ folders",
    "data.val_ratio": "share of the data held out for validation when the data has no val split",
    "data.test_ratio": "share of the data held out for the test evaluation when the data has no test split",
    "data.image_size": "input side in pixels (default: what the model was made for)",
    "data.crop_pct": "centre-crop share at evaluation (default: the model's, else 1.0)",
    "data.interpolation": "resize filter (default: the model's, else bilinear)",
    "data.batch_size": "samples per training batch; auto: Lightning's batch-size finder (doubling from 2; at most 256 off CUDA), kept in config.yaml",
    "data.eval_batch_size": "samples per validation / test batch (default: data.batch_size)",
    "data.num_workers": "data-loader worker processes (0: load in the training process); auto: the usable CPU cores per training process minus one, at most 8",
    "data.cache": "keep decoded, resized images after their first read: in shared RAM or a memory-mapped file",
    "data.scan_cache": "image data: keep each file's verification (by path, size, mtime) in $PIXELMILL_SCAN_CACHE_DIR; a re-run verifies only new or changed files",
    "data.sampler": "batch order: shuffle, or balanced (every class equally often)",
    "data.leakage": "byte-identical images in two splits: warn (listed in summary.json and the report) or error",
    "data.target": "tabular only: the CSV column to predict",
    "data.columns": "tabular only: column types that override inference, e.g. {zip: categorical, id: ignore}",
    "data.label_separator": "multilabel only: what separates an image's labels in the manifest's labels cell",
    "data.no_label": "multilabel only: the labels cell that means no label (an empty cell always does)",
    "data.group_column": "a manifest column (patient, lesion, part, lot): a group never spans two splits",
    "data.augment.hflip": "random horizontal flips",
    "data.augment.vflip": "random vertical flips",
    "data.augment.rotation": "random rotation up to this many degrees either way",
    "data.augment.color_jitter": "strength of random brightness / contrast / saturation changes",
    "data.augment.random_resized_crop": "random crops of the image, resized to data.image_size",
    "data.augment.scale_min": "smallest area share a random resized crop keeps",
    "data.augment.translate": "random shift up to this share of the width / height either way (0: off)",
    "data.augment.zoom": "random zoom in or out by up to this share (0.1: 90% to 110%; 0: off)",
    "data.augment.shear": "random shear up to this many degrees either way (0: off)",
    "data.augment.blur": "probability of a Gaussian blur (kernel a tenth of data.image_size, sigma 0.1 to 2)",
    "data.augment.random_erasing": "probability of erasing a random rectangle to the mean colour (timm's reprob; 0.25 is timm's usual)",
    "data.augment.auto_augment": "a learned augmentation policy on top of the above",
    "data.augment.mixup_alpha": "mixup strength (0: off)",
    "data.augment.cutmix_alpha": "cutmix strength (0: off)",
    "model.name": "architecture: a timm or torchvision name (tv: prefix forces torchvision) or small_cnn, xray_cnn, mlp",
    "model.pretrained": "start from the hub's pretrained weights (needs a network)",
    "model.weights": "a local .safetensors or state-dict file to start from (never an arbitrary pickle)",
    "model.in_chans": "input channels: 1 for grayscale, 3 for RGB",
    "model.drop_rate": "dropout before the classifier (default: the model's)",
    "model.drop_path_rate": "timm models: stochastic depth, the chance a residual block is skipped in training, rising to this value in the last block (default: the model's)",
    "model.freeze_backbone": "train only the classifier head",
    "model.ema": "keep an exponential moving average of the weights: validation, best/last checkpoints, evaluation and export use it",
    "model.ema_decay": "model.ema: the average's decay per optimizer step (timm's default 0.9998; closer to 1 remembers longer)",
    "model.ema_warmup": "model.ema: start with a low decay that rises towards model.ema_decay (timm's EMA warm-up), so short runs average recent weights",
    "model.channels_last": "NHWC memory format for the network's weights and its inputs; auto: on when 2-D convolutions hold most of the weights (CNNs train 1.1-1.6x faster on CPU, ViTs do not)",
    "model.grad_checkpointing": "timm models: recompute activations in the backward pass instead of storing them (less memory, slower steps)",
    "model.class_weights": "auto weights the loss by inverse class frequency (multilabel: each label's positives by negatives/positives in train)",
    "model.label_smoothing": "label smoothing of the cross-entropy loss",
    "model.hidden_sizes": "mlp only: widths of the hidden layers",
    "model.activation": "mlp only: activation between the hidden layers",
    "optim.name": "optimizer",
    "optim.lr": "learning rate; auto: Lightning's learning-rate finder (1e-8 to 1, needs 20+ steps per epoch), kept in config.yaml",
    "optim.weight_decay": "weight decay",
    "optim.momentum": "momentum (sgd, rmsprop)",
    "scheduler.name": "learning-rate schedule (none keeps optim.lr)",
    "scheduler.warmup_epochs": "epochs of linear warm-up before the schedule",
    "scheduler.step_size": "step: epochs between learning-rate drops",
    "scheduler.gamma": "step / plateau: factor of each drop",
    "scheduler.patience": "plateau: epochs without improvement before a drop",
    "scheduler.min_lr": "cosine / plateau: lowest learning rate",
    "trainer.max_epochs": "epochs to train",
    "trainer.accelerator": "where to train (auto: a GPU when there is one)",
    "trainer.devices": "devices per machine (an int, a list of ids or auto)",
    "trainer.strategy": "Lightning strategy, e.g. ddp for several devices",
    "trainer.num_nodes": "machines in a distributed run",
    "trainer.ddp_timeout_s": "seconds a distributed run waits for a silent process before it fails (lower: stop sooner after a node is lost)",
    "trainer.sync_batchnorm": "synchronise batch-norm statistics across GPUs",
    "trainer.precision": "numeric precision (16-mixed / bf16-mixed: mixed precision)",
    "trainer.accumulate_grad_batches": "batches whose gradients add up to one optimizer step",
    "trainer.gradient_clip_val": "clip gradients to this norm (0: off)",
    "trainer.deterministic": "deterministic kernels: the same run gives the same weights (slower on GPU)",
    "trainer.monitor": "metric that picks the best checkpoint and drives early stopping (auto: val/acc, multilabel val/map)",
    "trainer.mode": "whether a higher (max) or lower (min) trainer.monitor is better",
    "trainer.early_stopping_patience": "epochs without improvement before stopping (0: never stop early)",
    "trainer.limit_train_batches": "training batches per epoch: a number, or a fraction in (0, 1]",
    "trainer.limit_val_batches": "validation batches per epoch: a number, or a fraction in (0, 1]",
    "trainer.log_every_n_steps": "steps between logged training metrics",
    "trainer.progress_bar": "show a progress bar",
    "trainer.compile": "torch.compile the network (needs a working compiler: a C++ compiler on CPU, Triton on GPU)",
    "trainer.swa": "stochastic weight averaging of each epoch's final weights from trainer.swa_epoch_start on; validated and exported",
    "trainer.swa_epoch_start": "trainer.swa: the first epoch averaged, an epoch number (1: the first) or a fraction of trainer.max_epochs (0.8: the last 20%)",
    "trainer.swa_lr": "trainer.swa: the learning rate held from trainer.swa_epoch_start on (null: the schedule goes on)",
    "tracking.mlflow.uri": "MLflow tracking store (a sqlite:/// file, a folder or an http(s):// server)",
    "tracking.mlflow.artifact_location": "where MLflow keeps the run's files for a new experiment",
    "tracking.mlflow.parent_run_id": "nest this run under another MLflow run (hyper-parameter search)",
    "tracking.wandb.project": "W&B project",
    "tracking.wandb.mode": "online, offline or disabled (auto: online when WANDB_API_KEY is set)",
    "eval.top_k": "k values of the top-k accuracies reported",
    "eval.splits": "splits evaluated with the best checkpoint after training",
    "eval.calibrate": "fit calibration on val, applied inside the exported ONNX graph: temperature (multilabel: per label), platt (multilabel: scale and bias per label)",
    "eval.bootstrap": "resamples of the seeded 95% bootstrap intervals of test metrics (ci95 in metrics.json; 0: skip)",
    "eval.threshold": "binary/multilabel decision threshold rule on val: max_f1, youden, sensitivity@X, specificity@X, a probability, auto",
    "eval.positive_class": "binary models: the class eval.threshold decides for, the finding or defect (empty: the second class in class order)",
}
