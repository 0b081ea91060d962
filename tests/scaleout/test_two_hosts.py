"""Two hosts, one DDP run: torchrun on two network namespaces joined by a veth pair (gloo on CPU).

Each namespace is a host with its own network stack: its loopback and one end of the veth pair,
nothing else, so the nodes reach each other only through the addresses given here (no route
leads anywhere else). Both share this machine's filesystem, as nodes on a shared disk do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from helpers import clean_env, fast_train_overrides, free_port
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint

ADDRESSES = ("10.213.0.1", "10.213.0.2")  # node 0 (the master) and node 1
NODE_TIMEOUT_S = 300  # one short run, including the imports, on a loaded 2-core machine
# trainer.ddp_timeout_s of these runs: a node that stops answering stops the other after this long.
# 60, not less: on a loaded 2-core machine one rank was once seen silent for 30 s between the first collectives.
DDP_TIMEOUT_S = 60
# A node killed outright (its connections reset) stops the other at once; an unreachable one after the timeout.
STOP_WITHIN_S = DDP_TIMEOUT_S + 60
# Launcher and scheduler variables of the shell pytest runs in must not reach the nodes.
_LAUNCHER_PREFIXES = ("SLURM_", "LSB_", "JSM_", "TORCHELASTIC_", "PMI_", "OMPI_")
_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


@dataclass
class Hosts:
    """Two network namespaces: ``namespaces[k]`` holds veth end ``ifnames[k]`` at ``ADDRESSES[k]``."""

    namespaces: tuple[str, str]
    ifnames: tuple[str, str]

    def pids(self, node: int) -> list[int]:
        """Every process running on ``node`` (all were started by this test: the namespace is its own)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self, node: int) -> None:
        """The node dies: SIGKILL to each of its processes (torchrun starts its workers in sessions of their own)."""
        for pid in self.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with two_hosts() as made:
        yield made


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair, removed (with anything still running in them) at the end.

    Written with iproute2's ``ip``: it is the standard tool for namespaces and veth pairs, and no
    installed Python library manages them.
    """
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be created: iproute2's 'ip' is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces cannot be created: creating them needs root")
    tag = f"pm{os.getpid() % 100000}"  # names unique to this pytest process; interface names stay <= 15 characters
    hosts = Hosts((f"{tag}-node0", f"{tag}-node1"), (f"{tag}veth0", f"{tag}veth1"))
    created: list[str] = []
    try:
        try:
            _ip("netns", "add", hosts.namespaces[0])
        except RuntimeError as exc:
            pytest.skip(f"network namespaces cannot be created here ({exc})")
        created.append(hosts.namespaces[0])
        _ip("netns", "add", hosts.namespaces[1])
        created.append(hosts.namespaces[1])
        _ip("link", "add", hosts.ifnames[0], "type", "veth", "peer", "name", hosts.ifnames[1])
        for ns, ifname, address in zip(hosts.namespaces, hosts.ifnames, ADDRESSES):
            _ip("link", "set", ifname, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", ifname, "up")
        yield hosts
    finally:
        for node, ns in enumerate(created):
            hosts.kill(node)
            deadline = time.monotonic() + 30
            while hosts.pids(node) and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth end, and so the pair, along
        # A veth end created before its move into a namespace would be left in this one.
        subprocess.run(["ip", "link", "del", hosts.ifnames[0]], capture_output=True)


def torchrun_line(node: int, port: int, train_args: list[str]) -> list[str]:
    """The command that starts pixelmill on ``node`` (the README shows it with placeholder addresses)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [
        str(torchrun), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", f"--master-addr={ADDRESSES[0]}", f"--master-port={port}",
        "-m", "pixelmill.cli", "train", *train_args,
    ]  # fmt: skip


@contextmanager
def start_nodes(hosts: Hosts, port: int, train_args: list[str], log_dir: Path, label: str) -> Iterator[list[subprocess.Popen]]:
    """Both nodes' torchrun, each in its namespace, output in ``log_dir/<label>-node<k>.log``; killed at the end if still running."""
    base = {k: v for k, v in clean_env({}).items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    procs: list[subprocess.Popen] = []
    try:
        for node in (0, 1):
            env = {**base, "GLOO_SOCKET_IFNAME": hosts.ifnames[node], "OMP_NUM_THREADS": "1"}
            with open(log_dir / f"{label}-node{node}.log", "wb") as log:
                cmd = ["ip", "netns", "exec", hosts.namespaces[node], *torchrun_line(node, port, train_args)]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir, start_new_session=True))
        yield procs
    finally:
        for node in range(len(procs)):
            if procs[node].poll() is None:
                hosts.kill(node)
                procs[node].wait(timeout=30)


