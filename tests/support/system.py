"""System services for the tests that need them: a real PostgreSQL server and Debian's Chromium.

``make test`` installs both when missing (``make sysdeps``) and sets ``CBP_REQUIRE_SYSTEM_TESTS=1``: there a
missing binary fails the test. A developer without them (no root for apt) sees the tests skipped with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def require(what: str, found: bool, hint: str) -> None:
    if found:
        return
    msg = f"{what} not found: {hint}"
    if os.environ.get("CBP_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    hits = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if hits:
        return Path(hits[-1]).parent
    exe = shutil.which("initdb")
    return Path(exe).resolve().parent if exe else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` account when we are root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class PostgresServer:
    """A throw-away PostgreSQL cluster in a new temp directory on 127.0.0.1:<free port>, user/database
    ``dagster``, password authentication. (Its own directory under /tmp: pytest's temp tree is private to root,
    and the server runs as ``postgres``.)"""

    def __init__(self):
        bindir = pg_bin()
        require("PostgreSQL server (initdb)", bindir is not None,
                "install Debian's postgresql package (make sysdeps)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cbp-pg-"))
        self.data = self.root / "pgdata"
        self.sock = self.root / "sock"
        self.port = free_port()
        self.user = self.db = "dagster"
        self.password = "cbp-test"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(_as_postgres_user([str(self.bindir / cmd[0]), *cmd[1:]]), capture_output=True,
                              text=True, timeout=120)
        if check and proc.returncode:
            log = self.root / "server.log"
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}"
                               + (f"\nserver.log: {log.read_text()[-1500:]}" if log.exists() else ""))
        return proc

    def start(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile), "--auth=scram-sha-256",
                  "-E", "UTF8", "--locale=C")
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")
        env = {**os.environ, "PGPASSWORD": self.password}
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                        self.db], env=env, check=True, capture_output=True, text=True, timeout=60)
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {"CBP_PG_HOST": "127.0.0.1", "CBP_PG_PORT": str(self.port), "CBP_PG_USER": self.user,
                "CBP_PG_PASSWORD": self.password, "CBP_PG_DB": self.db}

    def warehouse(self, schema: str | None = None):
        """The production warehouse on this server, in its own schema (a fresh one by default)."""
        import uuid

        from resources import PostgresWarehouse

        return PostgresWarehouse(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                 database=self.db, schema_name=schema or f"t_{uuid.uuid4().hex[:12]}")

    def warehouse_env(self, schema: str) -> dict[str, str]:
        """Environment that points a deployment's warehouse at this server (configuration only)."""
        return {**self.env(), "CBP_WAREHOUSE": "postgres", "CBP_WAREHOUSE_SCHEMA": schema}

    def query(self, sql: str, params=None) -> list[tuple]:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                               dbname=self.db)
        try:
            with con.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            con.close()


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s ({last})")


CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@contextlib.contextmanager
def served(cmd: list[str], *, env: dict, cwd: Path, log_path: Path, ready_url: str, timeout_s: float,
           stop_timeout_s: float = 15):
    """A server process (its own session, output to ``log_path``) that answers ``ready_url``; stopped with
    SIGTERM to its process group on exit, SIGKILL if it does not stop within ``stop_timeout_s``. (``dagster dev``
    sometimes outlives SIGTERM with a run's processes still draining: seen at a 60 s fallback in a fresh-clone run;
    its instance is a temp directory, so the group is killed after 15 s.)"""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(ready_url, timeout_s, proc)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=stop_timeout_s)


@contextlib.contextmanager
def chromium_page(viewport: dict, timeout_ms: int):
    """A page of Debian's headless Chromium driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport=viewport)
        pg.set_default_timeout(timeout_ms)
        try:
            yield pg
        finally:
            browser.close()
