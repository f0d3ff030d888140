"""A real Orthanc DICOMweb server for tests and benchmarks (importable as ``orthanc_server``).

``Orthanc(folder)`` writes a generated config (DICOMweb plugin on, storage in ``folder``,
HTTP on a free port, remote access off so only loopback clients are served, DICOM
server off so no port clash, authentication on with a generated user and password,
optionally HTTPS with client-certificate checks) and runs Debian's ``Orthanc`` binary::

    with Orthanc(tmp_path / "pacs") as pacs:
        pacs.upload(path)                 # REST API: POST /instances
        pacs.kill()                       # SIGKILL, like a crashed server
        pacs.start()                      # same port, same storage: data survives

``find_orthanc()`` locates the binary and the DICOMweb plugin, installing Debian's
``orthanc`` and ``orthanc-dicomweb`` with apt-get when they are missing and we are root;
it raises ``OrthancUnavailable`` with the reason otherwise.

``FaultProxy`` sits between a client and Orthanc, as a hospital's reverse proxy does, and
injects network faults: responses cut short (a truncated transfer) for chosen instances,
a bearer-token gate in front of Orthanc's basic auth, and HTTPS (optionally requiring a
client certificate).  TLS is terminated there because Debian bookworm's Orthanc 1.10.1
crashes on every HTTPS request (a civetweb worker segfaults right after the handshake).
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
                "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*")


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is missing and cannot be installed here."""


def _locate():
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)
    plugin = next((p for g in PLUGIN_GLOBS for p in sorted(glob.glob(g))), None)
    return binary, plugin


def find_orthanc(install: bool = True) -> tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin), installing them with apt-get if needed."""
    binary, plugin = _locate()
    if binary and plugin:
        return binary, plugin
    why = f"Orthanc binary: {binary or 'missing'}, DICOMweb plugin: {plugin or 'missing'}"
    if not install:
        raise OrthancUnavailable(why)
    if shutil.which("apt-get") is None:
        raise OrthancUnavailable(f"{why}; no apt-get here: install Orthanc 1.10+ with its "
                                 "DICOMweb plugin (or run .ci/orthanc.sh install on Debian)")
    if os.geteuid() != 0:
        raise OrthancUnavailable(f"{why}; not root: sudo apt-get install orthanc "
                                 "orthanc-dicomweb (or sudo .ci/orthanc.sh install)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OrthancUnavailable(f"{why}; {' '.join(cmd)} failed: {exc}") from None
        if out.returncode != 0:
            raise OrthancUnavailable(f"{why}; {' '.join(cmd)} failed: "
                                     f"{(out.stderr or out.stdout).strip()[-400:]}")
    binary, plugin = _locate()
    if not (binary and plugin):
        raise OrthancUnavailable(f"apt-get installed orthanc but not found: {why}")
    return binary, plugin


def _die_with_parent():
    """In the child: SIGKILL it when the process that started it dies (Linux), so a test
    run that is killed leaves no Orthanc behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_files(folder) -> dict[str, str]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate
    (openssl CLI); returns their paths."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=kmedtl test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n"
                                       "keyUsage=digitalSignature,keyEncipherment\n" + ext)
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=kmedtl test {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {k: str(d / v) for k, v in (("ca", "ca.pem"), ("server_cert", "server.pem"),
                                       ("server_key", "server.key"),
                                       ("client_cert", "client.pem"),
                                       ("client_key", "client.key"))}


class Orthanc:
    """One Orthanc process with a generated config; start/stop/kill/restart."""

    def __init__(self, folder, *, user: str = "kmedtl", password: str | None = None,
                 extra_config: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.binary, self.plugin = find_orthanc()
        self.user = user
        self.password = password or secrets.token_urlsafe(18)
        self.port = free_port()
        self.extra_config = dict(extra_config or {})
        self.proc: subprocess.Popen | None = None
        self.config_path = self.folder / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config(), indent=1))
        os.chmod(self.config_path, 0o600)  # it holds the generated password

    def config(self) -> dict:
        storage = str(self.folder / "storage")
        cfg = {
            "Name": "kmedtl-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [self.plugin],
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # only 127.0.0.1 / ::1 clients are served
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,   # no DICOM port: nothing to clash with
            "DicomPort": free_port(),
            "HttpCompressionEnabled": True,
            "KeepAlive": True,
            "HttpThreadsCount": 16,
            "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                         "Host": "127.0.0.1", "Ssl": False},
        }
        cfg.update(self.extra_config)
        return cfg

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def session(self):
        import requests

        s = requests.Session()
        s.auth = (self.user, self.password)
        return s

    def start(self, timeout: float = 30.0):
        if self.proc is not None and self.proc.poll() is None:
            return self
        logf = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.binary, str(self.config_path)], stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        logf.close()
        deadline = time.monotonic() + timeout
        s = self.session()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancUnavailable(f"Orthanc exited with {self.proc.returncode}: "
                                         f"{self.log_tail()}")
            try:
                if s.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancUnavailable(f"Orthanc did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.folder / "orthanc.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self):
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- REST helpers -------------------------------------------------------------------

    def upload(self, source) -> dict:
        """POST one DICOM file (path or bytes) to /instances."""
        data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        r = self.session().post(f"{self.url}/instances", data=data, timeout=60)
        r.raise_for_status()
        return r.json()

    def upload_many(self, paths) -> list[dict]:
        s = self.session()
        out = []
        for p in paths:
            r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=60)
            r.raise_for_status()
            out.append(r.json())
        return out

    def delete_study(self, study_uid: str):
        s = self.session()
        r = s.post(f"{self.url}/tools/lookup", data=study_uid, timeout=10)
        r.raise_for_status()
        for hit in r.json():
            if hit["Type"] == "Study":
                s.delete(f"{self.url}/studies/{hit['ID']}", timeout=10).raise_for_status()

    def count_instances(self) -> int:
        return len(self.session().get(f"{self.url}/instances", timeout=10).json())


