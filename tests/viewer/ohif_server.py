"""OHIF 3 served on loopback in front of a real Orthanc: fetch the built app once, serve it, proxy DICOMweb.

``ensure_ohif_dist()`` runs ``npm pack @ohif/app@<version>`` once into ``.cache/ohif/`` and unpacks ``package/dist``
(the published package ships the production build). ``OhifServer`` serves that folder with a single-page-app
fallback (unknown paths get ``index.html``: OHIF routes such as ``/viewer?StudyInstanceUIDs=...`` are client-side)
and forwards ``/dicom-web`` and ``/wado`` to Orthanc from the same origin, so the browser needs no CORS. The Host
header is passed through so the BulkDataURIs Orthanc writes into its metadata point back at this server.
Every response carries COOP/COEP headers: OHIF's volume loading wants ``SharedArrayBuffer``, which Chromium only
grants to cross-origin-isolated pages.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import shutil
import subprocess
import sys
import tarfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
OHIF_CACHE = REPO_ROOT / ".cache" / "ohif"
PROXIED_PREFIXES = ("/dicom-web", "/wado")
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Per-connection headers (RFC 9110 §7.6.1) are not forwarded; Content-Length is recomputed after http.client
# has de-chunked the body.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}
CONTENT_TYPES = {".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
                 ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
                 ".svg": "image/svg+xml", ".woff2": "font/woff2"}


class OhifUnavailable(RuntimeError):
    """The OHIF build is not cached and npm could not fetch it (no registry access)."""


def ensure_ohif_dist(version: str = OHIF_VERSION, cache_dir: Path = OHIF_CACHE) -> Path:
    """The unpacked ``dist/`` of ``@ohif/app@version`` under ``cache_dir/<version>/``, fetched by ``npm pack`` the
    first time. Raises OhifUnavailable (with npm's message) when npm cannot reach the registry."""
    target = cache_dir / version
    dist = target / "dist"
    if (dist / "index.html").is_file():
        return dist
    target.mkdir(parents=True, exist_ok=True)
    tarball = target / f"ohif-app-{version}.tgz"
    if not tarball.is_file():
        try:
            packed = subprocess.run(["npm", "pack", f"@ohif/app@{version}", "--pack-destination", str(target)],
                                    capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise OhifUnavailable(f"npm pack @ohif/app@{version} failed: {error}") from error
        if packed.returncode != 0 or not tarball.is_file():
            raise OhifUnavailable(f"npm pack @ohif/app@{version} failed: {packed.stderr.strip()[-800:]}")
    staging = target / "dist.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
        for member in members:
            member.name = member.name[len("package/dist/"):]
        archive.extractall(staging, members=members, filter="data")
    if not (staging / "index.html").is_file():
        raise OhifUnavailable(f"{tarball} holds no package/dist/index.html")
    staging.rename(dist)  # atomic: a half-unpacked folder is never taken for a complete one
    return dist


def app_config_js(data_source_name: str = "orthanc") -> str:
    """OHIF's ``window.config``: one DICOMweb data source on this origin (``/dicom-web``, ``/wado``), WADO-RS
    rendering for images and thumbnails, lazy study loading, no service worker, router at ``/``."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": data_source_name,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": data_source_name,
            "configuration": {
                "friendlyName": "Orthanc (test PACS)",
                "name": data_source_name,
                "wadoUriRoot": "/wado",
                "qidoRoot": "/dicom-web",
                "wadoRoot": "/dicom-web",
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            },
        }],
    }
    return "/** Written by tests/viewer/ohif_server.py */\nwindow.config = " + json.dumps(config, indent=2) + ";\n"


class _QuietThreadingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # The browser drops keep-alive connections and aborts prefetches when the page navigates; not our errors.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class OhifServer:
    """OHIF's dist plus a DICOMweb reverse proxy to ``orthanc_url``, on ``http://127.0.0.1:<port>``."""

    def __init__(self, dist: Path, orthanc_url: str, *, port: int = 0, app_config: str | None = None):
        self.dist = dist.resolve()
        self.app_config = (app_config or app_config_js()).encode()
        upstream = urllib.parse.urlsplit(orthanc_url)
        self.upstream_host = upstream.hostname or "127.0.0.1"
        self.upstream_port = upstream.port or 80
        self.proxy_errors: list[str] = []  # upstream failures, for the test to report
        self.httpd = _QuietThreadingHTTPServer(("127.0.0.1", port), _handler_class(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> OhifServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def static_file(self, url_path: str) -> Path:
        """The file for a URL path; ``index.html`` for anything that is not a file in dist (SPA fallback).
        Paths escaping dist (``..``) also get index.html rather than the file."""
        relative = urllib.parse.unquote(url_path).lstrip("/")
        candidate = (self.dist / relative).resolve() if relative else self.dist / "index.html"
        if candidate.is_file() and candidate.is_relative_to(self.dist):
            return candidate
        return self.dist / "index.html"


def _handler_class(server: OhifServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: OHIF fires hundreds of small requests

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: the test reads the browser instead
            pass

        def do_GET(self) -> None:
            self._dispatch()

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_OPTIONS(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if any(path == p or path.startswith(p + "/") for p in PROXIED_PREFIXES):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, self.server_body_type(".js"), server.app_config)
            else:
                file = server.static_file(path)
                self._send(200, self.server_body_type(file.suffix), file.read_bytes())

        @staticmethod
        def server_body_type(suffix: str) -> str:
            return CONTENT_TYPES.get(suffix) or mimetypes.guess_type("x" + suffix)[0] or "application/octet-stream"

        def _send(self, status: int, content_type: str, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in headers:
                self.send_header(name, value)
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            # Host passes through unchanged: Orthanc derives the BulkDataURIs in its metadata from it.
            connection = http.client.HTTPConnection(server.upstream_host, server.upstream_port, timeout=120)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except OSError as error:
                server.proxy_errors.append(f"{self.command} {self.path}: {error}")
                self._send(502, "text/plain", f"Orthanc unreachable: {error}".encode())
                return
            finally:
                connection.close()
            if response.status >= 500:
                server.proxy_errors.append(f"{self.command} {self.path}: HTTP {response.status}")
            forwarded = [(k, v) for k, v in response.getheaders()
                         if k.lower() not in HOP_BY_HOP and k.lower() != "content-type"]
            self._send(response.status, response.getheader("Content-Type", "application/octet-stream"), payload,
                       forwarded)

    return Handler
