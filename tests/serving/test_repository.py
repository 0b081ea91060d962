"""A fleet in one server: several names and versions, Triton's repository API, traffic split and shadow, reload, providers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import clean_env


def _files(digit_files: list[Path], n: int = 2) -> list:
    return [("files", (f.name, f.read_bytes(), "image/png")) for f in digit_files[:n]]


def _samples(url: str) -> list:
    return [s for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in family.samples]


def _wait_for(check, what: str, timeout_s: float = 30.0):
    """Poll ``check()`` until it returns something truthy (an observed state), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never observed: {what}"
        time.sleep(0.05)


def _serve_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixelmill.cli", "serve", *args], capture_output=True, text=True, timeout=120, env=clean_env(env or {}))


@pytest.fixture(scope="module")
def fleet(start_server, bundle_dir: Path):
    """One server: the bundle under its own name (version 1) and as `other` versions 7 and 8."""
    args = (f"other:7={bundle_dir}", f"other:8={bundle_dir}", "--traffic", "other=7:100")
    with start_server(args=args, env={"PIXELMILL_PROVIDERS": "cuda,cpu"}) as srv:
        yield srv


def test_several_names_and_versions_answer_on_their_routes(fleet, digit_files: list[Path], bundle_name: str) -> None:
    url = fleet.url
    unnamed = httpx.post(f"{url}/predict", files=_files(digit_files))
    assert unnamed.status_code == 400 and "serves 2 models" in unnamed.json()["error"] and "other" in unnamed.json()["error"]

    own = httpx.post(f"{url}/models/{bundle_name}/predict", files=_files(digit_files))
    assert own.status_code == 200 and own.headers["X-Model-Name"] == bundle_name and own.headers["X-Model-Version"] == "1"
    eight = httpx.post(f"{url}/models/other/versions/8/predict", files=_files(digit_files))
    assert eight.status_code == 200 and eight.headers["X-Model-Version"] == "8" and eight.json()["version"] == "8"
    assert eight.json()["model"] == "other"
    assert [p["label"] for p in eight.json()["predictions"]] == [p["label"] for p in own.json()["predictions"]]  # the same bundle
    default = httpx.post(f"{url}/models/other/predict", files=_files(digit_files))
    assert default.headers["X-Model-Version"] == "7"

    missing = httpx.post(f"{url}/models/other/versions/9/predict", files=_files(digit_files))
    assert missing.status_code == 404 and "has no version '9'" in missing.json()["error"] and "7, 8" in missing.json()["error"]
    assert httpx.post(f"{url}/models/nope/predict", files=_files(digit_files)).status_code == 404
    assert httpx.get(f"{url}/models/other/versions/8").json()["version"] == "8"
    assert httpx.get(f"{url}/model").status_code == 400

    meta = httpx.get(f"{url}/v2/models/other").json()
    assert meta["versions"] == ["7", "8"]
    # No accelerator here: cuda was asked for, the session runs on the CPU, and the log says so once.
    assert meta["providers"] == ["CPUExecutionProvider"]
    fallbacks = [r for r in fleet.log_records() if "CUDAExecutionProvider" in r.get("message", "")]
    assert len(fallbacks) == 1 and fallbacks[0]["level"] == "warning"

    samples = _samples(url)
    images = {(s.labels["model"], s.labels["version"]): s.value for s in samples if s.name == "pixelmill_images_total" and s.labels["batcher"] == "predict"}
    assert images[("other", "8")] >= 2 and images[(bundle_name, "1")] >= 2
    served = {(s.labels["model"], s.labels["version"]) for s in samples if s.name == "pixelmill_model_requests_total" and s.labels["role"] == "served"}
    assert {("other", "7"), ("other", "8"), (bundle_name, "1")} <= served