class FaultProxy:
    """An HTTP proxy in front of Orthanc that injects faults.

    - ``truncate``: SOP Instance UIDs whose WADO-RS responses are cut to half their body
      (headers announce the full length, then the connection closes);
      ``truncate_times`` limits how many times each is cut (None: always).
    - ``bearer``: require ``Authorization: Bearer <token>``; the request goes on to
      Orthanc with the proxy's own basic-auth credentials.  Otherwise a client's basic
      auth is passed through for Orthanc to check (the proxy's own is used without one).
    - ``tls``: serve HTTPS with ``make_tls_files`` output; ``client_ca=True`` also
      requires a client certificate signed by that CA.
    ``requests`` counts the WADO-RS instance requests seen, per SOP Instance UID.
    """

    def __init__(self, upstream: Orthanc, *, truncate=(), truncate_times: int | None = None,
                 bearer: str | None = None, tls: dict | None = None, client_ca: bool = False):
        self.upstream = upstream
        self.tls = tls
        self.truncate = set(truncate)
        self.truncate_times = truncate_times
        self.bearer = bearer
        self.cut: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["server_cert"], tls["server_key"])
            if client_ca:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(tls["ca"])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dicomweb_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/dicom-web"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h):
        import requests

        if self.bearer is not None and h.headers.get("Authorization") != f"Bearer {self.bearer}":
            body = b'{"error": "bearer token required"}'
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Bearer realm="kmedtl-test"')
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() in ("accept", "content-type")}
        headers["Accept-Encoding"] = "identity"
        auth = h.headers.get("Authorization", "")
        if self.bearer is None and auth.startswith("Basic "):
            headers["Authorization"] = auth  # the client's own credentials, checked by Orthanc
            upstream_auth = None
        else:
            upstream_auth = (self.upstream.user, self.upstream.password)
        try:
            r = requests.get(self.upstream.url + h.path, headers=headers, auth=upstream_auth,
                             timeout=30)
        except requests.ConnectionError:
            h.close_connection = True
            h.connection.close()  # the upstream is gone: so is this connection
            return
        sop = h.path.rstrip("/").split("/instances/")[-1] if "/instances/" in h.path else None
        body = r.content
        cut = False
        if sop is not None:
            with self._lock:
                self.requests[sop] = self.requests.get(sop, 0) + 1
                if sop in self.truncate and (self.truncate_times is None or
                                             self.cut.get(sop, 0) < self.truncate_times):
                    self.cut[sop] = self.cut.get(sop, 0) + 1
                    cut = True
        h.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() in ("content-type", "www-authenticate"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if cut:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        else:
            h.wfile.write(body)
