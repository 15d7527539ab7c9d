"""A running platform, traffic through its gateway, and a browser, for the console's tests.

`passerelle up` runs for the whole session on free loopback ports with a data directory of
its own, and is stopped by its PID (SIGINT, as Ctrl-C, then SIGKILL for whatever is left),
also when a test fails. Every wait polls a condition against a deadline: a fixed sleep
would be too short on a loaded CI machine and too long everywhere else.

Configuration, from the environment (``cargo xtask browser`` sets all of it):

- ``PASSERELLE_BIN``: the ``passerelle`` binary;
- ``CHROMIUM``: the browser Playwright drives (Debian's ``/usr/bin/chromium``);
- ``AXE_JS``: axe-core's ``axe.min.js``;
- ``SCREENSHOTS``: where the screenshots go (``docs/screenshots``).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

VIEWPORT = {"width": 1366, "height": 768}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def env_path(name: str, default: Path) -> Path:
    return Path(os.environ.get(name, str(default)))


BIN = env_path("PASSERELLE_BIN", ROOT / "target" / "debug" / "passerelle")
CHROMIUM = env_path("CHROMIUM", Path("/usr/bin/chromium"))
AXE_JS = os.environ.get("AXE_JS")
SCREENSHOTS = env_path("SCREENSHOTS", ROOT / "docs" / "screenshots")

# Clients of their own, so that draining their rate limits leaves the tests' own traffic
# (from 127.0.0.1) alone: every 127/8 address is loopback on Linux.
THROTTLED_CLIENT = "127.0.0.2"
COMPOSE_CLIENT = "127.0.0.3"


def wait_for(what: str, check, timeout: float = 15.0, every: float = 0.05):
    """Polls `check` until it returns something truthy, which is returned; fails after
    `timeout` seconds naming `what` and the last value or error seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - reported below if it never succeeds
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        # The poll interval of a deadline-bounded wait, not a synchronization.
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str:
        return self.headers.get(name) or ""

    def json(self):
        return json.loads(self.body)


def request(
    base: str,
    method: str,
    path: str,
    body=None,
    headers: dict | None = None,
    source: str | None = None,
) -> Reply:
    """One HTTP request (standard library only), from the loopback address `source`."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(
        host, int(port), timeout=10, source_address=(source, 0) if source else None
    )
    try:
        data = None
        headers = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, r.headers, r.read())
    finally:
        conn.close()


class Platform:
    """`passerelle up` in a directory of its own, on free loopback ports."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data = workdir / "data"
        self.gateway = f"http://127.0.0.1:{free_port()}"
        self.admin = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "up.log", "w")  # noqa: SIM115 - closed in stop()
        self.summary: list[str] = []
        env = dict(os.environ, RUST_LOG="warn", NO_COLOR="1")
        env.pop("PASSERELLE_CONFIG", None)
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "up",
                "--listen",
                self.gateway.removeprefix("http://"),
                "--admin-listen",
                self.admin.removeprefix("http://"),
                "--data-dir",
                str(self.data),
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self._read_until_ready()
        self.token = (self.data / "secrets" / "admin-token").read_text().strip()

    def _read_until_ready(self, timeout: float = 90.0):
        lines: queue.Queue = queue.Queue()

        def pump():
            # Keeps reading after "ready:", so that `up` never blocks on a full pipe.
            for line in self.proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(
                    "`passerelle up` did not get ready; output so far:\n"
                    + "\n".join(self.summary)
                    + "\n"
                    + (self.workdir / "up.log").read_text()
                )
            self.summary.append(line)
            if line.startswith("ready:"):
                return

    def endpoints(self, pool: str) -> list[str]:
        """The instances of `pool`, as `up`'s summary listed them."""
        for line in self.summary:
            words = line.split()
            if words and words[0] == pool:
                return words[1:]
        return []

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name, in parentheses, may hold spaces: fields follow the last ')'.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            for c in children.get(todo.pop(), []):
                found.append(c)
                todo.append(c)
        return found

    def stop(self):
        """SIGINT, as Ctrl-C: `up` stops its children itself. Whatever is still alive
        after the grace periods is killed by its PID."""
        if self.proc.poll() is None:
            left = self._descendants()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

            def alive(pid: int) -> bool:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return False
                return True

            try:
                wait_for("up's children to exit", lambda: not any(alive(p) for p in left), 10)
            except AssertionError:
                for p in left:
                    if alive(p):
                        os.kill(p, signal.SIGKILL)
        self.log.close()

    # Calls.

    def get(self, path: str, source: str | None = None, headers=None) -> Reply:
        return request(self.gateway, "GET", path, headers=headers, source=source)

    def admin_call(self, method: str, path: str) -> Reply:
        return request(self.admin, method, path, headers={"authorization": f"Bearer {self.token}"})

    def jwt(self, sub: str, *scopes: str) -> str:
        cmd = [str(BIN), "auth", "token", "--data-dir", str(self.data), "--sub", sub]
        for s in scopes:
            cmd += ["--scope", s]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def cache_status(r: Reply) -> str:
    return r.header("cache-status")


