#!/usr/bin/env python3
"""Runs hostile clients against a fresh tchserve and reports which attacks the server held.

Usage: .venv/bin/python scripts/attack.py [--bin DIR] [--keep]

The script starts its own server in a new temporary folder, listening only on free ports of
127.0.0.1, and sends traffic nowhere else. Each attack prints one line (or one per part):
its short name, what was expected, what happened, and HELD or FAILED. The exit status is 0
when every attack held, 1 otherwise.

It needs the Python standard library only; the models are made by the repository's venv
(torch) in a subprocess.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass

HOST = "127.0.0.1"
TIMEOUT = 15.0
HEADER_READ_TIMEOUT = 2
KEEP_ALIVE_TIMEOUT = 3
BODY_READ_TIMEOUT = 2
MAX_CONNECTIONS = 32
RSS_LIMIT_KB = 2 * 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS_PY = '''\
import sys
import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.arange(30, dtype=torch.float32).reshape(3, 10) / 30.0

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.w


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2


torch.jit.script(Tiny().eval()).save("tiny.pt")
torch.jit.script(Scale().eval()).save("scale.pt")
'''

VEC4 = {
    "schema": 1,
    "name": "vec4",
    "input": {"tensor": {"dtype": "float32", "shape": [4]}},
    "model": {"feed": "stacked"},
    "output": {"tensor": {}},
}


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Reply:
    status: int | None
    body: bytes = b""
    error: str | None = None
    elapsed: float = 0.0

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def is_error_json(self, code):
        """Whether the body is TorchServe's error object with `code` as its code."""
        j = self.json()
        return (
            isinstance(j, dict)
            and {"code", "type", "message"} <= j.keys()
            and j["code"] == code
        )

    def message(self):
        j = self.json()
        return str(j.get("message")) if isinstance(j, dict) else None

    def brief(self, width=90):
        if self.status is None:
            return f"no answer ({self.error})"
        j = self.json()
        if isinstance(j, dict) and "message" in j:
            text = f"{self.status} {j.get('type', '')}: {j['message']}"
        elif isinstance(j, dict) and "status" in j:
            text = f"{self.status} {j['status']}"
        else:
            text = f"{self.status} {self.body[:60]!r}"
        return text if len(text) <= width else text[: width - 3] + "..."


def call(port, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One request on a fresh connection; never raises, so threads can count failures."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, data, None, time.monotonic() - started)
    except (OSError, http.client.HTTPException) as e:
        return Reply(None, b"", f"{type(e).__name__}: {e}".rstrip(": "), time.monotonic() - started)
    finally:
        conn.close()


def raw_exchange(port, data, wait):
    """Sends `data` on a raw connection, then reads until the server closes it, a whole
    response has arrived, or `wait` seconds pass. Returns (bytes read, how it ended, seconds);
    the ending is 'eof', 'reset', 'response' or 'timeout'."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=wait) as s:
        if data:
            s.sendall(data)
        return read_until_closed(s, started, wait)


def read_until_closed(s, started, wait):
    got = b""
    while True:
        left = started + wait - time.monotonic()
        if left <= 0:
            return got, "timeout", time.monotonic() - started
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return got, "timeout", time.monotonic() - started
        except ConnectionResetError:
            return got, "reset", time.monotonic() - started
        if not chunk:
            return got, "eof", time.monotonic() - started
        got += chunk
        if parse_response(got) is not None:
            return got, "response", time.monotonic() - started


def parse_response(data):
    """(status, body) when `data` holds a whole HTTP response with a Content-Length, else None."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None or len(body) < length:
        return None
    return status, body[:length]


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The server under test


class Server:
    def __init__(self, bin_dir, root):
        self.bin = os.path.join(bin_dir, "tchserve")
        self.root = root
        self.inference, self.management, self.metrics = free_port(), free_port(), free_port()
        self.proc = None
        self.env = server_env(root)
        self.log = os.path.join(root, "server.log")

    def write_config(self):
        write_config(self.root, self.inference, self.management, self.metrics)

    def start(self, models=None):
        args = [self.bin, "--foreground", "--ts-config", "config.properties"]
        if models:
            args += ["--models", *models]
        with open(self.log, "ab") as log:
            log.write(f"==== {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for this script must not reach it directly.
                start_new_session=True,
            )

    def wait_ready(self, limit=120):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            if self.ping(timeout=2).status == 200:
                return True
            time.sleep(0.2)
        return False

    def ping(self, timeout=TIMEOUT):
        return call(self.inference, "GET", "/ping", timeout=timeout)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self, field="VmRSS"):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def kill(self):
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self):
        if not self.alive():
            if self.proc is not None:
                self.proc.wait()
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines=15):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def server_env(root):
    env = dict(os.environ)
    # These would point the server at another config or log folder than the one made here.
    for key in list(env):
        if key.startswith("TS_") or key == "LOG_LOCATION":
            del env[key]
    env["TMPDIR"] = os.path.join(root, "tmp")
    os.makedirs(env["TMPDIR"], exist_ok=True)
    return env


