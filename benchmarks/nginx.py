"""nginx as the suite runs it: a static upstream and the reference failover proxy.

Each instance is a foreground master (``daemon off``) with its prefix, pid file, logs and
temp paths inside its own directory, so it never touches a system nginx.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import Proc, Procs, free_port

SMALL_BYTES = 300
LARGE_BYTES = 16 * 1024
# Header nginx adds to every answer: the upstream address(es) it tried, the last one served.
UPSTREAM_HEADER = "X-Upstream-Addr"


def json_body(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes (FHIR-like padding)."""
    head, tail = b'{"resourceType":"Patient","id":"bench","text":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed (make bench installs it: nginx-light)")
    return found


def nginx_version() -> str:
    done = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def _main_conf(prefix: Path, workers: int, http_body: str) -> str:
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000;
    keepalive_timeout 65s;
{http_body}
}}
"""


def static_conf(prefix: Path, ports: list[int], workers: int) -> str:
    """Answers ``/small`` (300 B) and ``/large`` (16 KiB) JSON from files, keep-alive, on each
    of ``ports`` (two: a proxy's primary and DR endpoints)."""
    listen = "".join(f"        listen 127.0.0.1:{p} reuseport backlog=4096;\n" for p in ports)
    body = f"""    server {{
{listen.rstrip()}
        root {prefix}/www;
        default_type application/json;
        location = /small {{ try_files /small.json =404; }}
        location = /large {{ try_files /large.json =404; }}
        location = /health {{ return 200 "ok"; }}
    }}"""
    return _main_conf(prefix, workers, body)


@dataclass(frozen=True)
class FailoverTimeouts:
    """The route's per-try timeouts; nginx gets the same ones."""

    connect_s: float
    total_s: float


def ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def proxy_conf(
    prefix: Path,
    port: int,
    workers: int,
    primary: str,
    backup: str | None,
    timeouts: FailoverTimeouts,
    fail_timeout_s: float,
) -> str:
    """The equivalent failover proxy: ``primary`` then the ``backup`` server, retrying on
    errors, timeouts, 502 and 503, with pooled keep-alive connections to the upstreams."""
    backup_line = f"        server {backup} backup;\n" if backup else ""
    body = f"""    upstream site {{
        server {primary} max_fails=1 fail_timeout={max(1, math.ceil(fail_timeout_s))}s;
{backup_line}        keepalive 256;
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://site;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout {ms(timeouts.connect_s)};
            proxy_send_timeout {ms(timeouts.total_s)};
            proxy_read_timeout {ms(timeouts.total_s)};
            proxy_buffering on;
            add_header {UPSTREAM_HEADER} $upstream_addr always;
        }}
    }}"""
    return _main_conf(prefix, workers, body)


def start(procs: Procs, name: str, conf: str, ports: dict[str, int]) -> Proc:
    prefix = procs.workdir / name
    prefix.mkdir(exist_ok=True)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    return procs.spawn(
        name,
        [nginx_binary(), "-p", str(prefix), "-c", str(conf_path), "-e", "stderr"],
        ports=ports,
    )


def start_static(procs: Procs, workers: int = 1) -> Proc:
    prefix = procs.workdir / "nginx-static"
    (prefix / "www").mkdir(parents=True, exist_ok=True)
    (prefix / "www" / "small.json").write_bytes(json_body(SMALL_BYTES))
    (prefix / "www" / "large.json").write_bytes(json_body(LARGE_BYTES))
    ports = {"primary": free_port(), "dr": free_port()}
    conf = static_conf(prefix, list(ports.values()), workers)
    return start(procs, "nginx-static", conf, ports)


def start_proxy(
    procs: Procs,
    name: str,
    workers: int,
    primary: str,
    backup: str | None,
    timeouts: FailoverTimeouts,
    fail_timeout_s: float,
) -> Proc:
    """``primary`` and ``backup`` as ``host:port``."""
    port = free_port()
    prefix = procs.workdir / name
    conf = proxy_conf(prefix, port, workers, primary, backup, timeouts, fail_timeout_s)
    return start(procs, name, conf, {"http": port})
