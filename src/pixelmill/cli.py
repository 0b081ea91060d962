"""The ``pixelmill`` command line. Each command parses, calls one library function, renders.

Nothing heavy is imported at module level: ``pixelmill --help`` must not import torch.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from pixelmill.errors import PixelmillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate, export and serve image and tabular classifiers.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets and data checks.")
app.add_typer(data_app, name="data")
runs_app = typer.Typer(no_args_is_help=True, help="List, show and compare run directories.")
app.add_typer(runs_app, name="runs")
registry_app = typer.Typer(no_args_is_help=True, help="MLflow Model Registry: register, list, promote.")
app.add_typer(registry_app, name="registry")

console = Console()
err = Console(stderr=True)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, even when it was replaced after set-up (a notebook, a test runner)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# Third-party warnings that change what a run computes, said in pixelmill's words on the
# terminal (the original stays in train.log, and --verbose shows it as is).
_REWORDED: tuple[tuple[str, str], ...] = (
    (
        "precision='16-mixed')` but AMP with fp16 is not supported on CPU",
        "trainer.precision=16-mixed does not run on CPU: this run trains in bf16-mixed (set trainer.precision=bf16-mixed or 32 to choose)",
    ),
    (
        "GPU available but not used",
        "a GPU is available but this run trains on the CPU; set trainer.accelerator=auto to use it",
    ),
)


class _OwnLines(logging.Filter):
    """pixelmill's own log lines; another library's only when it is an error or changes the results.

    Third-party warnings, tips and notices (Lightning, MLflow, Python warnings) still reach
    ``train.log``; ``--verbose`` shows them on the terminal too.
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pixelmill" or record.name.startswith("pixelmill.") or record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        for needle, ours in _REWORDED:
            if needle in message:
                self.handler.handle(logging.makeLogRecord({**record.__dict__, "name": "pixelmill", "msg": ours, "args": None,
                                                           "levelno": logging.WARNING, "levelname": "WARNING"}))
        return False


def _setup_logging(verbose: bool = False) -> None:
    """Rich log lines on a terminal; plain, unwrapped lines when stderr is a file or a pipe."""
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))  # RichHandler shows time and level itself; basicConfig would add them again
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if not verbose:
        handler.addFilter(_OwnLines(handler))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("pixelmill").setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings become log records: filtered above, kept in train.log
    _lightning_through_root()


