"""The first hour of a new user: config mistakes answered before torch loads, every key discoverable
with `pixelmill config`, quiet training output with the next commands, and the README's
"Your own images in three commands" working as written."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import serve_process

ROOT = Path(__file__).resolve().parent.parent
PIXELMILL = [sys.executable, "-m", "pixelmill.cli"]
ENV = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
HEAVY = ("torch", "lightning", "mlflow", "timm", "torchvision")

# Runs `pixelmill ARGS` in this interpreter, then reports the exit code and which heavy packages were imported.
RUNNER = """
import sys
sys.argv = ["pixelmill", *sys.argv[1:]]
import pixelmill.cli as cli
code = 0
try:
    cli.main()
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(f"EXIT {code} HEAVY {','.join(heavy) or '-'}")
""" % (HEAVY,)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=ENV, cwd=cwd)


# ------------------------------------------------------------------ config errors before the heavy stack


@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainer.max_epoch=3"], "unknown config key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
        (["data.path=/nonexistent"], "data path '/nonexistent' does not exist"),
        (["data.path=/nonexistent", "optim.lr=-1"], "bad value -1 for 'optim.lr'"),
        (["data.path=.", "model.name=foo:resnet18"], "unknown model source 'foo'"),
        (["resume=/nonexistent/run"], "run directory '/nonexistent/run' does not exist"),
    ],
)
def test_config_error_is_one_line_before_torch_loads(args, expected, tmp_path):
    out = run_cli("train", *args, cwd=tmp_path)
    assert out.stdout.strip().endswith("EXIT 2 HEAVY -"), (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_config_file_errors_come_before_torch_too(tmp_path):
    (tmp_path / "exp.yaml").write_text("trainer:\n  max_epochs: many\n")
    out = run_cli("train", "--config", str(tmp_path / "exp.yaml"), cwd=tmp_path)
    assert out.stdout.strip().endswith("EXIT 2 HEAVY -"), (out.stdout, out.stderr)
    assert "trainer.max_epochs" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_demo_and_tune_check_their_config_before_torch_too(tmp_path):
    demo = run_cli("demo", "--out", str(tmp_path / "digits"), "trainer.max_epoch=2", cwd=tmp_path)
    assert demo.stdout.strip().endswith("EXIT 2 HEAVY -") and "did you mean 'trainer.max_epochs'" in demo.stderr, demo.stderr
    assert not (tmp_path / "digits").exists()  # nothing written for a run that cannot start
    tune = run_cli("tune", "trainer.max_epoch=2", "--space", str(tmp_path / "space.yaml"), "--trials", "1", cwd=tmp_path)
    assert tune.stdout.strip().endswith("EXIT 2 HEAVY -") and "did you mean 'trainer.max_epochs'" in tune.stderr, tune.stderr


# ------------------------------------------------------------------ pixelmill config


def test_config_lists_every_key_with_type_default_allowed_and_help():
    from pixelmill.config import describe

    out = subprocess.run(PIXELMILL + ["config"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    rows: dict[str, str] = {}
    cells: dict[str, list[list[str]]] = {}
    key = None
    for line in out.stdout.splitlines():
        if line.count("│") < 6:
            continue
        parts = [part.strip() for part in line.split("│")[1:-1]]
        key = parts[0] or key  # a row whose key cell is empty continues the wrapped row above
        rows[key] = rows.get(key, "") + line
        cells.setdefault(key, []).append(parts)
    for doc in describe():
        assert doc.key in rows, f"{doc.key} missing from `pixelmill config`"
        shown_help = " ".join(parts[-1] for parts in cells[doc.key] if parts[-1])  # the help column, unwrapped
        assert doc.help and doc.help == shown_help, doc.key
        assert doc.type in rows[doc.key], doc.key
    assert "auto, split, flat, csv" in rows["data.layout"] and "[1, inf)" in rows["trainer.max_epochs"]
    assert "csv, tensorboard, mlflow" in rows["logger"]  # a list value, not swallowed as markup
    assert "[8, 4096]" in rows["data.image_size"]


def test_config_shows_one_group_and_suggests_a_close_name():
    out = subprocess.run(PIXELMILL + ["config", "trainer"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    keys = re.findall(r"^│ ([a-z_.]+) +│", out.stdout, re.M)
    assert keys and all(k.startswith("trainer.") for k in keys) and "trainer.max_epochs" in keys
    bad = subprocess.run(PIXELMILL + ["config", "trainr"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "did you mean 'trainer'?" in bad.stderr and "Traceback" not in bad.stderr


def test_template_is_a_config_that_train_accepts(tmp_path):
    from pixelmill.config import load_config, schema_keys, to_yaml

    out = subprocess.run(PIXELMILL + ["config", "--template"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    exp = tmp_path / "exp.yaml"
    exp.write_text(out.stdout)
    assert to_yaml(load_config([], exp)) == to_yaml(load_config([]))  # round trip: every key at its default
    for key in schema_keys():
        assert re.search(rf"^\s*{re.escape(key.split('.')[-1])}:", out.stdout, re.M), key
    assert sum(line.lstrip().startswith("#") for line in out.stdout.splitlines()) >= len(schema_keys())
    edited = load_config(["optim.lr=0.01"], exp)  # a file plus overrides, as train reads them
    assert edited.optim.lr == 0.01
    # `pixelmill train --config` reads it: the run gets as far as the data path check.
    train = run_cli("train", "--config", str(exp), f"data.path={tmp_path}/photos", cwd=tmp_path)
    assert "does not exist" in train.stderr and train.stdout.strip().endswith("EXIT 2 HEAVY -"), train.stderr


def test_resolved_prints_the_config_a_run_would_use(tmp_path):
    out = subprocess.run(PIXELMILL + ["config", "--resolved", "trainer.max_epochs=3", "data=tabular"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    import yaml

    resolved = yaml.safe_load(out.stdout)
    assert resolved["trainer"]["max_epochs"] == 3 and resolved["data"]["kind"] == "tabular"
    bad = subprocess.run(PIXELMILL + ["config", "--resolved", "trainer.max_epoch=3"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "did you mean 'trainer.max_epochs'" in bad.stderr


# ------------------------------------------------------------------ the README section, quiet output, next steps

NOISE = (
    "litlogger",
    "limit_train_batches=1.0",
    "_pytree",
    "smaller than the logging interval",
    "Creating initial MLflow database tables",
    "Experiment with name",
    "v_num",
    "site-packages",
)
# Keeps the README's run to seconds on the suite's tiny images; everything else is as written.
FAST = ("trainer.max_epochs=1", "data.image_size=32", "data.batch_size=8")


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Your own images in three commands" block, `&&` chains split."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own images in three commands", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            commands.append(shlex.split(part))
    return commands


@pytest.fixture(scope="module")
def photos_run(tmp_path_factory, image_folder_factory):
    """The README's scan and train on a train/ and val/ folder of JPEGs; (cwd, {command: CompletedProcess})."""
    cwd = tmp_path_factory.mktemp("first-hour")
    for split, count in (("train", 12), ("val", 4)):
        image_folder_factory(cwd / "photos" / split, {"ants": count, "bees": count}, size=(48, 40), fmt="JPEG", seed=len(split))
    done = {}
    for cmd in readme_commands():
        assert cmd[0] == "pixelmill", cmd
        if cmd[1] in ("scan", "data", "train"):
            extra = list(FAST) if cmd[1] == "train" else []
            done[cmd[1]] = subprocess.run(PIXELMILL + cmd[1:] + extra, capture_output=True, text=True, env=ENV, cwd=cwd)
            assert done[cmd[1]].returncode == 0, done[cmd[1]].stdout[-2000:] + done[cmd[1]].stderr[-3000:]
    return cwd, done