def _output(log_dir: Path, label: str, node: int) -> str:
    return (log_dir / f"{label}-node{node}.log").read_text(errors="replace")


def _wait_finished(procs: list[subprocess.Popen], log_dir: Path, label: str) -> None:
    for node, proc in enumerate(procs):
        code = proc.wait(timeout=NODE_TIMEOUT_S)
        assert code == 0, f"node {node} exited with {code}:\n{_output(log_dir, label, node)[-4000:]}"


def _one_line_reason(output: str) -> str:
    """The CLI's one-line error (torchrun prefixes each line of a worker's output with ``[rankN]:``)."""
    lines = [line.split("]: ", 1)[-1] for line in output.splitlines() if "error: " in line]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def _single_process(args: list[str], cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=cwd, capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]


def _wait_for(done, what: str, proc: subprocess.Popen, timeout_s: float = NODE_TIMEOUT_S, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert proc.poll() is None, f"node 0 exited with {proc.returncode} before {what}" + (f":\n{log.read_text(errors='replace')[-3000:]}" if log else "")
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.05)


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _runs(digits_root: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    """The overrides of test_ddp: the one-process run of 32 images a batch, and the two-node one of 2 x 16."""
    mlflow = [f"tracking.mlflow.uri=sqlite:///{tmp_path}/mlruns.db", f"tracking.mlflow.artifact_location={tmp_path}/art"]
    common = ["optim.name=sgd", "optim.lr=0.01", "model.name=small_cnn_gn", "model.drop_rate=0.0", "data.eval_batch_size=32",
              "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "eval.splits=[]", "logger=[csv,mlflow]", "trainer.accelerator=cpu", *mlflow]
    two_nodes = ["data.batch_size=16", "trainer.strategy=ddp", "trainer.num_nodes=2", "trainer.devices=1", f"trainer.ddp_timeout_s={DDP_TIMEOUT_S}"]
    return [*common, "data.batch_size=32"], [*common, *two_nodes]


@pytest.mark.slow
def test_two_hosts_make_one_run_and_resume_after_a_node_dies(hosts, digits_root, tmp_path):
    """2 nodes x 1 rank x 16 images == 1 process x 32 images, as in test_ddp (same data, same 1e-4 tolerance);
    then node 1 dies mid-run: node 0 stops with a one-line reason, and resume on both nodes finishes the run."""
    started = time.monotonic()
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    one_process, two_nodes = _runs(digits_root, tmp_path)
    _single_process(fast_train_overrides(digits_root, runs, *one_process, "run_name=single", epochs=1), tmp_path)

    # --- One run on two hosts: one run directory, one MLflow run, the weights of one process.
    pair = fast_train_overrides(digits_root, runs, *two_nodes, "experiment=twohosts", "run_name=pair", epochs=1)
    with start_nodes(hosts, 29500, pair, logs, "pair") as procs:
        _wait_finished(procs, logs, "pair")
    assert sorted(p.name for p in (runs / "twohosts").iterdir()) == ["pair"], "exactly one run directory for both nodes"
    run_dir = runs / "twohosts" / "pair"
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["epochs_completed"] == 1
    one = _summary(runs / "default" / "single")["last_epoch_metrics"]
    assert one["val/loss"] == pytest.approx(summary["last_epoch_metrics"]["val/loss"], abs=1e-4)
    w1 = net_state_dict(read_checkpoint(runs / "default" / "single" / "checkpoints" / "last.ckpt"))
    w2 = net_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    print(f"largest weight difference two hosts vs one process: {worst:.2e}")
    assert worst < 1e-4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    found = client.search_runs([client.get_experiment_by_name("twohosts").experiment_id])
    assert len(found) == 1, "exactly one MLflow run for both nodes"
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "val/acc")] == [0]

    # --- Node 1 dies (every process of it, SIGKILL) once epoch 0 is on disk: node 0 stops at once, saying why.
    doomed_dir = runs / "twohosts-kill" / "doomed"
    doomed = fast_train_overrides(digits_root, runs, *two_nodes, "experiment=twohosts-kill", "run_name=doomed", epochs=4)
    with start_nodes(hosts, 29501, doomed, logs, "doomed") as procs:
        _wait_for(lambda: _summary(doomed_dir).get("epochs_completed", 0) >= 1, "finished epoch", procs[0], log=logs / "doomed-node0.log")
        killed_at = time.monotonic()
        hosts.kill(1)
        code = procs[0].wait(timeout=STOP_WITHIN_S)
        print(f"node 0 exited with {code} {time.monotonic() - killed_at:.1f} s after node 1 died")
    reason = _one_line_reason(_output(logs, "doomed", 0))
    print(reason)
    assert code != 0
    assert "lost a process" in reason and f"resume={doomed_dir}" in reason
    stopped = _summary(doomed_dir)
    assert stopped["status"] == "failed" and 1 <= stopped["epochs_completed"] < 4, stopped

    # --- resume=RUN_DIR on both nodes, under the same torchrun lines, finishes it.
    with start_nodes(hosts, 29502, [f"resume={doomed_dir}"], logs, "resume") as procs:
        _wait_finished(procs, logs, "resume")
    resumed = _summary(doomed_dir)
    assert resumed["status"] == "finished" and resumed["epochs_completed"] == 4
    assert [row.split(",")[0] for row in (doomed_dir / "metrics.csv").read_text().splitlines()[1:]] == ["0", "1", "2", "3"]
    found = client.search_runs([client.get_experiment_by_name("twohosts-kill").experiment_id])
    assert len(found) == 1, "the resumed run continues its MLflow run"
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "val/acc")] == [0, 1, 2, 3]
    print(f"wall time {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_an_unreachable_node_stops_the_run_after_the_ddp_timeout(hosts, digits_root, tmp_path):
    """Node 1's link goes down mid-run (a pulled cable: no connection is reset, packets just vanish):
    both nodes stop after trainer.ddp_timeout_s, not PyTorch's default 30 minutes, each with a one-line reason."""
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    run_dir = runs / "twohosts-cut" / "cut"
    args = fast_train_overrides(digits_root, runs, *_runs(digits_root, tmp_path)[1], "experiment=twohosts-cut", "run_name=cut", epochs=50)
    try:
        with start_nodes(hosts, 29503, args, logs, "cut") as procs:
            _wait_for(lambda: _summary(run_dir).get("epochs_completed", 0) >= 1, "finished epoch", procs[0], log=logs / "cut-node0.log")
            cut_at = time.monotonic()
            _ip("-n", hosts.namespaces[1], "link", "set", hosts.ifnames[1], "down")
            codes = [proc.wait(timeout=STOP_WITHIN_S) for proc in procs]
            stopped_s = time.monotonic() - cut_at
    finally:
        _ip("-n", hosts.namespaces[1], "link", "set", hosts.ifnames[1], "up")
    print(f"nodes exited with {codes} {stopped_s:.1f} s after node 1's link went down (trainer.ddp_timeout_s={DDP_TIMEOUT_S})")
    assert all(code != 0 for code in codes)
    for node in (0, 1):
        reason = _one_line_reason(_output(logs, "cut", node))
        print(f"node {node}: {reason}")
        assert "lost a process" in reason and f"resume={run_dir}" in reason
    assert _summary(run_dir)["status"] == "failed"


def test_torchrun_without_run_name_stops_every_rank_at_once(digits_root, tmp_path):
    """Every rank a launcher starts needs the same run name; without one all of them stop before training (none waits for the others)."""
    args = fast_train_overrides(digits_root, tmp_path / "runs", "experiment=unnamed", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", epochs=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "pixelmill.cli", "train", *args]
    env = {k: v for k, v in clean_env({}).items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    out = subprocess.run(cmd, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert out.returncode != 0
    reasons = [line for line in (out.stdout + out.stderr).splitlines() if "error: " in line]
    # The first rank to stop makes torchrun terminate the other, which may not have reached its own check yet:
    # one line or two, each the run_name one, and no rank left waiting (the run returned within the timeout).
    assert 1 <= len(reasons) <= 2 and all("run_name=NAME" in line for line in reasons), out.stderr[-3000:]
    assert not (tmp_path / "runs" / "unnamed").exists()


@pytest.mark.parametrize(
    "message",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.213.0.2]:740: Connection reset by peer",
        "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to complete",
        "Application timeout caused pair closure",  # the rank whose peer timed out first (seen on node 1 of the test above)
        "Connection closed by peer [10.213.0.1]:29503",
    ],
)
def test_every_way_gloo_reports_a_lost_peer_becomes_the_one_line_resume_advice(message):
    from pixelmill.training.fit import _lost_peer

    assert _lost_peer(RuntimeError(message))
    assert not _lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x10 and 12x10)"))
