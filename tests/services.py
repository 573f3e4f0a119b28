"""Real services on 127.0.0.1 for the `services` tests, started and stopped here (.ci/services/object_store.sh
installs them): an S3 API (moto's server), a fault-injecting HTTP proxy in front of it, PostgreSQL (Debian's),
and `mlflow server` on PostgreSQL + S3 artifacts + basic auth. Each start skips the test with the reason when the
service cannot start (its package not installed); every process is stopped by the fixture that started it."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trainer.distributed import free_port

REGION = "us-east-1"
INSTALL = "install it with .ci/services/object_store.sh"
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
             else 0, default=Path("/usr/lib/postgresql/15/bin"))  # Debian's, not on PATH


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"the service exited ({proc.returncode}): {tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def stop_group(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a service started in its own session (its whole process group), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class MotoS3:
    """`moto_server` (an in-memory S3 API) on 127.0.0.1. auth=True: requests are checked against IAM (moto's
    INITIAL_NO_AUTH_ACTION_COUNT): an IAM user with an s3:* policy is made and its key is `env`'s; otherwise any
    key is accepted. Data lives in memory: a restart comes back empty (`restart(refill=...)` puts it back)."""

    def __init__(self, root: Path, port: int | None = None, auth: bool = False):
        self.root, self.port, self.auth = Path(root), port or free_port(), auth
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc, self.key = None, ("testing-key", "testing-secret")

    def start(self) -> MotoS3:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not os.path.exists(exe):
            pytest.skip(f"moto_server not installed ({INSTALL})")
        env = dict(os.environ)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # create_user, create_access_key, put_user_policy
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / f"moto-{self.port}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_port(self.port, 120, self.proc, self.log)
        if self.auth:
            iam = self.boto("iam", key=("bootstrap", "bootstrap"))
            iam.create_user(UserName="trainer")
            k = iam.create_access_key(UserName="trainer")["AccessKey"]
            iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            self.key = (k["AccessKeyId"], k["SecretAccessKey"])
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        stop_group(self.proc, sig)
        self.proc = None

    def restart(self, down_s: float = 0.0, refill=None) -> None:
        """Kill the server (open connections reset), wait down_s, start it again on the same port, refill()."""
        self.stop(signal.SIGKILL)
        time.sleep(down_s)
        self.start()
        if refill is not None:
            refill()

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment a client of this server needs."""
        return {"AWS_ACCESS_KEY_ID": self.key[0], "AWS_SECRET_ACCESS_KEY": self.key[1],
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def boto(self, service: str = "s3", key: tuple[str, str] | None = None, endpoint: str | None = None):
        import boto3

        key = key or self.key
        return boto3.client(service, endpoint_url=endpoint or self.endpoint, aws_access_key_id=key[0],
                            aws_secret_access_key=key[1], region_name=REGION)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults into GET object requests whose
    path contains `match`: `delay_s` before each answer, `slowdown` answers 503 SlowDown (the next N), `resets`
    connections closed mid-body after `reset_after` bytes (the next N), `hang` requests never answered (until
    cleared). `counts` tells what was injected. Other requests pass unchanged; while `closed`, every connection
    ends without an answer (the upstream restarting), and an upstream that dies mid-answer cuts the answer."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.match, self.delay_s, self.slowdown, self.resets, self.reset_after = ".tar", 0.0, 0, 0, 4096
        self.hang, self.closed = False, False
        self.counts = {"gets": 0, "delayed": 0, "slowdown": 0, "resets": 0, "hung": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _abort(self):
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.closed:  # the upstream is down (restarting): the connection ends without an answer
                    return self._abort()
                try:
                    self._relay(body)
                except OSError:  # the upstream died mid-answer: so does this connection
                    self._abort()

            def _relay(self, body):
                fault = proxy._fault(self.command, self.path)
                if fault == "slowdown":
                    msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please "
                           b"reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "hang":
                    while proxy.hang:
                        time.sleep(0.1)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()
                left = proxy.reset_after if fault == "reset" else None
                while chunk := r.read(1 << 16):
                    if left is not None and len(chunk) >= left:
                        self.wfile.write(chunk[:left])
                        self.wfile.flush()
                        self._abort()  # the peer sees the body cut short
                        conn.close()
                        return
                    if left is not None:
                        left -= len(chunk)
                    self.wfile.write(chunk)
                conn.close()
                if r.length:  # the upstream ended early
                    self._abort()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _fault(self, method: str, path: str) -> str | None:
        if method != "GET" or self.match not in path:
            return None
        with self.lock:
            self.counts["gets"] += 1
            if self.delay_s:
                self.counts["delayed"] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            if self.hang:
                self.counts["hung"] += 1
                return "hang"
            if self.slowdown > 0:
                self.slowdown -= 1
                self.counts["slowdown"] += 1
                return "slowdown"
            if self.resets > 0:
                self.resets -= 1
                self.counts["resets"] += 1
                return "reset"
        return None

    def stop(self) -> None:
        self.hang = False
        self.server.shutdown()
        self.server.server_close()


class Postgres:
    """PostgreSQL (Debian's binaries) in a temp dir on 127.0.0.1: initdb + pg_ctl, as the `postgres` user when
    this runs as root (initdb refuses root)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "pgdata"
        self.port = free_port()
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"  # psycopg2-binary

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> Postgres:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL is not installed ({PG_BIN}/initdb missing; {INSTALL})")
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip(f"no postgres user to run PostgreSQL as ({INSTALL})")
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir.parent, 0o777)
            for parent in self.dir.parents:  # the postgres user must reach its data directory
                if str(parent) in ("/", "/tmp"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o711)
            self.dir.mkdir()
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        else:
            self.dir.mkdir(parents=True)
        self._run("initdb", "-D", str(self.dir), "-A", "trust", "-U", "postgres")
        self.up()
        return self

    def up(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def down(self) -> None:
        """Stop the server (fast: open connections are closed). Raises if it was running and did not stop."""
        self._run("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop", check=False)


def wait_for_mlflow(server, timeout: float) -> None:
    """Wait until the `mlflow server` started as `server.proc` answers at `server.uri` + /health. RuntimeError with the
    end of its log (`server.log`, a path) when it exits, or when it is not up after `timeout` s (then server.stop())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {server.log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server not up after {timeout:.0f} s: {server.log.read_text(errors='replace')[-2000:]}")


class MlflowServer:
    """`mlflow server` with a PostgreSQL backend, artifacts proxied to an S3 bucket, and MLflow's basic-auth app
    (admin user `admin`, password `password`), on 127.0.0.1, in its own process group."""

    ADMIN = ("admin", "admin-password-1234")

    def __init__(self, root: Path, backend_uri: str, s3: MotoS3, bucket: str = "mlflow-artifacts"):
        self.root, self.backend_uri, self.s3, self.bucket = Path(root), backend_uri, s3, bucket
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 240) -> MlflowServer:
        import importlib.util

        for module, package in (("flask_wtf", "Flask-WTF (mlflow[auth])"), ("psycopg2", "psycopg2-binary"),
                                ("boto3", "boto3")):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"the MLflow server needs {package}, not installed ({INSTALL})")
        with contextlib.suppress(Exception):
            self.s3.boto().create_bucket(Bucket=self.bucket)
        self.root.mkdir(parents=True, exist_ok=True)
        ini = self.root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                       f"admin_username = {self.ADMIN[0]}\nadmin_password = {self.ADMIN[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       "auth_cache_ttl_seconds = 300\n")  # else a password hash (PBKDF2) per request: ~1 s here
        env = {**os.environ, **self.s3.env, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
               "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key"}
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        self.log = self.root / "server.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", f"s3://{self.bucket}/artifacts", "--app-name", "basic-auth"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, env=env)
        wait_for_mlflow(self, timeout)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        stop_group(self.proc, sig)
        self.proc = None

    def add_user(self, username: str, password: str) -> None:
        """A user of the server (basic-auth's REST API, as the admin)."""
        import base64

        req = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/users/create", method="POST",
                                     data=json.dumps({"username": username, "password": password}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Basic " +
                                              base64.b64encode(":".join(self.ADMIN).encode()).decode()})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.read()
