"""Real servers for the tests, started on loopback by the test setup: PostgreSQL, Redis, Orthanc.

Each ``start_*`` returns a handle with ``stop()``; nothing here is mocked. Ports are picked free at start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and these machines run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    data_dir: Path
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        subprocess.run(_as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb into a fresh folder and start PostgreSQL 15 on a free loopback port (trust auth, fsync on)."""
    base = Path(tempfile.mkdtemp(prefix="omnict-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    subprocess.run(_as_postgres_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                      "--no-sync"]), check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run(_as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                      str(base / "log"), "-w", "start"]), check=True, capture_output=True)
    return PostgresServer(data, port)


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_redis() -> RedisServer:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return RedisServer(process, port)


@dataclass
class OrthancServer:
    """A real Orthanc PACS with the DICOMweb plugin, on loopback."""

    process: subprocess.Popen | None
    work_dir: Path
    config_path: Path
    aet: str
    dicom_port: int
    http_port: int
    modalities: dict[str, list] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a DICOM peer at run time through the REST API."""
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        request = urllib.request.Request(f"{self.url}/modalities/{name}", data=body, method="PUT")
        urllib.request.urlopen(request, timeout=30).read()

    def upload(self, dicom_file: Path) -> dict:
        return self.post_json("/instances", Path(dicom_file).read_bytes())  # type: ignore[return-value]

    def start(self) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.work_dir / "orthanc.log", "ab")
        self.process = subprocess.Popen(["Orthanc", str(self.config_path)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get_json("/system")
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited: see {self.work_dir / 'orthanc.log'}")
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not answer on its REST port")

    def stop(self) -> None:
        # Orthanc keeps its SQLite index locked until the process is gone: wait for it before any restart.
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def start_orthanc(work_dir: Path, modalities: dict[str, list] | None = None, aet: str = "ORTHANC") -> OrthancServer:
    """Start Orthanc with storage in ``work_dir``. ``modalities`` maps a name to [AET, host, port]."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "omnict-test-pacs",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": modalities or {},
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "StableAge": 1,
        "HttpTimeout": 120,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if ORTHANC_DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
    }
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    server = OrthancServer(None, work_dir, config_path, aet, dicom_port, http_port, dict(modalities or {}))
    server.start()
    return server
