"""Credentials in a URI, a command or the environment never reach the terminal or the disk (issue 25, item 2): a real
run reads its shards over HTTP with a password in data.root, tracks to a URI with a password and has a secret in its
environment; stdout, stderr, config.yaml, the checkpoint, the tracking state and the pending events hold none of
them, and the same command resumes the run (the credentials come from the command line again)."""
import http.server
import json
import os
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from tests.trainer.test_trainer_loop import clean_env, tiny
from trainer.redact import MASK, redact, redact_tree

pytestmark = pytest.mark.timeout(300)

SECRETS = ("s3cr3tPW", "tr4ckPW", "envS3cretValue", "p1peTok", "s1gnature")


@pytest.mark.parametrize("text,kept", [
    ("http://bob:s3cr3tPW@host:5000/api", "http://bob:"),
    ("postgresql://bob:s3cr3tPW@db/mlflow", "@db/mlflow"),
    ("pipe:curl -s -u carol:p1peTok https://h/a-{000..3}.tar", "https://h/a-{000..3}.tar"),
    ("pipe:curl -H 'Authorization: Bearer p1peTok' https://h/a.tar", "Authorization: Bearer"),
    ("pipe:aws s3 cp --aws-secret-access-key p1peTok s3://b/a.tar -", "s3://b/a.tar"),
    ("pipe:env AWS_SECRET_ACCESS_KEY=p1peTok aws s3 cp s3://b/a.tar -", "AWS_SECRET_ACCESS_KEY="),
    ("https://b.s3.amazonaws.com/a.tar?X-Amz-Signature=s1gnature&X-Amz-Expires=60", "X-Amz-Expires=60"),
    ("https://acct.blob.core.windows.net/c/a.tar?sv=2022&sig=s1gnature", "sv=2022"),
])
def test_redact_removes_the_secret_and_keeps_the_rest(text, kept):
    out = redact(text)
    assert not any(s in out for s in SECRETS) and MASK in out and kept in out, out


def test_redact_leaves_plain_values_alone(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "envS3cretValue")
    for plain in ("/data/cub200", "s3://bucket/shards/train", "sqlite:////runs/mlflow.db", "http://host:5000",
                  "train.batch_size=64 --passes 3", "https://h/x?keys=1"):
        assert redact(plain) == plain
    assert redact_tree({"a": ["x envS3cretValue y", 3]}) == {"a": [f"x {MASK} y", 3]}


@pytest.fixture
def http_shards(shards):
    """The digits shards served over HTTP on 127.0.0.1 (any user and password accepted)."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=shards, **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def leaks(text):
    return [s for s in SECRETS if s in text]


def files_with_secrets(root):
    found = []
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                data = fh.read()
            found += [(os.path.join(d, f), s) for s in SECRETS if s.encode() in data]
    return found


def test_no_credential_on_screen_or_disk_and_the_run_resumes(http_shards, tmp_path):
    from trainer.distributed import free_port
    closed = free_port()  # nothing listens there: the tracker keeps its events in pending.jsonl
    out = tmp_path / "runs"
    args = tiny(f"http://alice:s3cr3tPW@127.0.0.1:{http_shards}", out, "tracking.enabled=true",
                f"tracking.tracking_uri=http://bob:tr4ckPW@127.0.0.1:{closed}/", "eval.every_epochs=0")
    env = {**clean_env(), "AWS_SECRET_ACCESS_KEY": "envS3cretValue", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    for max_steps, word in ((5, "stopped at"), (8, "resumed from")):
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "trainer", *args, f"train.max_steps={max_steps}"],
                           capture_output=True, text=True, timeout=200, env=env)
        said = p.stdout + p.stderr
        assert p.returncode == 0 and word in said and time.monotonic() - t < 150, said[-3000:]
        assert not leaks(said), (leaks(said), said[-3000:])
        assert not files_with_secrets(out), files_with_secrets(out)
    run = out / "t"
    assert f"http://alice:{MASK}@127.0.0.1" in (run / "config.yaml").read_text()
    state = json.loads((run / "tracking" / "mlflow" / "state.json").read_text())
    assert state["tracking_uri"] == f"http://bob:{MASK}@127.0.0.1:{closed}/"
    from trainer.checkpoint import Checkpointer, load
    saved = load(Checkpointer(str(run / "checkpoints")).latest())
    assert saved["step"] == 8 and MASK in saved["config"]["tracking"]["tracking_uri"]
    events = (run / "tracking" / "mlflow" / "pending.jsonl").read_text()
    assert "params" in events and "dataset" in events and not leaks(events)

    # the upload CLI does not take the redacted URI for a real one: it asks for it
    p = subprocess.run([sys.executable, "-m", "trainer.tracking", "upload", str(run)], capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"})
    assert p.returncode == 2 and "--tracking-uri" in p.stderr and not leaks(p.stderr), p.stderr[-2000:]


@pytest.mark.services
@pytest.mark.timeout(600)
def test_no_credential_reaches_a_real_mlflow_server(shards, tmp_path):
    """The run's params, tags, dataset input and config.yaml artifact, and the server's own files, hold no password
    of the tracking URI the run was given (`mlflow server` on 127.0.0.1)."""
    from mlflow.tracking import MlflowClient

    from tests.helpers import free_port
    from tests.trainer.tracking.test_tracking_server import MlflowServer
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root, free_port()).start()
    try:
        uri = server.uri.replace("http://", "http://bob:tr4ckPW@")
        args = tiny(shards, tmp_path / "runs", "tracking.enabled=true", f"tracking.tracking_uri={uri}",
                    "train.max_steps=5")
        p = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=300,
                           env={**clean_env(), "AWS_SECRET_ACCESS_KEY": "envS3cretValue"})
        said = p.stdout + p.stderr
        assert p.returncode == 0 and not leaks(said), said[-3000:]
        client = MlflowClient(server.uri)
        run_id = json.loads((tmp_path / "runs" / "t" / "tracking" / "mlflow" / "state.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.data.params["tracking.tracking_uri"] == uri.replace("tr4ckPW", MASK)
        assert not leaks(json.dumps(run.data.params)) and not leaks(json.dumps(run.data.tags))
        with open(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))) as f:
            config = f.read()
        assert MASK in config and not leaks(config)
    finally:
        server.stop()
    assert not files_with_secrets(root) and not files_with_secrets(tmp_path / "runs")


def test_a_picture_that_fails_to_draw_warns_without_the_data_urls_password():
    """The retrieval picture of shards served over HTTP fails (its image lookup needs local shards); the warning
    quotes the split's URL, whose password is masked."""
    from trainer.tracking.tracker import Tracker

    def _retrieval_grid():
        raise FileNotFoundError("split_dir 'http://alice:dataPW99@127.0.0.1:8099/digits/test' is not a local directory")

    with pytest.warns(RuntimeWarning) as caught:
        Tracker._picture(None, _retrieval_grid)
    said = " ".join(str(w.message) for w in caught)
    assert "dataPW99" not in said and "alice:***@" in said