def test_readme_has_the_three_commands_near_the_top():
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Your own images in three commands", headings
    verbs = [cmd[1] for cmd in readme_commands()]
    assert verbs[:2] == ["data", "train"] and "serve" in verbs


def test_readme_scan_and_train_work_on_a_folder_of_jpegs(photos_run):
    cwd, done = photos_run
    assert "ants" in done["data"].stdout and "bees" in done["data"].stdout
    assert "finished" in done["train"].stdout


def test_training_output_is_quiet_and_train_log_keeps_the_rest(photos_run):
    cwd, done = photos_run
    shown = done["train"].stdout + done["train"].stderr
    for noise in NOISE:
        assert noise not in shown, f"{noise!r} reached the terminal:\n{shown}"
    assert "scanned" in shown and "train/loss" in shown  # pixelmill's own lines and the progress bar stay
    (log,) = cwd.glob("runs/*/*/train.log")
    kept = log.read_text()
    for third_party in ("litlogger", "limit_train_batches=1.0", "smaller than the logging interval", "Creating initial MLflow database tables", "py.warnings"):
        assert third_party in kept, f"{third_party!r} missing from train.log"


def test_train_table_names_the_next_commands_for_the_run(photos_run):
    cwd, done = photos_run
    (run_dir,) = (p.parent for p in cwd.glob("runs/*/*/summary.json"))
    run = str(run_dir.relative_to(cwd))
    out = done["train"].stdout
    for command in (f"pixelmill evaluate {run}", f"pixelmill export {run}", f"pixelmill serve {run}/bundle"):
        assert command in out, out


