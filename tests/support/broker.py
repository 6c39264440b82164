"""A real Mosquitto broker per test: its own port, config, persistence, passwords and ACLs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise RuntimeError("mosquitto is not installed; run scripts/setup.sh")
    return path


def make_tls_files(out: Path, name: str = "AlignFed test CA") -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1, made with openssl.

    Returns (ca.pem, server.pem, server.key).
    """
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (out / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = out / "san.cnf"
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


class Mosquitto:
    def __init__(
        self,
        workdir: Path,
        *,
        passwd_file: Path | None = None,
        acl_file: Path | None = None,
        tls: tuple[Path, Path, Path] | None = None,  # (ca, cert, key): the listener speaks only TLS
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.passwd_file, self.acl_file, self.tls = passwd_file, acl_file, tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}" if self.tls else f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if self.passwd_file else 'true'}",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"log_dest file {self.dir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "user root",
            "max_queued_messages 10000",
        ]
        if self.passwd_file:
            lines.append(f"password_file {self.passwd_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls:
            ca, cert, key = self.tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "tls_version tlsv1.2"]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        conf = self._write_conf()
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError as exc:
                if self.proc.poll() is not None:
                    log = (self.dir / "mosquitto.log").read_text(errors="replace")
                    raise RuntimeError(f"mosquitto exited: {log}") from exc
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