class Traffic:
    """Steady, light traffic from 127.0.0.1 while the page is open, so that per-route rates
    (computed by the page between two refreshes) are not zero. Never reads the URLs the
    purge test watches."""

    PATHS = ["/users/{i}", "/products/{i}", "/api/{i}/{j}", "/users?limit=1", "/products?limit=1"]

    def __init__(self, platform: Platform):
        self.platform = platform
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self.stopping.is_set():
            i, j = 1 + n % 20, 1 + (n * 7) % 20
            path = self.PATHS[n % len(self.PATHS)].format(i=i, j=j)
            try:
                self.platform.get(path)
            except OSError:
                pass
            n += 1
            # 10 to 30 requests/s, in a wave of about a minute: well inside every limit,
            # and a curve on the page's charts.
            self.stopping.wait(1 / (20 + 10 * math.sin(time.monotonic() / 10)))

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)


def drive_traffic(p: Platform) -> dict:
    """What the console should then show: reads (misses, then L1 hits), composed reads,
    an uncached route, an audit event, and two clients over their limits."""
    for _ in range(2):
        for i in range(1, 21):
            assert p.get(f"/users/{i}").status == 200
            assert p.get(f"/products/{i}").status == 200
    for u, pr in [(1, 2), (3, 4), (5, 6), (7, 3)]:
        assert p.get(f"/api/{u}/{pr}").status == 200
    for _ in range(3):
        assert p.get("/users?limit=1").status == 200
    assert p.get("/api/1/99999999").status == 404

    transfer = {
        "id": f"tx-console-{os.getpid()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_account": "ACC-CONSOLE-1",
        "to_account": "ACC-002",
        "amount": 4242,
        "currency": "EUR",
        "status": "completed",
        "user": "7",
        "channel": "web",
    }
    writer = p.jwt("payments", "audit:write")
    r = request(
        p.gateway,
        "POST",
        "/api/audit/transfers",
        body=transfer,
        headers={"authorization": f"Bearer {writer}"},
    )
    assert r.status == 201, (r.status, r.body)

    # Over the per-client limit (100/s, bursts of 200), from a client of its own.
    throttled = flood(p, "/users/1", THROTTLED_CLIENT, 400)
    assert throttled, "no 429 for a client sending 400 requests at once"
    return {"transfer": transfer}


def flood(p: Platform, path: str, source: str, n: int) -> list[str]:
    """Sends `n` requests to `path` from `source`, 16 at a time; returns the limits named
    by the 429s (one entry per refusal)."""

    def one(_):
        r = p.get(path, source=source)
        return r.json().get("limit", "?") if r.status == 429 else None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return [limit for limit in pool.map(one, range(n)) if limit]


def interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def platform():
    assert BIN.is_file(), f"{BIN}: build it first (cargo build -p passerelle)"
    # A CI job cancelled sends SIGTERM: stop `up` then too, as for Ctrl-C.
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="passerelle-browser-") as d:
        p = Platform(Path(d))
        traffic = None
        try:
            p.facts = drive_traffic(p)
            traffic = Traffic(p)
            yield p
        finally:
            if traffic:
                traffic.stop()
            p.stop()


@pytest.fixture(scope="session")
def browser():
    assert CHROMIUM.is_file(), f"{CHROMIUM}: install Debian's chromium package"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield b
        finally:
            b.close()


class Problems:
    """Everything that went wrong on a page: console errors, uncaught exceptions, requests
    that failed or answered an error status."""

    def __init__(self, page):
        self.items: list[str] = []
        page.on(
            "console",
            lambda m: m.type == "error" and self.items.append(f"console error: {m.text}"),
        )
        page.on("pageerror", lambda e: self.items.append(f"uncaught exception: {e}"))
        page.on("requestfailed", self._failed)
        page.on(
            "response",
            lambda r: (
                r.status >= 400
                and self.items.append(f"{r.request.method} {r.url} answered {r.status}")
            ),
        )

    def _failed(self, request):
        # Aborted is what happens to the fetches in flight when the test reloads or leaves
        # the page, or when the page cancels a fetch it no longer needs: not a failure.
        if request.failure != "net::ERR_ABORTED":
            self.items.append(f"request failed: {request.method} {request.url}: {request.failure}")


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport=VIEWPORT)
    # Each wait states its own deadline; this bounds the others.
    ctx.set_default_timeout(10_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context):
    pg = context.new_page()
    pg.problems = Problems(pg)
    # A revocation may ask for confirmation: say yes.
    pg.on("dialog", lambda d: d.accept())
    return pg