def _lightning_through_root() -> None:
    """Lightning gives its loggers a console handler of their own when it is imported; without
    it their lines reach the handler above once, through its filter. Call again after an import."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
        logger.propagate = True


@contextmanager
def _working(text: str):
    """A spinner and the time so far on a terminal while a long step runs; nothing on a pipe or file."""
    if not err.is_terminal:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as progress:
        progress.add_task(text, total=None)
        yield


def _metrics_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# The test figures shown after training, those the run's task reports (single-label, multi-label).
_TEST_HEADLINE = (("accuracy", "accuracy"), ("map", "mAP"), ("f1_macro", "macro F1"), ("f1_micro", "micro F1"))


def _render_result(result) -> None:
    rows = [("status", result.status), ("run directory", str(result.run_dir))]
    if result.best_epoch is not None:
        rows.append(("best epoch", str(result.best_epoch)))
    for key in ("val/acc", "val/map", "val/f1_macro"):
        if key in result.best_metrics:
            rows.append((f"best {key}", _fmt(result.best_metrics[key])))
    test = result.test_metrics or {}
    rows += [(f"test {name}", _fmt(test[key])) for key, name in _TEST_HEADLINE if key in test]
    report = Path(result.run_dir) / "report.html"
    if report.is_file():
        rows.append(("report", str(report)))
    rows += _next_steps(result)
    console.print(_metrics_table("pixelmill run", rows))


def _next_steps(result) -> list[tuple[str, str]]:
    """The commands that come next for this run, its path filled in."""
    import shlex

    run = str(result.run_dir)
    if result.status == "interrupted":
        return [("continue", f"pixelmill train resume={shlex.quote(run)}")]
    if result.status != "finished":
        return []
    evaluated = sorted(p.name for p in (Path(run) / "eval").glob("*") if p.is_dir())
    split = "" if not evaluated or "test" in evaluated else f" --split {evaluated[0]}"  # a run without a test split
    return [
        ("next: evaluate", f"pixelmill evaluate {shlex.quote(run)}{split}"),
        ("next: export", f"pixelmill export {shlex.quote(run)}"),
        ("next: serve", f"pixelmill serve {shlex.quote(str(Path(run) / 'bundle'))}  (after export)"),
    ]


_VERBOSE = typer.Option(False, "--verbose", "-v", help="Also show other libraries' warnings and notices (train.log has them either way).")


@app.command(context_settings={"allow_extra_args": False})
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value config overrides, e.g. data.path=DIR model.name=resnet18 (every key: pixelmill config)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML config file (pixelmill config --template writes one)."),
    verbose: bool = _VERBOSE,
) -> None:
    """Train a classifier; `resume=RUN_DIR` continues a stopped run. `pixelmill config` lists every key."""
    from pixelmill.config import check_inputs, load_config, parse_override

    _setup_logging(verbose)
    overrides = list(overrides or [])
    resume_dir = next((v for k, v in map(parse_override, overrides) if k == "resume"), None)
    # The config, the data path and the model name are checked before torch and Lightning load.
    from pixelmill.runs import resolve_run_dir

    if resume_dir:
        resolve_run_dir(str(resume_dir))
        rest = [o for o in overrides if parse_override(o)[0] != "resume"]
        with _working("loading PyTorch and Lightning"):
            from pixelmill.training.fit import resume

        _lightning_through_root()
        result = resume(str(resume_dir), rest)
    else:
        cfg = load_config(overrides, config)
        if cfg.resume:  # `resume: RUN_DIR` in the config file
            resolve_run_dir(str(cfg.resume))
        else:
            check_inputs(cfg)
        with _working("loading PyTorch and Lightning"):
            from pixelmill.training.fit import train as train_run

        _lightning_through_root()
        result = train_run(cfg)
    _render_result(result)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-data"), help="Where the digits images are written."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides on top of the demo config."),
    verbose: bool = _VERBOSE,
) -> None:
    """The main job: write scikit-learn's digits, train the small CNN, evaluate it on the test split."""
    from importlib import resources

    from pixelmill.config import load_config

    _setup_logging(verbose)
    demo_cfg = resources.files("pixelmill.config").joinpath("demo.yaml")
    cfg = load_config([f"data.path={out}", *(overrides or [])], Path(str(demo_cfg)))  # a typo fails before anything is written
    from pixelmill.data.demo import write_digits

    counts = write_digits(out)
    console.print(f"wrote {sum(counts.values())} digit images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    with _working("loading PyTorch and Lightning"):
        from pixelmill.training.fit import train as train_run
    _lightning_through_root()
    _render_result(train_run(cfg))


@app.command("config")
def config_command(
    items: Optional[List[str]] = typer.Argument(None, help="Groups or keys to show (trainer, data.augment, model.name); with --resolved, key=value overrides."),
    template: bool = typer.Option(False, "--template", help="Print a commented YAML file of every key at its default, for train --config."),
    resolved: bool = typer.Option(False, "--resolved", help="Print the config a run would use with these overrides (and --config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="With --resolved: a YAML config file under the overrides."),
) -> None:
    """Every config key: its type, default, allowed values and what it does, grouped like the config."""
    from rich.markup import escape

    from pixelmill import config as cfgmod

    if template and resolved:
        raise PixelmillError("pick one of --template and --resolved")
    if resolved:
        sys.stdout.write(cfgmod.to_yaml(cfgmod.load_config(items or [], config)))
        return
    if config is not None:
        raise PixelmillError("--config goes with --resolved (pixelmill config --resolved --config FILE key=value ...)")
    if template:
        if items:
            raise PixelmillError("--template writes every key; drop the group names")
        sys.stdout.write(cfgmod.template())
        return
    docs = cfgmod.describe()
    wanted = list(items or [])
    for item in wanted:
        if not any(d.key == item or d.key.startswith(f"{item}.") for d in docs):
            import difflib

            names = [g for g in cfgmod.config_groups() if g] + [d.key for d in docs]
            close = difflib.get_close_matches(item, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            groups = ", ".join(g for g in cfgmod.config_groups() if g)
            raise PixelmillError(f"no config group or key '{item}'; {hint}(groups: {groups})")
    shown = [d for d in docs if not wanted or any(d.key == i or d.key.startswith(f"{i}.") for i in wanted)]
    for group in cfgmod.config_groups():
        rows = [d for d in shown if d.group == group]
        if not rows:
            continue
        about = cfgmod.GROUP_DOCS.get(group, "")
        table = Table(title=f"[bold]{group or 'run'}[/]" + (f": {about}" if about else ""), title_justify="left", highlight=False)
        for column in ("key", "type", "default", "allowed", "description"):
            table.add_column(column, overflow="fold", style="bold" if column == "key" else None)
        for d in rows:
            table.add_row(*map(escape, (d.key, d.type, cfgmod.yaml_value(d.default), d.allowed, d.help)))
        console.print(table)
    if not wanted:
        console.print("Set a key with key=value (pixelmill train trainer.max_epochs=20) or in a file: pixelmill config --template > exp.yaml")


@data_app.command("demo")
def data_demo(
    name: str = typer.Argument(..., help="digits, breast_cancer, wine, multidigits or patches"),
    out: Path = typer.Option(..., "--out", help="Output folder."),
) -> None:
    """Write a built-in real dataset (from scikit-learn) to OUT."""
    from pixelmill.data.demo import DEMO_DATASETS, DEMO_NEXT_STEPS

    if name not in DEMO_DATASETS:
        raise PixelmillError(f"unknown demo dataset '{name}'; choose one of: {', '.join(DEMO_DATASETS)}")
    counts = DEMO_DATASETS[name](out)
    console.print(f"wrote {name} to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if name in DEMO_NEXT_STEPS:
        console.print("next: " + DEMO_NEXT_STEPS[name].format(out=out), soft_wrap=True)


@data_app.command("scan")
def data_scan(
    path: Path = typer.Argument(..., help="An image folder or a CSV manifest."),
    layout: str = typer.Option("auto", help="auto, split, flat or csv"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse the verdicts of files unchanged since an earlier scan (the scan cache)."),
) -> None:
    """Verify every image under PATH and print counts per split, class and skip reason."""
    from pixelmill.data.scan import scan_images

    _setup_logging()
    with _working(f"scanning {path}: reading and verifying every image"):
        scan = scan_images(path, layout=layout, cache=cache)
    table = Table(title=f"{path} ({scan.layout} layout)")
    table.add_column("class")
    for split in scan.splits:
        table.add_column(split, justify="right")
    for name in scan.classes:
        table.add_row(name, *[str(scan.class_counts(s).get(name, 0)) for s in scan.splits])
    console.print(table)
    for reason, n in scan.bad_counts().items():
        console.print(f"skipped {n} file(s): {reason}")


@app.command()
def models(pattern: Optional[str] = typer.Argument(None, help="A glob such as 'resnet*'.")) -> None:
    """List the model names `model.name=` accepts."""
    from pixelmill.models import list_models

    names = list_models(pattern)
    table = Table(title=f"{len(names)} models")
    table.add_column("name")
    table.add_column("source")
    for name, source in names:
        table.add_row(name, source)
    console.print(table)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    split: str = typer.Option("test", help="test, val or train"),
    data: Optional[Path] = typer.Option(None, help="Any image folder with the run's classes."),
    checkpoint: str = typer.Option("best", help="best, last or a checkpoint path"),
) -> None:
    """Evaluate a trained run on a split or another folder; writes RUN_DIR/eval/<split>/."""
    from pixelmill.evaluation.evaluate import evaluate_run

    _setup_logging()
    with _working(f"evaluating {run_dir} on {data or split}"):
        metrics, out = evaluate_run(run_dir, split=split, data=data, checkpoint=checkpoint)
    keys = ("n", "accuracy", "balanced_accuracy", "map", "f1_micro", "f1_macro", "auc_macro", "subset_accuracy", "hamming_loss", "log_loss", "ece")
    rows = [(k, _fmt(metrics[k])) for k in keys if k in metrics]
    rows.append(("written to", str(out)))
    console.print(_metrics_table(f"evaluation of {run_dir}", rows))


_RUN_COLUMNS = ("run", "experiment", "model", "status", "epochs", "best_epoch", "val/acc", "val/map", "val/f1_macro", "test/acc", "test/map", "fit_s")


@runs_app.command("list")
def runs_list(
    experiment: Optional[str] = typer.Option(None, help="Only this experiment."),
    output_dir: Path = typer.Option(Path("runs"), help="Where runs live (the config's output_dir)."),
) -> None:
    """One line per run: status (finished, failed, interrupted, killed), best metrics, duration."""
    from pixelmill import runs

    table = Table(title=f"runs under {output_dir}")
    for column in _RUN_COLUMNS:
        table.add_column(column, justify="right" if column not in ("run", "experiment", "model", "status") else "left")
    for run_dir in runs.list_runs(output_dir, experiment):
        row = runs.describe(run_dir)
        table.add_row(*[_fmt(row[c]) if row[c] is not None else "" for c in _RUN_COLUMNS])
    console.print(table)


@runs_app.command("show")
def runs_show(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """A run's status, metrics and full config."""
    from pixelmill import runs

    run_dir = runs.resolve_run_dir(run_dir)
    row = runs.describe(run_dir)
    console.print(_metrics_table(str(run_dir), [(k, _fmt(v)) for k, v in row.items() if v is not None]))
    console.print(_metrics_table("config", [(k, _fmt(v)) for k, v in runs.params(run_dir).items()]))


@runs_app.command("compare")
def runs_compare(run_dirs: List[Path] = typer.Argument(..., help="Two or more run directories.")) -> None:
    """Metrics side by side, and every config key whose value differs between the runs."""
    from pixelmill import runs

    dirs = [runs.resolve_run_dir(d) for d in run_dirs]
    rows, configs = [runs.describe(d) for d in dirs], [runs.params(d) for d in dirs]
    table = Table(title="comparison")
    table.add_column("")
    for d in dirs:
        table.add_column(d.name, justify="right")
    for key in _RUN_COLUMNS[2:]:
        table.add_row(key, *[_fmt(r[key]) if r[key] is not None else "" for r in rows])
    keys = sorted({k for c in configs for k in c})
    for key in keys:
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            table.add_row(f"[bold]{key}[/]", *[_fmt(v) for v in values])
    console.print(table)


def _quiet_exporters() -> None:
    """Exporter, quantiser and MLflow chatter (warnings, INFO lines) stays out of the CLI output."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("torch.onnx", "onnxruntime", "onnxscript", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    checkpoint: str = typer.Option("best", help="best, last or a checkpoint path"),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    quantize: Optional[str] = typer.Option(
        None, help="int8: static int8, calibrated on the run's training images (the fast one); int8-dynamic: weights only, reads no images (ONNX only)"
    ),
    out: Optional[Path] = typer.Option(None, help="Bundle directory (default RUN_DIR/bundle, bundle-int8, bundle-int8-dynamic, bundle-torchscript)."),
    max_images: int = typer.Option(64, help="Evaluation images the export is checked on."),
    min_int8_agreement: float = typer.Option(0.99, help="int8 only: share of images whose top-1 (multi-label: of label decisions) must match PyTorch."),
    calibration_images: Optional[int] = typer.Option(None, help="--quantize int8: training images the activation ranges are measured on (default 128)."),
    calibration_method: Optional[str] = typer.Option(None, help="--quantize int8: percentile (default), minmax or entropy - ONNX Runtime's calibrators."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default EXPERIMENT-RUN)."),
) -> None:
    """Export a run to a bundle checked against PyTorch on real evaluation images."""
    from pixelmill.export import export_run
    from pixelmill.tasks import TASKS

    _setup_logging()
    _quiet_exporters()
    with _working(f"exporting {run_dir} and checking it against PyTorch"):
        bundle = export_run(
            run_dir, checkpoint=checkpoint, fmt=fmt, quantize=quantize, out=out, max_images=max_images,
            name=name, min_int8_agreement=min_int8_agreement, calibration_images=calibration_images, calibration_method=calibration_method,
        )
    info = bundle.info
    check = info.export
    noun = TASKS[info.kind].sample_noun
    inputs = f"{info.input.name} {info.input.dtype} {info.input.shape} {info.input.layout}" if info.input else f"{len(info.inputs or [])} named inputs"
    quantization = check.get("quantization") or {}
    rows = [
        ("bundle", str(bundle.path)),
        ("model", f"{info.model_file} ({check['format']}{', int8 ' + quantization.get('mode', '') if check.get('quantize') else ''})"),
        *([("calibration", f"{quantization['calibration_method']} on {quantization['calibration_images']} training images")] if "calibration_images" in quantization else []),
        ("input", inputs),
        ("classes", ", ".join(bundle.classes)),
        (f"checked {noun}", str(check["checked_images"])),
        ("top-1 agreement", f"{check['top1_agreement']:.2%}"),
        *([("label agreement", f"{check['label_agreement']:.2%}")] if "label_agreement" in check else []),
        ("max |p - p_torch|", f"{check['max_abs_diff']:.2e}"),
    ]
    console.print(_metrics_table("pixelmill export", rows))


@app.command()
def predict(
    model: str = typer.Argument(..., help="A run directory, a bundle directory, models:/NAME@ALIAS or models:/NAME/VERSION."),
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs; for a tabular model one CSV file."),
    top_k: int = typer.Option(3, "--top-k", help="Classes to show per image."),
    out: Optional[Path] = typer.Option(None, help="Write predictions to a .csv or .json file instead of a table."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store for models:/ URIs."),
    checkpoint: str = typer.Option("best", help="For a run directory: best, last or a checkpoint path."),
) -> None:
    """Predict labels for images (or a CSV's rows); unreadable files get a row with the error."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pixelmill.inference.predictor import Predictor

    _setup_logging()
    _quiet_exporters()
    # One-thread sessions: predict_files runs one batch per core side by side.
    predictor = Predictor.load(model, tracking_uri=tracking_uri, checkpoint=checkpoint, threads=1)
    bar = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True)
    shown: list = []

    def on_progress(done: int, total: int) -> None:
        if total > 4 and not shown:  # a bar only for more than a handful of inputs
            bar.start()
            shown.append(bar.add_task("predict", total=total))
        if shown:
            bar.update(shown[0], completed=done)

    try:
        result = predictor.task.predict_inputs(predictor, inputs, top_k, batch_size, out, on_progress)
    finally:
        bar.stop()
    total = len(result.rows)
    if out is not None:
        console.print(f"wrote {total} prediction(s) to {out}" + (f" ({result.failed} unreadable)" if result.failed else ""))
    else:
        table = Table(title=f"{total} prediction(s)")
        for column in result.columns:
            table.add_column(column, overflow="fold" if column == "input" else None)
        for row in result.rows:
            table.add_row(*row)
        console.print(table)
    if result.failed:
        err.print(f"[yellow]{result.failed} of {total} input(s) could not be read[/]")


@app.command()
def explain(
    model: str = typer.Argument(..., help="A run directory (Grad-CAM in PyTorch), a bundle directory with the explain output, or models:/..."),
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class (default: the predicted class; multi-label: each predicted label)."),
    out: Path = typer.Option(Path("explanations"), "--out", help="Folder for <image>_<class>.png (heatmap over the image) and .npy (the map)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Run directories: the layer Grad-CAM explains (default: the last feature map)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store for models:/ URIs."),
    checkpoint: str = typer.Option("best", help="For a run directory: best, last or a checkpoint path."),
) -> None:
    """Show where the model looked: a heatmap per image over the image, for its predicted class or --class."""
    from pixelmill.errors import ConfigError
    from pixelmill.explain.images import explain_images, write_explanations
    from pixelmill.inference.predictor import Predictor, expand_inputs

    _setup_logging()
    _quiet_exporters()
    predictor = Predictor.load(model, tracking_uri=tracking_uri, checkpoint=checkpoint)
    if layer is not None:
        if not hasattr(predictor.classifier, "layer"):
            raise ConfigError("--layer applies to run directories (Grad-CAM in PyTorch); a bundle's maps come from its final feature map")
        predictor.classifier.layer = layer
    results = explain_images(predictor.classifier, expand_inputs(inputs), class_name)
    written = write_explanations(results, out)
    table = Table(title=f"{len(written)} heatmap(s) in {out}")
    for column in ("input", "class", "probability", "peak (row, col)"):
        table.add_column(column, overflow="fold" if column == "input" else None)
    failed = [r for r in results if r.error is not None]
    for result in results:
        for explanation in result.explanations:
            table.add_row(result.source, explanation.label, f"{explanation.probability:.4f}", str(explanation.peak()))
    console.print(table)
    for result in failed:
        err.print(f"[bold red]error:[/] {result.error}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


def _versions_table(title: str, versions) -> Table:
    table = Table(title=title)
    for column in ("name", "version", "aliases", "test accuracy", "created", "run id"):
        table.add_column(column)
    for v in versions:
        accuracy = v.tags.get("test/accuracy") or v.tags.get("val/accuracy") or ""
        table.add_row(v.name, str(v.version), ", ".join(v.aliases), accuracy, v.created_at or "", v.run_id or "")
    return table


@registry_app.command("register")
def registry_register(
    run_dir: Path = typer.Argument(..., help="A run directory (its bundle/ is exported first if missing)."),
    name: str = typer.Option(..., "--name", help="Registered model name."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store (default: the run's tracking.mlflow.uri)."),
    artifact_location: Optional[str] = typer.Option(None, help="Artifact root for a new MLflow experiment."),
) -> None:
    """Log RUN_DIR's bundle to MLflow (ONNX flavour + bundle artifacts) and register a new version."""
    from pixelmill.model_registry import register

    _setup_logging()
    _quiet_exporters()
    info = register(run_dir, name, tracking_uri=tracking_uri, artifact_location=artifact_location)
    console.print(f"registered [bold]{info.name}[/] version [bold]{info.version}[/] (run {info.run_id}): models:/{info.name}/{info.version}")


@registry_app.command("list")
def registry_list(
    name: Optional[str] = typer.Argument(None, help="A registered model name; all models when omitted."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)."),
) -> None:
    """List registered models, or every version of NAME."""
    from pixelmill.model_registry import list_versions

    _quiet_exporters()
    versions = list_versions(name, tracking_uri=tracking_uri)
    console.print(_versions_table(f"{name} versions" if name else "registered models (latest and aliased versions)", versions))


@registry_app.command("promote")
def registry_promote(
    name: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Argument(..., help="Version to promote."),
    alias: str = typer.Option("champion", help="Alias to point at VERSION."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)."),
) -> None:
    """Point an alias (default champion) at a version: models:/NAME@ALIAS then resolves to it."""
    from pixelmill.model_registry import promote

    _quiet_exporters()
    info = promote(name, version, alias=alias, tracking_uri=tracking_uri)
    console.print(f"models:/{info.name}@{alias} -> version {info.version}")


@app.command()
def serve(
    models: List[str] = typer.Argument(
        ...,
        metavar="SPEC...",
        help="[NAME[:VERSION]=]SOURCE, repeatable: a bundle, a run directory (its bundle/), models:/NAME@ALIAS, "
        "models:/NAME/VERSION, or a folder of bundles (NAME/VERSION/bundle.json).",
    ),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1, or $PIXELMILL_HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000, or $PIXELMILL_PORT)."),
    workers: Optional[int] = typer.Option(None, help="uvicorn worker processes, one ONNX Runtime session each (default 1, or $PIXELMILL_WORKERS)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store for models:/ URIs."),
    traffic: Optional[List[str]] = typer.Option(None, "--traffic", help="Split a name's traffic by weight: NAME=VERSION:WEIGHT,VERSION:WEIGHT (sum 100). Repeatable."),
    shadow: Optional[List[str]] = typer.Option(None, "--shadow", help="NAME=VERSION gets a copy of NAME's requests; its answers are compared and counted only. Repeatable."),
) -> None:
    """Serve bundles over HTTP on ONNX Runtime: /predict, Open Inference Protocol v2 (/v2), /metrics, /docs.

    Several SPECs serve several models (or versions of one) in one server; SIGHUP or
    POST /v2/repository/models/NAME/load resolves models:/NAME@ALIAS again without dropping a request.
    Every other setting comes from PIXELMILL_* variables (PIXELMILL_API_TOKEN, PIXELMILL_PROVIDERS, ...).
    """
    from pixelmill.serving.server import serve as run_server
    from pixelmill.serving.settings import load_settings

    given = dict(models=list(models), host=host, port=port, workers=workers, tracking_uri=tracking_uri, traffic=traffic or None, shadow=shadow or None)
    run_server(load_settings(**given))


@app.command()
def tune(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides applied to every trial."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The base YAML config of every trial."),
    space: Path = typer.Option(..., "--space", help="YAML: config key -> {type: float|int|categorical, low, high, log, step | choices}."),
    trials: int = typer.Option(..., "--trials", min=1, help="Complete + pruned trials the study should have, across all workers."),
    storage: Optional[str] = typer.Option(None, help="Study database shared by workers (postgresql://..., mysql://...); default: a SQLite file in the study dir."),
    study: Optional[str] = typer.Option(None, help="Study name, also the trials' experiment; default: EXPERIMENT-tune."),
    heartbeat: int = typer.Option(30, min=1, help="Seconds between trial heartbeats; a trial silent for two is failed and retried."),
    startup_trials: int = typer.Option(5, min=0, help="Trials that finish before the median pruner prunes any."),
    warmup_epochs: int = typer.Option(1, min=0, help="Epochs of every trial that are never pruned."),
) -> None:
    """Search hyper-parameters with Optuna; each trial is a run. Start it on several machines to share one study."""
    from pixelmill.config import load_config

    _setup_logging()
    load_config(overrides or [], config)  # a mistake in the base config answers before the heavy imports
    with _working("loading PyTorch, Lightning and Optuna"):
        from pixelmill.tuning import tune as run_tune
    _lightning_through_root()
    result = run_tune(
        space, trials, overrides or [], config, storage=storage, study_name=study, heartbeat=heartbeat,
        startup_trials=startup_trials, warmup_epochs=warmup_epochs,
    )
    table = Table(title=f"study {result.study_name} ({result.storage})")
    for column in ("trial", "state", "value", "params", "run"):
        table.add_column(column, justify="right" if column in ("trial", "value") else "left", overflow="fold")
    for row in result.trials:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        table.add_row(str(row["number"]), row["state"], "" if row["value"] is None else _fmt(row["value"]), params, Path(row["run_dir"] or "").name)
    console.print(table)
    if result.best:
        console.print(f"best: trial {result.best['number']} ({_fmt(result.best['value'])})")
        console.print(f"best config: {result.best_config} (pixelmill train --config {result.best_config})")
    for plot in result.plots:
        console.print(f"plot: {plot}")


@app.command("cv")
def cross_validation(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides applied to every fold run."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The base YAML config of every fold run."),
    folds: Optional[int] = typer.Option(None, "--folds", "-k", help="Number of folds K (at least 2)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="A cross-validation directory to continue; it keeps its config and folds."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the cross-validation directory (default: cv-TIME); fold runs are NAME-fold-K."),
    verbose: bool = _VERBOSE,
) -> None:
    """Cross-validate: K runs on group-aware, stratified folds of train+val; a test split stays fixed. --resume continues."""
    import shlex

    from pixelmill import crossval  # torch-free until it trains
    from pixelmill.config import check_inputs, load_config
    from pixelmill.errors import ConfigError

    _setup_logging(verbose)
    if resume is not None:
        if folds is not None or config is not None or overrides or name:
            raise ConfigError("--resume continues a cross-validation with its own config and folds; drop --folds, --config, --name and key=value")
        crossval.check_cv_dir(resume)
    else:
        if folds is None:
            raise ConfigError("pass --folds K (at least 2) to start a cross-validation, or --resume CV_DIR to continue one")
        crossval.check_folds(folds)
        check_inputs(load_config(overrides or [], config))  # a mistake in the config answers before the heavy imports
    with _working("loading PyTorch and Lightning"):
        import pixelmill.training.fit  # noqa: F401  (the heavy imports, behind the spinner)
    _lightning_through_root()
    if resume is not None:
        result = crossval.resume(resume)
    else:
        result = crossval.cross_validate(overrides or [], folds, config, name=name)
    if result.status != "finished":
        console.print(f"cross-validation {result.status}; continue with: pixelmill cv --resume {shlex.quote(str(result.cv_dir))}")
        return
    table = Table(title=f"cross-validation {result.name} ({result.folds} folds, mean \u00b1 sample std)")
    for column in ("split", "metric", "mean \u00b1 std", "per fold"):
        table.add_column(column, justify="right" if column != "split" and column != "metric" else "left")
    for split, part in (result.summary or {}).get("splits", {}).items():
        for key, label in _TEST_HEADLINE:
            if key in part["mean"]:
                std = part["std"][key]
                per_fold = ", ".join(_fmt(row["metrics"][key]) if key in row["metrics"] else "-" for row in part["per_fold"])
                table.add_row(split, label, f"{_fmt(part['mean'][key])} \u00b1 {_fmt(std) if std is not None else '-'}", per_fold)
    console.print(table)
    console.print(f"fold runs: {', '.join(str(d) for d in result.run_dirs)}", soft_wrap=True)
    console.print(f"summary: {result.cv_dir / crossval.SUMMARY_FILE}", soft_wrap=True)
    console.print(f"report: {result.report}", soft_wrap=True)


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    try:
        app()
    except PixelmillError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    finally:
        # The interpreter's last garbage collection at exit walks every object torch, Lightning,
        # MLflow and matplotlib created: 2.3 s after a training run on this 2-core machine, with
        # nothing left to write by then (trackers and files are closed; atexit hooks still run).
        # Frozen objects are left to the process's end instead.
        import gc

        gc.freeze()


if __name__ == "__main__":
    main()
