"""A private ``redis-server`` for tests that must kill, restart or reconfigure Redis.

The shared Redis at 127.0.0.1:6379 is never stopped or flushed; a test that needs a
fault starts one of these on a free port in a temporary directory and stops it
itself. Persistence is off, so a restart comes back with empty data -- the case the
version store must survive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from conftest import unavailable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, startable and killable at will.

    ``extra`` are additional ``--option value`` arguments (``requirepass``,
    ``unixsocket``...). The port and directory stay the same across restarts.
    """

    def __init__(
        self, *, port: int | None = None, extra: tuple[str, ...] = (), tls: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server binary not found on PATH")
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="im-redis-")
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen | None = None
        if tls:
            self._make_certificate()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> str:
        return os.path.join(self.dir, "cert.pem")

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1, which is also its own CA."""
        if shutil.which("openssl") is None:
            unavailable("openssl not found on PATH (needed for a TLS redis-server)")
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", os.path.join(self.dir, "key.pem"), "-out", self.ca_file,
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def start(self, *, wait: float = 10.0) -> None:
        assert self.process is None, "already running"
        if self.tls:
            ports = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", self.ca_file,
                "--tls-key-file", os.path.join(self.dir, "key.pem"),
                "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            ports = ["--port", str(self.port)]
        args = [
            self.binary,
            *ports,
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    if self.tls:  # accepting connections is all we can see without TLS
                        return
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {wait} s")

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers -- a silent partition."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything politely."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
