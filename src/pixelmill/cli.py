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

console = Console()
err = Console(stderr=True)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])
    logging.getLogger("pixelmill").setLevel(logging.INFO)


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
    from pixelmill.training.fit import resume, train as train_run

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