def test_readme_export_and_serve_answer_a_prediction(photos_run, tmp_path):
    import httpx
    from PIL import Image

    cwd, _ = photos_run
    for cmd in readme_commands():
        if cmd[1] == "export":
            out = subprocess.run(PIXELMILL + cmd[1:], capture_output=True, text=True, env=ENV, cwd=cwd)
            assert out.returncode == 0, out.stderr[-3000:]
        elif cmd[1] == "serve":
            bundle = str(cwd / cmd[2])
            with serve_process(bundle, tmp_path, args=tuple(cmd[3:])) as server:
                buf = io.BytesIO()
                Image.open(next((cwd / "photos" / "val" / "ants").glob("*.jpg"))).save(buf, "JPEG")
                answer = httpx.post(f"{server.url}/predict", files={"files": ("a.jpg", buf.getvalue(), "image/jpeg")}, timeout=30)
                assert answer.status_code == 200, answer.text
                assert "ants" in answer.text or "bees" in answer.text


def test_verbose_shows_the_libraries_lines(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "imgs", {"a": 6, "b": 6}, size=(32, 32))
    out = subprocess.run(
        PIXELMILL + ["train", "--verbose", f"data.path={root}", *FAST, "logger=[csv]", "trainer.progress_bar=false"],
        capture_output=True, text=True, env=ENV, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "litlogger" in out.stderr and "smaller than the logging interval" in out.stderr


def test_a_library_warning_that_changes_results_is_said_in_our_words():
    import logging

    from pixelmill.cli import _OwnLines

    seen: list[tuple[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.name, record.getMessage()))

    handler = Keep()
    handler.addFilter(_OwnLines(handler))
    amp = ".../site-packages/lightning/pytorch/trainer/connectors/accelerator_connector.py:479: You passed " \
          "`Trainer(accelerator='cpu', precision='16-mixed')` but AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'` instead."
    for name, level, message in [
        ("py.warnings", logging.WARNING, amp),
        ("lightning.pytorch.utilities.rank_zero", logging.INFO, "💡 Tip: ... try installing [litlogger](...)"),
        ("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables..."),
        ("pixelmill.data.scan", logging.INFO, "scanned 24 images"),
        ("lightning.pytorch", logging.ERROR, "a library's error stays"),
    ]:
        handler.handle(logging.LogRecord(name, level, __file__, 1, message, None, None))
    assert [n for n, _ in seen] == ["pixelmill", "pixelmill.data.scan", "lightning.pytorch"], seen
    assert seen[0][1].startswith("trainer.precision=16-mixed does not run on CPU: this run trains in bf16-mixed")


def test_a_long_step_shows_a_spinner_on_a_terminal_only(image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "imgs", {"a": 3, "b": 3})
    tty = subprocess.run(PIXELMILL + ["data", "scan", str(root)], capture_output=True, text=True, env={**ENV, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"})
    assert tty.returncode == 0, tty.stderr
    assert "reading and verifying every image" in tty.stderr
    assert "INFO:pixelmill" not in tty.stderr  # the rich log line shows the message once, not logging's default format too
    piped = subprocess.run(PIXELMILL + ["data", "scan", str(root)], capture_output=True, text=True, env=ENV)
    assert piped.returncode == 0 and "reading and verifying" not in piped.stderr + piped.stdout