def test_tritonclient_reads_the_repository_and_infers_a_version(fleet, digit_files: list[Path]) -> None:
    import tritonclient.http as triton
    from PIL import Image

    client = triton.InferenceServerClient(fleet.url.removeprefix("http://"))
    index = client.get_model_repository_index()
    assert sorted((row["name"], row.get("version"), row["state"]) for row in index if row["name"] == "other") == [("other", "7", "READY"), ("other", "8", "READY")]
    image = np.asarray(Image.open(digit_files[0]).convert("L"))[None, :, :, None].astype(np.uint8)
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    result = client.infer("other", [tensor], model_version="8")
    assert result.get_response()["model_version"] == "8" and result.as_numpy("probabilities").shape == (1, 10)
    assert client.is_model_ready("other", "7") and not _ready(client, "other", "9")


def _ready(client, name: str, version: str) -> bool:
    try:
        return client.is_model_ready(name, version)
    except Exception:  # tritonclient raises on the 404
        return False


def test_traffic_split_is_sticky_by_header_and_refuses_bad_weights(fleet, digit_files: list[Path]) -> None:
    url = fleet.url
    bad = httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {"7": 60, "8": 30}})
    assert bad.status_code == 422 and "sum to 90, not 100" in bad.json()["error"]
    unknown = httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {"7": 50, "9": 50}})
    assert unknown.status_code == 422 and "no version '9'" in unknown.json()["error"]
    assert httpx.get(f"{url}/v2/repository/models/other/traffic").json()["weights"] == {"7": 100.0}  # unchanged

    assert httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {"7": 90, "8": 10}}).status_code == 200
    try:
        body = _files(digit_files, 1)
        sticky = {httpx.post(f"{url}/models/other/predict", files=body, headers={"X-Client-Id": "ward-3"}).headers["X-Model-Version"] for _ in range(15)}
        assert len(sticky) == 1  # one client, one version
        versions = Counter(
            httpx.post(f"{url}/models/other/predict", files=body, headers={"X-Client-Id": f"client-{i}"}).headers["X-Model-Version"] for i in range(200)
        )
        assert set(versions) == {"7", "8"} and 4 <= versions["8"] <= 40, versions  # about 10% of 200 clients

        leaving = httpx.post(f"{url}/v2/repository/models/other/unload", json={"parameters": {"version": "8"}})
        assert leaving.status_code == 409 and "traffic split" in leaving.json()["error"]
        assert httpx.post(f"{url}/models/other/versions/8/predict", files=body).status_code == 200  # still served
    finally:
        assert httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {"7": 100}}).status_code == 200


def test_a_shadow_version_gets_a_copy_that_is_compared_and_counted(fleet, digit_files: list[Path]) -> None:
    url = fleet.url
    assert httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {}, "shadow": "8"}).status_code == 200
    try:
        before = _shadow_answers(url)
        for _ in range(5):
            answer = httpx.post(f"{url}/models/other/predict", files=_files(digit_files, 3))
            assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "7"  # the shadow never answers
        # Version 8 is the same bundle: every one of the 15 copied images agrees with the served answer.
        after = _wait_for(lambda: (lambda now: now if now.get("agree", 0) - before.get("agree", 0) >= 15 else None)(_shadow_answers(url)), "15 shadow answers")
        assert after["agree"] - before.get("agree", 0) == 15 and after.get("disagree", 0) == before.get("disagree", 0)
        assert any(r.get("logger") == "pixelmill.serving.shadow" and "agree" in r["message"] for r in fleet.log_records())
    finally:
        httpx.post(f"{url}/v2/repository/models/other/traffic", json={"weights": {"7": 100}})


def _shadow_answers(url: str) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for s in _samples(url) if s.name == "pixelmill_shadow_answers_total" and s.labels["version"] == "8"}


def test_unload_and_load_a_version_through_the_repository_api(fleet, digit_files: list[Path]) -> None:
    import tritonclient.http as triton

    url = fleet.url
    assert httpx.post(f"{url}/v2/repository/models/other/unload", json={"parameters": {"version": "8"}}).status_code == 200
    assert httpx.post(f"{url}/models/other/versions/8/predict", files=_files(digit_files)).status_code == 404
    assert httpx.post(f"{url}/models/other/predict", files=_files(digit_files)).headers["X-Model-Version"] == "7"
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    client.load_model("other")  # its sources again: version 8 comes back
    assert [row["version"] for row in client.get_model_repository_index() if row["name"] == "other"] == ["7", "8"]
    assert httpx.post(f"{url}/models/other/versions/8/predict", files=_files(digit_files)).status_code == 200
    missing = httpx.post(f"{url}/v2/repository/models/nope/load")
    assert missing.status_code == 404 and "not in this server's repository" in missing.json()["error"]