def write_config(root, inference, management, metrics):
    lines = [
        f"inference_address=http://{HOST}:{inference}",
        f"management_address=http://{HOST}:{management}",
        f"metrics_address=http://{HOST}:{metrics}",
        # The gRPC listeners too: their defaults, 7070 and 7071, may be another server's.
        f"grpc_inference_address={HOST}",
        f"grpc_inference_port={free_port()}",
        f"grpc_management_address={HOST}",
        f"grpc_management_port={free_port()}",
        "model_store=store",
        "enable_model_api=true",
        "disable_token_authorization=true",
        f"header_read_timeout={HEADER_READ_TIMEOUT}",
        f"keep_alive_timeout={KEEP_ALIVE_TIMEOUT}",
        f"body_read_timeout={BODY_READ_TIMEOUT}",
        f"max_connections={MAX_CONNECTIONS}",
    ]
    with open(os.path.join(root, "config.properties"), "w") as f:
        f.write("\n".join(lines) + "\n")


def make_models(root, bin_dir):
    """Scripts the two models with the venv's torch and archives them into store/."""
    venv_python = os.path.join(REPO, ".venv", "bin", "python")
    python = venv_python if os.path.exists(venv_python) else sys.executable
    with open(os.path.join(root, "models.py"), "w") as f:
        f.write(MODELS_PY)
    with open(os.path.join(root, "vec4.json"), "w") as f:
        json.dump(VEC4, f)
    os.makedirs(os.path.join(root, "store"), exist_ok=True)
    run = lambda args: subprocess.run(
        args, cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    run([python, "models.py"])
    archiver = os.path.join(bin_dir, "tch-model-archiver")
    run([archiver, "--model-name", "tiny", "--version", "1.0", "--serialized-file", "tiny.pt",
         "--handler", "image_classifier", "--export-path", "store"])
    run([archiver, "--model-name", "scale", "--version", "1.0", "--serialized-file", "scale.pt",
         "--handler", os.path.join(root, "vec4.json"), "--export-path", "store"])


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    name: str
    expected: str
    happened: str
    held: bool


def row(name, expected, happened, held):
    return Row(name, expected, happened, bool(held))


def list_models(srv):
    """Every registered model name, following nextPageToken; None if a page fails."""
    names, token = [], None
    for _ in range(100):
        path = "/models?limit=100" + (f"&next_page_token={token}" if token else "")
        r = call(srv.management, "GET", path)
        j = r.json() if r.status == 200 else None
        if not isinstance(j, dict):
            return None
        names += [m["modelName"] for m in j.get("models", [])]
        token = j.get("nextPageToken")
        if not token:
            return names
    return None


def names_bound(message, param, value):
    """Whether an error message names the parameter and a limit other than the value sent."""
    if not message or param not in message:
        return False
    return any(int(n) != value for n in re.findall(r"-?\d+", message))


def predict_scale(srv):
    r = call(srv.inference, "POST", "/predictions/scale", b"[1, 2, 3, 4]",
             {"Content-Type": "application/json"})
    return r, r.status == 200 and r.json() == [2.0, 4.0, 6.0, 8.0]


# --------------------------------------------------------------------------------------------
# Attacks


def png_grey(width, height):
    """A black 8-bit greyscale PNG: tiny on disk however many pixels it claims."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = (b"\x00" * (1 + width)) * height
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def attack_image_bombs(srv, ctx):
    rows = []
    for label, height in (("1a image bomb 1x1M", 1_000_000), ("1b image bomb 1x20k", 20_000)):
        png = png_grey(1, height)
        peak = [srv.rss_kb() or 0]
        done = threading.Event()

        def sample():
            # The decoder's worst moment is brief: sample often while the request runs.
            while not done.is_set():
                peak[0] = max(peak[0], srv.rss_kb() or 0)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        r = call(srv.inference, "POST", "/predictions/tiny", png, {"Content-Type": "image/png"})
        done.set()
        sampler.join()
        peak[0] = max(peak[0], srv.rss_kb() or 0)
        hwm = srv.rss_kb("VmHWM") or 0
        alive = srv.alive() and srv.ping().status == 200
        held = r.status == 400 and r.is_error_json(400) and alive and max(peak[0], hwm) < RSS_LIMIT_KB
        rows.append(row(
            label,
            f"400 JSON error, alive, RSS < 2 GB ({len(png)} B PNG)",
            f"{r.brief(110)} in {r.elapsed:.2f} s; RSS peak {peak[0] // 1024} MB "
            f"(VmHWM {hwm // 1024} MB); {'alive' if alive else 'DEAD or not answering /ping'}",
            held,
        ))
    return rows


def attack_scaling_deadlock(srv, ctx):
    stop = threading.Event()
    tallies = {"ping": Counter(), "metrics": Counter(), "scale": Counter()}
    errors = []

    def poll(kind, port, path):
        while not stop.is_set():
            r = call(port, "GET", path)
            tallies[kind][r.status if r.status is not None else "error"] += 1
            if r.status is None:
                errors.append(f"{kind}: {r.error} after {r.elapsed:.1f} s")

    pollers = [
        threading.Thread(target=poll, args=("ping", srv.inference, "/ping"), daemon=True),
        threading.Thread(target=poll, args=("metrics", srv.metrics, "/metrics"), daemon=True),
    ]
    for t in pollers:
        t.start()
    deadline = time.monotonic() + 15
    n = 0
    while time.monotonic() < deadline or n % 2 == 1:  # end on min_worker=1
        workers = 2 if n % 2 == 0 else 1
        r = call(srv.management, "PUT", f"/models/scale?min_worker={workers}&synchronous=true")
        tallies["scale"][r.status if r.status is not None else "error"] += 1
        if r.status is None:
            errors.append(f"scale: {r.error} after {r.elapsed:.1f} s")
            if n % 2 == 1:
                break
        n += 1
    stop.set()
    for t in pollers:
        t.join(TIMEOUT + 5)
    after = srv.ping()
    counts = "; ".join(
        f"{k} " + ",".join(f"{s}x{c}" for s, c in sorted(v.items(), key=str))
        for k, v in tallies.items()
    )
    happened = counts + f"; then /ping {after.brief(30)}"
    if errors:
        happened += f"; first failure: {errors[0]}"
    return [row("2 scaling deadlock", "every call answers for 15 s, then /ping 200",
                happened, not errors and after.status == 200)]


def attack_registrations_and_crash(srv, ctx):
    snapshot = os.path.join(srv.root, "logs", "config", "snapshot.json")
    stop = threading.Event()
    state = {}  # name -> "present", "absent" or "unknown"
    lock = threading.Lock()
    acked = Counter()
    parses = Counter()

    def churn(t):
        names = [f"c{t}_{k}" for k in range(4)]
        register = {n: True for n in names}
        while not stop.is_set():
            for name in names:
                if stop.is_set():
                    return
                if register[name]:
                    r = call(srv.management, "POST",
                             f"/models?url=scale.mar&model_name={name}&initial_workers=0")
                    outcome = "present" if r.status == 200 else "unknown"
                else:
                    r = call(srv.management, "DELETE", f"/models/{name}")
                    outcome = "absent" if r.status == 200 else "unknown"
                with lock:
                    state[name] = outcome
                    if outcome != "unknown":
                        acked["ok"] += 1
                    else:
                        acked["no answer" if r.status is None else f"HTTP {r.status}"] += 1
                register[name] = not register[name]

    def read_snapshot():
        while not stop.is_set():
            try:
                with open(snapshot, "rb") as f:
                    json.loads(f.read())
                parses["ok"] += 1
            except FileNotFoundError:
                parses["missing"] += 1
            except ValueError:
                parses["bad JSON"] += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=churn, args=(t,), daemon=True) for t in range(8)]
    threads.append(threading.Thread(target=read_snapshot, daemon=True))
    for t in threads:
        t.start()
    time.sleep(20)
    # The kill comes while the churn threads are mid-request: whatever the server acknowledged
    # before it must survive; the requests cut off leave their names unknown.
    stop.set()
    srv.kill()
    for t in threads:
        t.join(TIMEOUT + 5)

    srv.start()
    if not srv.wait_ready():
        return [row("3 registrations+crash", "restart restores every acknowledged change",
                    f"restarted server never answered /ping 200; log: {srv.log_tail(3)!r}",
                    False)]
    listed = list_models(srv)
    if listed is None:
        return [row("3 registrations+crash", "restart restores every acknowledged change",
                    "GET /models failed after the restart", False)]
    listed = set(listed)
    known = {n: s for n, s in state.items() if s != "unknown"}
    lost = sorted(n for n, s in known.items() if s == "present" and n not in listed)
    revived = sorted(n for n, s in known.items() if s == "absent" and n in listed)
    missing_base = sorted({"tiny", "scale"} - listed)
    bad_parses = parses["missing"] + parses["bad JSON"]
    happened = (
        f"{acked['ok']} ops acknowledged (others: "
        + (", ".join(f"{k} x{v}" for k, v in sorted(acked.items()) if k != "ok") or "none")
        + f"); {len(known)} names checked, {len(state) - len(known)} unknown; "
        f"snapshot parsed {parses['ok']}x, failed {bad_parses}x"
    )
    if lost:
        happened += f"; LOST {lost[:5]}"
    if revived:
        happened += f"; REVIVED {revived[:5]}"
    if missing_base:
        happened += f"; missing {missing_base}"
    if parses["missing"]:
        happened += f"; snapshot missing {parses['missing']}x"
    held = not lost and not revived and not missing_base and bad_parses == 0 and acked["ok"] > 0
    return [row("3 registrations+crash", "acked state survives SIGKILL, snapshot always parses",
                happened, held)]


def attack_worker_bound(srv, ctx):
    parts, held = [], True
    for suffix in ("", "&synchronous=true"):
        r = call(srv.management, "PUT", f"/models/scale?min_worker=10000{suffix}", timeout=10)
        ok = (r.status == 400 and r.is_error_json(400) and r.elapsed < 5
              and names_bound(r.message(), "min_worker", 10000))
        held &= ok
        parts.append(f"{'sync' if suffix else 'async'}: {r.brief(90)} in {r.elapsed:.2f} s")
    if not held:
        # Whatever the server started, bring scale back to one worker for the attacks to come.
        call(srv.management, "PUT", "/models/scale?min_worker=1&synchronous=true")
    pred, served = predict_scale(srv)
    parts.append(f"then predict {pred.brief(40)}")
    return [row("4 min_worker=10000", "400 naming the bound in < 5 s, still serving",
                "; ".join(parts), held and served)]


def attack_register_bounds(srv, ctx):
    before = list_models(srv)
    params = [("batch_size", 4_000_000), ("batch_size", 100_000_000),
              ("max_batch_delay", 999_999_999), ("response_timeout", 99_999_999_999),
              ("initial_workers", 10_000)]
    parts, held = [], True
    for i, (param, value) in enumerate(params):
        name = f"bound{i}"
        r = call(srv.management, "POST", f"/models?url=scale.mar&model_name={name}&{param}={value}")
        ok = r.status == 400 and r.is_error_json(400) and names_bound(r.message(), param, value)
        held &= ok
        if not ok:
            parts.append(f"{param}={value}: {r.brief(70)}")
        if r.status in (200, 202):
            call(srv.management, "DELETE", f"/models/{name}")
    after = list_models(srv)
    unchanged = before is not None and after is not None and sorted(before) == sorted(after)
    if held:
        parts.insert(0, f"all 5 answered 400 naming the bound, e.g. {r.message()!r}")
    parts.append("model list unchanged" if unchanged else
                 f"model list CHANGED: +{sorted(set(after or []) - set(before or []))}")
    return [row("5 register bounds", "each 400 naming the bound; nothing registers",
                "; ".join(parts), held and unchanged)]


def attack_local_urls(srv, ctx):
    outside = os.path.join(srv.root, "outside.fifo")
    inside = os.path.join(srv.root, "store", "pipe.mar")
    for path in (outside, inside):
        if not os.path.exists(path):
            os.mkfifo(path)
    urls = [outside, "pipe.mar", "/etc/shadow", "/etc/nonexistent", "/etc/passwd"]
    answers = []
    for url in urls:
        r = call(srv.management, "POST", f"/models?url={url}", timeout=10)
        answers.append((url, r))
    slow = [f"{os.path.basename(u)} took {r.elapsed:.1f} s" for u, r in answers
            if r.status is None or r.elapsed >= 5]
    # Only the url may differ between the answers, or they tell what exists outside the store.
    shapes = {(r.status, (r.message() or "").replace(u, "<url>")) for u, r in answers}
    same = len(shapes) == 1
    refused = all(r.status is not None and 400 <= r.status < 500 for _, r in answers)
    if same and refused:
        status, message = next(iter(shapes))
        parts = [f"all {status} {message!r}"]
    else:
        parts = [("answers DIFFER: " if not same else "not refused: ")
                 + " | ".join(f"{os.path.basename(u)}: {r.brief(50)}" for u, r in answers)]
    parts += slow

    # A flood of FIFO registrations: none may hang a worker thread of the server.
    flood = Counter()
    abort = threading.Event()
    lock = threading.Lock()

    def register_fifos(t):
        for i in range(600 // 16 + (1 if t < 600 % 16 else 0)):
            if abort.is_set():
                with lock:
                    flood["not sent"] += 1
                continue
            url = outside if (t + i) % 2 == 0 else "pipe.mar"
            r = call(srv.management, "POST", f"/models?url={url}")
            with lock:
                flood["answered" if r.status is not None else "no answer"] += 1
            if r.status is None:
                abort.set()  # a hung server would otherwise cost 15 s per remaining call

    threads = [threading.Thread(target=register_fifos, args=(t,), daemon=True) for t in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    parts.append(f"flood: {flood['answered']}/600 answered in {time.monotonic() - started:.1f} s"
                 + (f", {flood['no answer']} unanswered, {flood['not sent']} not sent"
                    if flood["answered"] != 600 else ""))
    normal = call(srv.management, "POST", "/models?url=scale.mar&model_name=after_fifo&initial_workers=0")
    parts.append(f"after_fifo {normal.brief(40)}")
    held = same and refused and not slow and flood["answered"] == 600 and normal.status == 200
    return [row("6 local urls / FIFOs", "same status+message in < 5 s; flood answered; still registers",
                "; ".join(parts), held)]


def attack_connections(srv, ctx):
    rows = []
    port = srv.inference

    got, how, secs = raw_exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n", 10)
    rows.append(row("7a incomplete head", f"closed in < 10 s (header_read_timeout {HEADER_READ_TIMEOUT} s)",
                    f"{how} after {secs:.1f} s{answer_of(got)}", how in ("eof", "reset")))

    got, how, secs = raw_exchange(port, b"", 10)
    rows.append(row("7b silent connection", f"closed in < 10 s (keep_alive_timeout {KEEP_ALIVE_TIMEOUT} s)",
                    f"{how} after {secs:.1f} s{answer_of(got)}", how in ("eof", "reset")))

    head = (b"POST /predictions/scale HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    got, how, secs = raw_exchange(port, head + b"[1, 2, 3, ", 10)
    parsed = parse_response(got)
    status, body = parsed if parsed else (None, b"")
    reply = Reply(status, body, None if parsed else how, secs)
    rows.append(row("7c short body", f"408 JSON (body_read_timeout {BODY_READ_TIMEOUT} s)",
                    f"{reply.brief(80)} after {secs:.1f} s",
                    status == 408 and reply.is_error_json(408)))

    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 10):
            idle.append(socket.create_connection((HOST, port), timeout=5))
        # Sent at once: the idle connections only hold their places for keep_alive_timeout.
        got, how, secs = raw_exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n", 5)
    except OSError as e:
        got, how, secs = b"", f"{type(e).__name__}: {e}", 0.0
    finally:
        for s in idle:
            s.close()
    parsed = parse_response(got)
    status, body = parsed if parsed else (None, b"")
    reply = Reply(status, body, None if parsed else how, secs)
    refused = (status == 503 and reply.is_error_json(503)
               and "too many open connections" in (reply.message() or ""))
    # The server may take a moment to notice the closed connections and free their places.
    deadline = time.monotonic() + 5
    after = srv.ping(timeout=5)
    while after.status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = srv.ping(timeout=max(0.1, deadline - time.monotonic()))
    rows.append(row("7d connection cap", f"503 'too many open connections' past {MAX_CONNECTIONS}, then /ping 200",
                    f"{len(idle)} idle open, extra got {reply.brief(70)}; after closing /ping {after.brief(30)}",
                    refused and after.status == 200))
    return rows


def answer_of(got):
    parsed = parse_response(got)
    if parsed:
        return f", answered {parsed[0]} first"
    return f", {len(got)} bytes first" if got else ""


def attack_stale_pid(srv, ctx):
    folder = os.path.join(ctx["root"], "stale")
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    write_config(folder, free_port(), free_port(), free_port())
    os.makedirs(os.path.join(folder, "store"), exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    ctx["children"].append(sleeper)
    # Reaped the moment it dies: a zombie would still answer kill(pid, 0) and make a --stop
    # that signalled it wait for it, hiding what happened behind a timeout.
    reaper = threading.Thread(target=sleeper.wait, daemon=True)
    reaper.start()
    try:
        with open(os.path.join(folder, "logs", "tchserve.pid"), "w") as f:
            f.write(f"{sleeper.pid}\n")
        tchserve = os.path.join(ctx["bin"], "tchserve")
        env = server_env(folder)

        def run(flag):
            try:
                p = subprocess.run([tchserve, flag], cwd=folder, env=env, capture_output=True,
                                   text=True, timeout=30)
                out = (p.stdout + p.stderr).strip().splitlines()
                return p.returncode, out[-1] if out else ""
            except subprocess.TimeoutExpired:
                return None, "did not exit within 30 s"

        status_rc, status_out = run("--status")
        stop_rc, stop_out = run("--stop")
        reaper.join(0.3)
        sleep_alive = reaper.is_alive()
    finally:
        if reaper.is_alive():
            sleeper.kill()
        reaper.join()
    held = status_rc not in (0, None) and stop_rc is not None and sleep_alive
    return [row("8 stale PID file", "--status not running (rc != 0); --stop spares the pid",
                f"--status rc {status_rc} {status_out!r}; --stop rc {stop_rc} {stop_out!r}; "
                f"sleep {'alive' if sleep_alive else 'KILLED'}", held)]


ATTACKS = [
    attack_image_bombs,
    attack_scaling_deadlock,
    attack_registrations_and_crash,
    attack_worker_bound,
    attack_register_bounds,
    attack_local_urls,
    attack_connections,
    attack_stale_pid,
]


# --------------------------------------------------------------------------------------------
# Driver


def ensure_running(srv):
    """Restarts a dead or unresponsive server (from its snapshot) so one broken attack does
    not fail all those after it. Returns a note when it had to, else None."""
    if srv.alive() and srv.ping(timeout=5).status == 200:
        return None
    srv.kill()
    srv.start()
    if srv.wait_ready():
        return "server had to be restarted before this attack"
    return "server is down and would not restart"


def run_attacks(srv, ctx):
    rows = []
    for attack in ATTACKS:
        note = ensure_running(srv)
        if note == "server is down and would not restart":
            rows.append(row(attack.__name__.removeprefix("attack_"), "-", note, False))
            continue
        started = time.monotonic()
        try:
            got = attack(srv, ctx)
        except Exception as e:  # a bug or surprise in one attack must not hide the others
            got = [row(attack.__name__.removeprefix("attack_"), "-",
                       f"attack crashed: {type(e).__name__}: {e}", False)]
        after = srv.ping(timeout=10) if srv.alive() else Reply(None, error="process exited")
        for r in got:
            if after.status != 200:
                r.happened += f"; /ping afterwards: {after.brief(40)}"
                r.held = False
            if note:
                r.happened += f" ({note})"
        rows += got
        print(f"  ... {attack.__name__} done in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return rows


def print_table(rows):
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("name", "expected")]
    for r in rows:
        verdict = "HELD" if r.held else "FAILED"
        print(f"{verdict:<6}  {r.name:<{widths[0]}}  {r.expected:<{widths[1]}}  {r.happened}")
    failed = [r.name for r in rows if not r.held]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} held"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release"),
                    help="folder holding tchserve and tch-model-archiver (default: target/release)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    bin_dir = os.path.abspath(args.bin)

    # SIGTERM must unwind through the cleanup below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    root = tempfile.mkdtemp(prefix="tchserve-attack-")
    ctx = {"root": root, "bin": bin_dir, "children": []}
    srv = None
    started = time.monotonic()
    try:
        print(f"folder {root}", file=sys.stderr)
        make_models(root, bin_dir)
        srv = Server(bin_dir, root)
        srv.write_config()
        srv.start(["tiny=tiny.mar", "scale=scale.mar"])
        if not srv.wait_ready():
            print("the server did not start; its log ends with:\n" + srv.log_tail(), file=sys.stderr)
            return 1
        print(f"server pid {srv.proc.pid} on ports {srv.inference}/{srv.management}/{srv.metrics}",
              file=sys.stderr)
        rows = run_attacks(srv, ctx)
        print_table(rows)
        print(f"({time.monotonic() - started:.0f} s)")
        return 0 if all(r.held for r in rows) else 1
    except subprocess.CalledProcessError as e:
        print(f"setup failed: {e}\n{e.stdout}\n{e.stderr}", file=sys.stderr)
        return 1
    finally:
        if srv is not None:
            srv.stop()
        for child in ctx["children"]:
            if child.poll() is None:
                child.kill()
            child.wait()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
