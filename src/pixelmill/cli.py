"""The ``pixelmill`` command line. Each command parses, calls one library function, renders.

Nothing heavy is imported at module level: ``pixelmill --help`` must not import torch.
"""

from __future__ import annotations

import logging
import sys
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


def _setup_logging() -> None:
    """Rich log lines on a terminal; plain, unwrapped lines when stderr is a file or a pipe."""
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("pixelmill").setLevel(logging.INFO)
    # Lightning prints its own INFO lines; do not print them twice.
    logging.getLogger("lightning.pytorch").propagate = False


def _metrics_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _render_result(result) -> None:
    rows = [("status", result.status), ("run directory", str(result.run_dir))]
    if result.best_epoch is not None:
        rows.append(("best epoch", str(result.best_epoch)))
    for key in ("val/acc", "val/f1_macro"):
        if key in result.best_metrics:
            rows.append((f"best {key}", _fmt(result.best_metrics[key])))
    if result.test_metrics:
        rows += [("test accuracy", _fmt(result.test_metrics["accuracy"])), ("test macro F1", _fmt(result.test_metrics["f1_macro"]))]
    report = Path(result.run_dir) / "report.html"
    if report.is_file():
        rows.append(("report", str(report)))
    console.print(_metrics_table("pixelmill run", rows))


@app.command(context_settings={"allow_extra_args": False})
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value config overrides, e.g. data.path=DIR model.name=resnet18"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML config file."),
) -> None:
    """Train a classifier; `resume=RUN_DIR` continues a stopped run."""
    from pixelmill.config import load_config, parse_override
    from pixelmill.training.fit import resume
    from pixelmill.training.fit import train as train_run

    _setup_logging()
    overrides = list(overrides or [])
    resume_dir = next((v for k, v in map(parse_override, overrides) if k == "resume"), None)
    if resume_dir:
        rest = [o for o in overrides if parse_override(o)[0] != "resume"]
        result = resume(str(resume_dir), rest)
    else:
        result = train_run(load_config(overrides, config))
    _render_result(result)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-data"), help="Where the digits images are written."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides on top of the demo config."),
) -> None:
    """The main job: write scikit-learn's digits, train the small CNN, evaluate it on the test split."""
    from importlib import resources

    from pixelmill.config import load_config
    from pixelmill.data.demo import write_digits
    from pixelmill.training.fit import train as train_run

    _setup_logging()
    counts = write_digits(out)
    console.print(f"wrote {sum(counts.values())} digit images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    demo_cfg = resources.files("pixelmill.config").joinpath("demo.yaml")
    cfg = load_config([f"data.path={out}", *(overrides or [])], Path(str(demo_cfg)))
    _render_result(train_run(cfg))


@data_app.command("demo")
def data_demo(
    name: str = typer.Argument(..., help="digits, breast_cancer or wine"),
    out: Path = typer.Option(..., "--out", help="Output folder."),
) -> None:
    """Write a built-in real dataset (from scikit-learn) to OUT."""
    from pixelmill.data.demo import DEMO_DATASETS

    if name not in DEMO_DATASETS:
        raise PixelmillError(f"unknown demo dataset '{name}'; choose one of: {', '.join(DEMO_DATASETS)}")
    counts = DEMO_DATASETS[name](out)
    console.print(f"wrote {name} to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data_app.command("scan")
def data_scan(
    path: Path = typer.Argument(..., help="An image folder or a CSV manifest."),
    layout: str = typer.Option("auto", help="auto, split, flat or csv"),
) -> None:
    """Verify every image under PATH and print counts per split, class and skip reason."""
    from pixelmill.data.scan import scan_images

    _setup_logging()
    scan = scan_images(path, layout=layout)
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
    metrics, out = evaluate_run(run_dir, split=split, data=data, checkpoint=checkpoint)
    rows = [(k, _fmt(metrics.get(k))) for k in ("n", "accuracy", "balanced_accuracy", "f1_macro", "auc_macro", "log_loss", "ece")]
    rows.append(("written to", str(out)))
    console.print(_metrics_table(f"evaluation of {run_dir}", rows))


_RUN_COLUMNS = ("run", "experiment", "model", "status", "epochs", "best_epoch", "val/acc", "val/f1_macro", "test/acc", "fit_s")


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
    quantize: Optional[str] = typer.Option(None, help="int8: dynamic int8 quantisation (ONNX only)"),
    out: Optional[Path] = typer.Option(None, help="Bundle directory (default RUN_DIR/bundle, bundle-int8, bundle-torchscript)."),
    max_images: int = typer.Option(64, help="Evaluation images the export is checked on."),
    min_int8_agreement: float = typer.Option(0.99, help="int8 only: share of images whose top-1 must match PyTorch."),
    name: Optional[str] = typer.Option(None, help="Bundle name (default EXPERIMENT-RUN)."),
) -> None:
    """Export a run to a bundle checked against PyTorch on real evaluation images."""
    from pixelmill.export import export_run
    from pixelmill.tasks import TASKS

    _setup_logging()
    _quiet_exporters()
    bundle = export_run(
        run_dir, checkpoint=checkpoint, fmt=fmt, quantize=quantize, out=out, max_images=max_images,
        name=name, min_int8_agreement=min_int8_agreement,
    )
    info = bundle.info
    check = info.export
    noun = TASKS[info.kind].sample_noun
    inputs = f"{info.input.name} {info.input.dtype} {info.input.shape} {info.input.layout}" if info.input else f"{len(info.inputs or [])} named inputs"
    rows = [
        ("bundle", str(bundle.path)),
        ("model", f"{info.model_file} ({check['format']}{', int8' if check.get('quantize') else ''})"),
        ("input", inputs),
        ("classes", ", ".join(bundle.classes)),
        (f"checked {noun}", str(check["checked_images"])),
        ("top-1 agreement", f"{check['top1_agreement']:.2%}"),
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
    model: str = typer.Argument(..., help="A bundle directory, a run directory (its bundle/), models:/NAME@ALIAS or models:/NAME/VERSION."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1, or $PIXELMILL_HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000, or $PIXELMILL_PORT)."),
    workers: Optional[int] = typer.Option(None, help="uvicorn worker processes, one ONNX Runtime session each (default 1, or $PIXELMILL_WORKERS)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store for models:/ URIs."),
) -> None:
    """Serve a bundle over HTTP on ONNX Runtime: /predict, Open Inference Protocol v2 (/v2), /metrics, /docs.

    Every other setting comes from PIXELMILL_* variables (PIXELMILL_API_TOKEN, PIXELMILL_MAX_BATCH_SIZE, ...).
    """
    from pixelmill.serving.server import serve as run_server
    from pixelmill.serving.settings import load_settings

    run_server(load_settings(model=model, host=host, port=port, workers=workers, tracking_uri=tracking_uri))


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
    from pixelmill.tuning import tune as run_tune

    _setup_logging()
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


if __name__ == "__main__":
    main()