def test_management_routes_take_the_admin_token(start_server, bundle_dir: Path, digit_files: list[Path], bundle_name: str) -> None:
    with start_server(env={"PIXELMILL_ADMIN_TOKEN": "adm1n"}) as srv:
        assert httpx.post(f"{srv.url}/predict", files=_files(digit_files)).status_code == 200  # no API token: open
        refused = httpx.post(f"{srv.url}/v2/repository/index")
        assert refused.status_code == 401 and "admin token" in refused.json()["error"]
        assert httpx.post(f"{srv.url}/v2/repository/models/{bundle_name}/load", headers={"Authorization": "Bearer wrong"}).status_code == 401
        admin = {"Authorization": "Bearer adm1n"}
        index = httpx.post(f"{srv.url}/v2/repository/index", headers=admin)
        assert index.status_code == 200 and index.json() == [{"name": bundle_name, "version": "1", "state": "READY", "reason": ""}]
        # The last model unloaded: nothing to answer with until it is loaded again, and the index says why.
        assert httpx.post(f"{srv.url}/v2/repository/models/{bundle_name}/unload", headers=admin).status_code == 200
        empty = httpx.post(f"{srv.url}/predict", files=_files(digit_files))
        assert empty.status_code == 503 and "no model is loaded" in empty.json()["error"]
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 503
        assert httpx.post(f"{srv.url}/v2/repository/index", headers=admin).json() == [{"name": bundle_name, "version": None, "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert httpx.post(f"{srv.url}/v2/repository/models/{bundle_name}/load", headers=admin).status_code == 200
        assert httpx.post(f"{srv.url}/predict", files=_files(digit_files)).status_code == 200


@pytest.mark.reliability("server: bad fleet SPECs, splits and providers exit 2 with one line")
@pytest.mark.parametrize(
    "case, args, env, message",
    [
        ("one name and version twice", ["a={b}", "a={b}"], {}, "two models under name 'a' version '1'"),
        ("weights not summing to 100", ["a:1={b}", "a:2={b}", "--traffic", "a=1:70,2:20"], {}, "sum to 90, not 100"),
        ("a split to a version not served", ["a:1={b}", "--traffic", "a=1:50,3:50"], {}, "version(s) 3, which are not served"),
        ("a shadow of a name not served", ["a={b}", "--shadow", "b=2"], {}, "traffic for 'b', which is not served"),
        ("an unknown execution provider", ["{b}"], {"PIXELMILL_PROVIDERS": "warp,cpu"}, "warp"),
        ("a folder without bundles", ["{empty}"], {}, "holds no bundle"),
    ],
)
def test_bad_fleets_fail_in_one_line_before_binding(case, args, env, message, bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _serve_cli(*[a.format(b=bundle_dir, empty=tmp_path / "empty") for a in args], "--port", "1", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_folder_of_bundles_serves_each_name_and_version(start_server, bundle_dir: Path, tmp_path: Path, digit_files: list[Path]) -> None:
    repo = tmp_path / "repo"
    for name, version in (("digits", "1"), ("digits", "2"), ("inspect", "3")):
        shutil.copytree(bundle_dir, repo / name / version)
    with start_server(model=str(repo)) as srv:
        index = httpx.post(f"{srv.url}/v2/repository/index").json()
        assert [(r["name"], r["version"]) for r in index] == [("digits", "1"), ("digits", "2"), ("inspect", "3")]
        assert httpx.post(f"{srv.url}/models/inspect/predict", files=_files(digit_files)).headers["X-Model-Version"] == "3"
        # A tampered copy that appears in the folder is refused at load; what was served stays served.
        shutil.copytree(bundle_dir, repo / "digits" / "4")
        data = bytearray((repo / "digits" / "4" / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (repo / "digits" / "4" / "model.onnx").write_bytes(bytes(data))
        refused = httpx.post(f"{srv.url}/v2/repository/models/digits/load")
        assert refused.status_code == 400 and "tampered" in refused.json()["error"] and "still serving version(s) 1, 2" in refused.json()["error"]
        assert any(r["level"] == "error" and "load of digits failed" in r["message"] for r in srv.log_records())
        assert httpx.post(f"{srv.url}/models/digits/versions/2/predict", files=_files(digit_files)).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_alias_moves_three_times_under_load_without_a_failed_request(
    workers: str, start_server, trained_run: Path, bundle_dir: Path, tmp_path: Path, digit_files: list[Path]
) -> None:
    from pixelmill.model_registry import promote, register

    run_copy = tmp_path / "run"
    shutil.copytree(trained_run, run_copy)
    shutil.copytree(bundle_dir, run_copy / "bundle")
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    artifacts = tmp_path / "artifacts"
    versions = [register(run_copy, "fleet", tracking_uri=store, artifact_location=str(artifacts)) for _ in range(5)]
    # The fifth version's files are damaged in the store: loading it must fail and leave the fourth serving.
    damaged = next(p for p in artifacts.rglob("model.onnx") if versions[4].run_id in str(p))
    damaged.write_bytes(damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 0xFF]))
    promote("fleet", versions[0].version, alias="champion", tracking_uri=store)

    env = {"PIXELMILL_CACHE_DIR": str(tmp_path / "cache"), "PIXELMILL_MAX_DELAY_MS": "2"}
    with start_server(model="models:/fleet@champion", args=("--tracking-uri", store, "--workers", workers), env=env) as srv:
        stop = threading.Event()
        seen: list[list[str]] = [[] for _ in range(16)]
        failures: list[str] = []
        body = _files(digit_files, 1)

        def client(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                while not stop.is_set():
                    try:
                        answer = http.post("/predict", files=body)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if answer.status_code != 200 or answer.json()["version"] != answer.headers.get("X-Model-Version"):
                        failures.append(f"{answer.status_code} {answer.text[:200]}")
                    seen[i].append(answer.headers.get("X-Model-Version", "?"))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        try:
            _wait_for(lambda: all(len(s) >= 3 for s in seen), "every client answered")
            for step, target in enumerate(versions[1:4], start=1):
                promote("fleet", target.version, alias="champion", tracking_uri=store)
                if step == 2:
                    srv.proc.send_signal(signal.SIGHUP)  # the operator's way
                else:
                    loaded = httpx.post(f"{srv.url}/v2/repository/models/fleet/load", timeout=60)
                    assert loaded.status_code == 200 and loaded.json()["default"] == str(target.version), loaded.text
                marks, wanted = [len(s) for s in seen], str(target.version)
                _wait_for(
                    lambda marks=marks, wanted=wanted: all(len(s) > m + 2 and s[-1] == wanted for s, m in zip(seen, marks)),
                    f"every client served by version {wanted}", 60,
                )

            promote("fleet", versions[4].version, alias="champion", tracking_uri=store)
            refused = httpx.post(f"{srv.url}/v2/repository/models/fleet/load", timeout=60)
            assert refused.status_code == 400 and "still serving version(s) 4" in refused.json()["error"], refused.text
            marks = [len(s) for s in seen]
            _wait_for(lambda: all(len(s) > m + 2 for s, m in zip(seen, marks)), "more answers after the refused load")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert failures == []
        for answers in seen:  # every answer named its version, and no client went back to an older one
            numbers = [int(v) for v in answers]
            assert numbers == sorted(numbers) and numbers[-1] == versions[3].version
        assert {v for s in seen for v in s} == {str(v.version) for v in versions[:4]}
        index = httpx.post(f"{srv.url}/v2/repository/index").json()
        assert [(r["name"], r["version"]) for r in index] == [("fleet", str(versions[3].version))]  # the old versions left
