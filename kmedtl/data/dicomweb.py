"""A DICOMweb source: studies found by QIDO-RS, instances fetched by WADO-RS into a local store.

``pull(spec)`` asks a PACS (Orthanc, dcm4chee, Google Cloud Healthcare, ...) for the
studies matching ``spec.filters`` (QIDO-RS, study level) and, within them, the instances
matching ``spec.instance_filters`` (e.g. ``Modality: MR``); labels come from a CSV keyed by
``StudyInstanceUID``, ``SeriesInstanceUID`` or ``AccessionNumber``.  Each instance is
retrieved once (WADO-RS, as stored: ``transfer-syntax=*``), de-identified (see below) and
written to a content-addressed store::

    <store>/objects/<sha256[:2]>/<sha256>.dcm     the instance, named by its own SHA-256
    <store>/journal.jsonl                         instance key -> object (or why skipped)
    <store>/deid.key                              this store's secret pseudonymisation key

so a re-run fetches only instances it has not stored, a pull that stopped half-way
(server down, network cut, Ctrl-C) resumes where it stopped, and the decoded-image cache
(``kmedtl.data.cache``, keyed by the same SHA-256) picks the files up like any others.
Every file of the store is created with mode 0600 and every folder with 0700.
``pull`` returns a :class:`~kmedtl.data.sources.DatasetIndex` over the stored files.

De-identification: the DICOM PS3.15 Annex E *Basic Application Level Confidentiality
Profile* (Table E.1-1, no options), applied at every nesting level (:class:`Deidentifier`):
private elements are removed, identifying attributes removed or emptied (names, dates,
descriptions, institution, device...), and instance UIDs replaced by keyed hashes
(``2.25.<int>``, HMAC-SHA256 under ``deid.key``), so one UID always maps to the same new
UID within a store and studies, series and references still group.  PatientID becomes a
keyed pseudonym (``anon-<20 hex>``) used both in the file and as each sample's
``patient_id`` for patient-level splits.  What the image pipeline needs (pixels,
photometric interpretation, rescale, window, modality, pixel spacing, frames) is not in the
profile's table and stays.  Pixel data is not cleaned: text burned into the pixels (the
profile's Clean Pixel Data option) stays.  Journal keys are keyed hashes of the instance
UIDs and journalled skip reasons do not name them.

Limits against a hostile or broken server (each configurable, each skip names it):
``max_response_bytes`` caps every response *after* decompression, counted while it
streams in (a gzip bomb or an endless chunked reply stops at the cap), and
``read_deadline`` bounds each request from sending to the last byte (a server dripping
one byte per socket timeout, in the body or in the headers, is cut off then).  Such a
reply is not retried.

Credentials are never part of the spec: it names the *environment variables* that hold
them (``username_env``/``password_env`` for HTTP basic auth, ``token_env`` for a bearer
token), and neither the values nor the ``Authorization`` header are logged or written.
TLS: ``ca_bundle`` (a private CA), ``verify_tls`` and ``client_cert``/``client_key``.

Faults, each named by server, study and instance, with counts that reconcile
(``read = used + skipped``; instances listed = fetched + reused + skipped instances):

- server down, wrong credentials, TLS failure: :class:`~kmedtl.errors.DicomWebError`
  subclasses, raised (nothing can be pulled);
- the server dies or the network drops mid-pull: ``DicomWebConnectionError`` once the
  retries are spent, saying how many instances are stored; run again to resume;
- a study asked for that the server does not have, an instance deleted since it was
  listed (HTTP 404), any other HTTP error for one study listing or one instance, a
  transfer that stays truncated after the retries, a part that is not DICOM (or that
  cannot be de-identified and written), an instance without pixel data, a UID that is not
  a DICOM UID, a reply over ``max_response_bytes`` or past ``read_deadline``: a skip
  (``kind`` ``not_found``, ``server_error``, ``truncated_transfer``, ``invalid_dicom``,
  ``no_pixel_data``, ``bad_uid``, ``response_too_large``, ``response_too_slow``...),
  recorded in the index like an undecodable file, and the pull goes on; the summary
  counts skips by kind; ``strict=True`` turns skips into an error.

Example::

    spec = DicomWebSpec(url="https://pacs.example.org/dicom-web", store="pacs-store",
                        labels="labels.csv", label_key="StudyInstanceUID",
                        filters={"StudyDate": "20240101-20241231", "ModalitiesInStudy": "MR"},
                        instance_filters={"Modality": "MR"},
                        username_env="PACS_USER", password_env="PACS_PASSWORD")
    result = pull(spec)
    print(result.summary())              # counts only
    cache = build_cache(result.index, options, "cache")
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from kmedtl.data import dicom
from kmedtl.data.options import ImageOptions
from kmedtl.data.sources import SPLIT_NAMES, DatasetIndex, Sample, Skipped
from kmedtl.errors import (
    BackendUnavailableError,
    ConfigError,
    DataError,
    DicomWebAuthError,
    DicomWebConnectionError,
    DicomWebError,
    DicomWebTLSError,
    ManifestError,
)

log = logging.getLogger(__name__)

#: Label CSV keys and the DICOM JSON tags QIDO-RS returns them under.
LABEL_KEYS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E",
              "AccessionNumber": "00080050"}
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_PATIENT_ID, _ACCESSION, _INSTANCE_NUMBER = "00100020", "00080050", "00200013"
_N_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances

#: Removed at every nesting level whatever the profile table says (all of them are in
#: PS3.15 Table E.1-1 too; kept as a floor should a table version drop one).  PatientID
#: itself is replaced by a keyed pseudonym.
IDENTITY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "MedicalRecordLocator", "AccessionNumber", "PatientComments",
)

#: Spec fields that would hold a secret: refused with a pointer to the ``*_env`` fields.
_SECRET_FIELDS = ("username", "user", "password", "token", "bearer_token", "api_key")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UID_CHUNK = 50  # StudyInstanceUIDs per QIDO request (UID list matching)
#: A DICOM UID as it may appear in a URL path: digits and dots, at most 64 characters
#: (PS3.5 9.1).  Leading zeros are tolerated: some archives write them.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Defaults of the response limits (``data.dicomweb.max_response_bytes``/``read_deadline``).
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
DEFAULT_READ_DEADLINE = 300.0
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class DicomWebSpec:
    """Where and what to pull.  Paths may be relative to the config file (``from_dict``).

    - ``url``: the DICOMweb root (``http(s)://host:port/dicom-web``), no credentials.
    - ``store``: local folder of the content-addressed instance store.
    - ``labels``: CSV with a ``label_key`` column and a ``label_column`` column (optional
      ``split`` column: train/val/test).  Without it every sample's label is ``None``.
    - ``label_key``: ``StudyInstanceUID`` (default), ``SeriesInstanceUID`` or
      ``AccessionNumber``.  With ``StudyInstanceUID`` and no ``study_uids`` and no
      ``filters``, the labelled studies are the ones pulled.
    - ``filters``: QIDO-RS study-level matching keys (``StudyDate: 20240101-20241231``,
      ``ModalitiesInStudy: MR``, ``StudyDescription: "*brain*"``, ...).
    - ``instance_filters``: QIDO-RS keys applied to each study's instances (``Modality``,
      ``SeriesDescription``, ``SOPClassUID``...).
    - ``study_uids``: only these studies (a study the server lacks is a ``not_found`` skip).
    - ``username_env`` + ``password_env`` or ``token_env``: names of environment variables.
    - ``ca_bundle``, ``verify_tls``, ``client_cert`` (+ ``client_key``): TLS.
    - ``timeout`` (s), ``retries`` (per request, exponential back-off from ``backoff`` s),
      ``workers`` (concurrent retrievals), ``transfer_syntax`` (``*``: as stored).
    - ``http_compression``: let the server gzip responses (off by default: pixel data is
      often compressed already, and on a LAN the server's compression costs more than it
      saves: Orthanc answers a 250 kB instance in 1.3 ms plain, 8.7 ms gzipped).  A reply
      compressed anyway is decoded, within ``max_response_bytes``.
    - ``max_response_bytes``: the most bytes one response may hold *after* decompression
      (default 256 MiB); a larger instance is a ``response_too_large`` skip, a larger
      search answer an error.  Each worker holds up to a few copies of one response.
    - ``read_deadline`` (s): the most time one request may take from sending to its last
      byte (default 300), on top of ``timeout``, which bounds each wait for the next byte
      only; a reply past it is a ``response_too_slow`` skip.
    """

    url: str
    store: str
    labels: str | None = None
    label_key: str = "StudyInstanceUID"
    label_column: str = "label"
    filters: Mapping = field(default_factory=dict)
    instance_filters: Mapping = field(default_factory=dict)
    study_uids: tuple | None = None
    username_env: str | None = None
    password_env: str | None = None
    token_env: str | None = None
    ca_bundle: str | None = None
    verify_tls: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.2
    workers: int = 4
    transfer_syntax: str = "*"
    http_compression: bool = False
    qido_prefix: str | None = None
    wado_prefix: str | None = None
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    read_deadline: float = DEFAULT_READ_DEADLINE

    def __post_init__(self):
        where = "data.dicomweb"
        parts = urlsplit(str(self.url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: expected http(s)://host[:port]/path, got "
                              f"{_redact(self.url)!r}")
        if parts.username or parts.password:
            raise ConfigError(f"{where}.url: must not carry credentials; put them in "
                              "environment variables named by username_env/password_env "
                              "or token_env")
        if self.label_key not in LABEL_KEYS:
            raise ConfigError(f"{where}.label_key: {self.label_key!r} is not one of "
                              f"{list(LABEL_KEYS)}")
        for name in ("username_env", "password_env", "token_env"):
            value = getattr(self, name)
            if value is not None and not _ENV_NAME.match(str(value)):
                raise ConfigError(f"{where}.{name}: must name an environment variable "
                                  "(letters, digits, _), not hold the secret itself")
        if (self.username_env is None) != (self.password_env is None):
            raise ConfigError(f"{where}: username_env and password_env go together")
        if self.token_env is not None and self.username_env is not None:
            raise ConfigError(f"{where}: use either username_env/password_env (basic auth) "
                              "or token_env (bearer token), not both")
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(f"{where}.client_key: needs client_cert")
        if int(self.workers) < 1 or int(self.retries) < 0 or float(self.timeout) <= 0:
            raise ConfigError(f"{where}: need workers >= 1, retries >= 0 and timeout > 0")
        try:
            max_bytes, deadline = int(self.max_response_bytes), float(self.read_deadline)
        except (TypeError, ValueError):
            max_bytes, deadline = 0, 0.0
        if max_bytes < 1 or not deadline > 0:
            raise ConfigError(f"{where}: need max_response_bytes >= 1 (default "
                              f"{DEFAULT_MAX_RESPONSE_BYTES:,}) and read_deadline > 0 seconds "
                              f"(default {DEFAULT_READ_DEADLINE:g}), got "
                              f"{self.max_response_bytes!r} and {self.read_deadline!r}")
        object.__setattr__(self, "max_response_bytes", max_bytes)
        object.__setattr__(self, "read_deadline", deadline)
        for name in ("filters", "instance_filters"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name}: expected a mapping of DICOM keywords to "
                                  f"QIDO-RS values, got {type(value).__name__}")
            object.__setattr__(self, name, {str(k): str(v) for k, v in value.items()})
        if self.study_uids is not None:
            object.__setattr__(self, "study_uids", tuple(str(u) for u in self.study_uids))
        object.__setattr__(self, "url", str(self.url).rstrip("/"))

    @classmethod
    def from_dict(cls, data: Mapping, base_dir=None, where: str = "data.dicomweb"):
        """Build from a config mapping; relative paths resolve against ``base_dir``."""
        allowed = [f.name for f in fields(cls)]
        secrets_given = [k for k in data if k in _SECRET_FIELDS]
        if secrets_given:
            raise ConfigError(f"{where}: {secrets_given} must not be in the config file; "
                              "store secrets in environment variables and name them with "
                              "username_env / password_env / token_env")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {allowed}")
        missing = [k for k in ("url", "store") if not data.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing required field(s) {missing}")
        values = dict(data)
        for key in ("store", "labels", "ca_bundle", "client_cert", "client_key"):
            if values.get(key) is not None and base_dir is not None:
                values[key] = os.path.join(os.fspath(base_dir), os.fspath(values[key]))
        return cls(**values)

    @property
    def redacted_url(self) -> str:
        return _redact(self.url)


@dataclass
class PullResult:
    """The pulled dataset and how much work it took.

    ``index`` lists one sample per stored instance (per frame with ``frames: all``), with
    labels from the CSV and ``patient_id`` from QIDO (in memory only).  Counts reconcile:
    ``index.read == used + skipped`` (entries: instances, plus one per study or series that
    was skipped whole) and ``listed == fetched + reused + skipped_instances``.
    """

    index: DatasetIndex
    store: str
    url: str
    studies: int = 0
    listed: int = 0
    fetched: int = 0
    reused: int = 0
    skipped_instances: int = 0

    def summary(self) -> dict:
        """Counts only: no patient identifiers, no credentials.  ``skipped_kinds``
        counts the skipped entries by reason kind (``index.skipped`` has the reasons)."""
        kinds: dict[str, str] = {}
        for s in self.index.skipped:
            kinds.setdefault(s.entry_key, s.kind)
        by_kind: dict[str, int] = {}
        for kind in kinds.values():
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return {"server": self.url, "store": self.store, "studies": self.studies,
                "instances": self.listed, "fetched": self.fetched, "reused": self.reused,
                "skipped_instances": self.skipped_instances, **self.index.counts(),
                "skipped_kinds": dict(sorted(by_kind.items()))}


@dataclass(frozen=True)
class _Instance:
    study: str
    series: str
    sop: str
    number: int
    label: str | None
    split: str | None
    patient: str | None  # the store's pseudonym of the PatientID
    key: str  # the store's keyed hash of the three UIDs (journal key)

    @property
    def name(self) -> str:
        return f"instance {self.sop} (series {self.series}, study {self.study})"


@dataclass(frozen=True)
class _Label:
    label: str | None
    split: str | None
    where: str


class _BearerAuth:
    """``Authorization: Bearer <token>``; its repr never shows the token."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self):
        return "_BearerAuth(<hidden>)"


def _redact(url: str) -> str:
    """The URL without user info (for messages)."""
    parts = urlsplit(str(url))
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


def _env(name: str, field_name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"data.dicomweb.{field_name}: environment variable {name} is not "
                          "set (or empty); export it before pulling")
    return value


def _session_class():
    # lazy: requests comes with the dicomweb extra (pip install 'kmedtl[dicomweb]')
    import requests

    class Session(requests.Session):
        """A session whose own ``verify`` wins over ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

        Plain ``requests`` lets those variables replace a session's CA bundle (and even
        ``verify=False``) whenever the call itself passes no ``verify`` (requests issue
        #3829), and dicomweb-client never does; ``ca_bundle``/``verify_tls`` must hold.
        """

        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and self.verify is not True:
                settings["verify"] = self.verify
            return settings

    return Session


# ---------------------------------------------------------------------------------------
# Response limits


_local = threading.local()  # the deadline guard of the request this thread is sending


class _Guard:
    """Ends one request at its deadline: shuts its socket down, whatever the request is
    waiting for (the status line, a header, the next byte of the body)."""

    def __init__(self, seconds: float):
        self.expired = False
        self.conn = None
        self._done = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def start(self):
        self._timer.start()

    def finish(self) -> bool:
        """Disarm; True when the deadline had passed (the reply is not to be trusted)."""
        with self._lock:
            self._done = True
            self.conn = None
        self._timer.cancel()
        return self.expired

    def attach(self, conn):
        with self._lock:
            if self._done:
                return
            self.conn = conn
            expired = self.expired
        if expired:
            _shutdown(conn)

    def expire(self):
        with self._lock:
            if self._done:
                return
            self.expired = True
            conn = self.conn
        if conn is not None:
            _shutdown(conn)


def _shutdown(conn):
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@functools.lru_cache(maxsize=1)
def _limit_classes():
    """The limit errors and the ``requests`` adapter enforcing them (built on first use:
    requests/urllib3 come with the dicomweb extra)."""
    # lazy: requests comes with the dicomweb extra (pip install 'kmedtl[dicomweb]')
    import requests
    from requests.adapters import HTTPAdapter  # lazy: the dicomweb extra, as above

    class ResponseLimitError(requests.exceptions.RequestException):
        """A reply over a limit: not a connection problem (whole-server errors are), so a
        skip of the item asked for.  ``limit_kind`` is the skip kind."""

        limit_kind = "response_limit"

    class ResponseTooLarge(ResponseLimitError):
        limit_kind = "response_too_large"

    class ResponseTooSlow(ResponseLimitError):
        limit_kind = "response_too_slow"

    class Watched:
        """Tells the calling thread's deadline guard which connection carries the
        request (a keep-alive connection carries many)."""

        def request(self, *args, **kwargs):
            guard = getattr(_local, "guard", None)
            if guard is not None:
                guard.attach(self)
            return super().request(*args, **kwargs)

    watched: dict = {}

    def watched_pools(base: dict) -> dict:
        """urllib3's pool classes (as the pool manager holds them), each with a
        connection class that reports to the guard."""
        out = {}
        for scheme, pool in base.items():
            if issubclass(pool.ConnectionCls, Watched):
                out[scheme] = pool
                continue
            if pool not in watched:
                conn = type("Watched" + pool.ConnectionCls.__name__,
                            (Watched, pool.ConnectionCls), {})
                watched[pool] = type("Watched" + pool.__name__, (pool,),
                                     {"ConnectionCls": conn})
            out[scheme] = watched[pool]
        return out

    class LimitedAdapter(HTTPAdapter):
        """Reads every body itself, streaming: decoded bytes are counted as they arrive
        (``max_bytes``), and a timer ends the request at ``deadline`` seconds.

        ``requests`` decodes any Content-Encoding the server sends, asked for or not, and
        its ``timeout`` bounds each wait for the next byte only: neither bounds a reply.
        A reply refused here is refused again at once when the same thread asks for the
        same URL (dicomweb-client retries every exception; fetching it again would cost
        the cap or the deadline once more)."""

        def __init__(self, max_bytes: int, deadline: float, **kwargs):
            self.max_bytes, self.deadline = int(max_bytes), float(deadline)
            self._refused: OrderedDict = OrderedDict()
            self._refused_lock = threading.Lock()
            super().__init__(**kwargs)

        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            manager = self.poolmanager
            manager.pool_classes_by_scheme = watched_pools(manager.pool_classes_by_scheme)

        def proxy_manager_for(self, proxy, **kwargs):
            manager = super().proxy_manager_for(proxy, **kwargs)
            if isinstance(getattr(manager, "pool_classes_by_scheme", None), dict):
                manager.pool_classes_by_scheme = watched_pools(manager.pool_classes_by_scheme)
            return manager

        def send(self, request, stream=False, timeout=None, verify=True, cert=None,
                 proxies=None):
            key = (threading.get_ident(), request.method, request.url)
            with self._refused_lock:
                refused = self._refused.get(key)
            if refused is not None:
                raise type(refused)(*refused.args)
            guard = _Guard(self.deadline)
            _local.guard = guard
            guard.start()
            resp = None
            t0 = time.monotonic()
            try:
                resp = super().send(request, stream=True, timeout=timeout, verify=verify,
                                    cert=cert, proxies=proxies)
                got = self._read(resp, guard)
                if guard.finish():
                    raise self._too_slow(got, t0)
            except Exception as exc:
                if resp is not None:
                    resp.close()
                err = exc
                if guard.expired and not isinstance(exc, ResponseTooSlow):
                    err = self._too_slow(getattr(exc, "got", None), t0)
                if isinstance(err, ResponseLimitError):
                    with self._refused_lock:
                        self._refused[key] = err
                        while len(self._refused) > 256:
                            self._refused.popitem(last=False)
                    if err is exc:
                        raise
                    raise err from None
                raise
            finally:
                guard.finish()
                _local.guard = None
            return resp

        def _too_slow(self, got, t0):
            part = f" ({got:,} bytes had come)" if got else ""
            return ResponseTooSlow(
                f"the reply was not complete {time.monotonic() - t0:.0f} s after the "
                f"request{part}: over data.dicomweb.read_deadline = {self.deadline:g} s "
                "(the whole reply; data.dicomweb.timeout bounds each wait for a byte); "
                "raise read_deadline if the link is this slow")

        def _read(self, resp, guard) -> int:
            cap = self.max_bytes
            encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
            coded = "" if encoding == "identity" else f", Content-Encoding {_show(encoding)}"
            length = (resp.headers.get("Content-Length") or "").strip()
            if not coded and length.isdigit() and int(length) > cap:
                raise ResponseTooLarge(
                    f"the reply announces {int(length):,} bytes: over "
                    f"data.dicomweb.max_response_bytes = {cap:,}; raise it if the server "
                    "really holds instances this large")
            chunks, n = [], 0
            try:
                for chunk in resp.iter_content(_READ_CHUNK):
                    n += len(chunk)
                    if n > cap:
                        raise ResponseTooLarge(
                            f"the reply grew past data.dicomweb.max_response_bytes = {cap:,} "
                            f"bytes (counted after decompression{coded}) and was cut off "
                            "there; raise it if the server really holds instances this large")
                    if guard.expired:
                        break
                    chunks.append(chunk)
            except Exception as exc:
                exc.got = n
                raise
            resp._content = b"".join(chunks)
            resp._content_consumed = True
            return n

    return ResponseLimitError, LimitedAdapter


def _mount_limits(session, spec: DicomWebSpec):
    """Mount the limits adapter (:func:`_limit_classes`) on ``session``."""
    adapter = _limit_classes()[1](spec.max_response_bytes, spec.read_deadline,
                                  pool_connections=2,
                                  pool_maxsize=max(10, int(spec.workers) + 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def make_session(spec: DicomWebSpec):
    """A ``requests.Session`` with the spec's credentials (from the environment) and TLS."""
    # lazy: requests comes with the dicomweb extra (pip install 'kmedtl[dicomweb]')
    import requests

    session = _session_class()()
    if spec.username_env:
        user = _env(spec.username_env, "username_env")
        password = _env(spec.password_env, "password_env")
        session.auth = requests.auth.HTTPBasicAuth(user, password)
    elif spec.token_env:
        session.auth = _BearerAuth(_env(spec.token_env, "token_env"))
    if spec.ca_bundle:
        if not os.path.isfile(spec.ca_bundle):
            raise ConfigError(f"data.dicomweb.ca_bundle: {spec.ca_bundle} does not exist")
        session.verify = spec.ca_bundle if spec.verify_tls else False
    else:
        session.verify = bool(spec.verify_tls)
    if spec.client_cert:
        for name in ("client_cert", "client_key"):
            path = getattr(spec, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"data.dicomweb.{name}: {path} does not exist")
        session.cert = (spec.client_cert, spec.client_key) if spec.client_key else \
            spec.client_cert
    if not spec.http_compression:
        session.headers["Accept-Encoding"] = "identity"
    _mount_limits(session, spec)
    host = urlsplit(spec.url).hostname or ""
    if session.auth is not None and spec.url.startswith("http://") and \
            host not in ("localhost", "127.0.0.1", "::1"):
        log.warning("DICOMweb credentials are sent unencrypted to %s (http://); use https",
                    host)
    if not spec.verify_tls:
        log.warning("TLS certificate verification is off for %s (data.dicomweb.verify_tls)",
                    host)
    return session


def make_client(spec: DicomWebSpec, session=None):
    """A ``dicomweb_client.DICOMwebClient`` on ``session`` (default: :func:`make_session`),
    retrying each request ``spec.retries`` times with exponential back-off."""
    try:
        # lazy: an optional extra (pip install 'kmedtl[dicomweb]'); refused below without it
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise BackendUnavailableError("the DICOMweb source needs dicomweb-client: "
                                      "pip install kmedtl[dicomweb]") from None
    if session is None:
        session = make_session(spec)
    else:
        _mount_limits(session, spec)  # the limits hold on a caller's session too
    client = DICOMwebClient(spec.url, session=session, qido_url_prefix=spec.qido_prefix,
                            wado_url_prefix=spec.wado_prefix, timeout=float(spec.timeout))
    client.set_http_retry_params(retry=True, max_attempts=int(spec.retries) + 1,
                                 wait_exponential_multiplier=max(1, int(spec.backoff * 500)))
    return client


# ---------------------------------------------------------------------------------------
# Error classification


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _fatal(exc, spec: DicomWebSpec, doing: str, *, study=None, instance=None,
           progress: str = "") -> DicomWebError | None:
    """The whole-server error ``exc`` stands for, or None when it concerns one item."""
    # lazy: requests comes with the dicomweb extra (pip install 'kmedtl[dicomweb]')
    import requests

    url = spec.redacted_url
    tail = f"; {progress}" if progress else ""
    kw = {"url": url, "study": study, "instance": instance}
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomWebTLSError(
            f"TLS with the DICOMweb server {url} failed while {doing} ({_short(exc)}): "
            "set data.dicomweb.ca_bundle to the CA that signed the server certificate, "
            "client_cert/client_key if the server asks for a client certificate, or "
            f"verify_tls: false for a test server{tail}", **kw)
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return DicomWebConnectionError(
            f"the DICOMweb server {url} did not answer while {doing} ({_short(exc)}): is it "
            f"running and is data.dicomweb.url right?{tail}", **kw)
    status = _status(exc)
    if status in (401, 403):
        if spec.username_env:
            creds = f"the user and password in ${spec.username_env} / ${spec.password_env}"
        elif spec.token_env:
            creds = f"the token in ${spec.token_env}"
        else:
            creds = ("credentials: none are configured (set data.dicomweb.username_env and "
                     "password_env, or token_env)")
        word = "Unauthorized" if status == 401 else "Forbidden"
        return DicomWebAuthError(
            f"the DICOMweb server {url} refused access (HTTP {status} {word}) while {doing}: "
            f"check {creds}{tail}", **kw)
    if status in (408, 429, 502, 503, 504):
        return DicomWebConnectionError(
            f"the DICOMweb server {url} is unavailable (HTTP {status}) while {doing}, after "
            f"{spec.retries} retries{tail}", **kw)
    return None


def _root(exc):
    """The innermost cause of a requests/urllib3 error (the ssl or socket error)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            args = getattr(exc, "args", ())
            inner = next((a for a in args if isinstance(a, BaseException)), None)
        if inner is None:
            return exc
        exc = inner
    return exc


def _short(exc) -> str:
    root = _root(exc)
    text = str(root).splitlines()[0] if str(root) else type(root).__name__
    text = re.sub(r"https?://[^\s'\"]+", lambda m: _redact(m.group(0)), text)
    text = re.sub(r"<urllib3[^>]*>: ", "", text)
    return f"{type(root).__name__}: {text[:240]}"


def _skip_reason(exc, what: str) -> tuple[str, str]:
    """(kind, reason) for an error that concerns one instance."""
    # lazy: requests comes with the dicomweb extra (pip install 'kmedtl[dicomweb]')
    import requests

    limit = getattr(exc, "limit_kind", None)
    if limit:
        return limit, f"{what}: {exc}"
    status = _status(exc)
    if status == 404:
        return "not_found", (f"{what}: not on the server (HTTP 404 Not Found); it was deleted "
                             "after it was listed")
    if status is not None:
        return "server_error", (f"{what}: the server answered HTTP {status} when asked for it; "
                                "check the server log")
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ContentDecodingError)):
        return "truncated_transfer", (f"{what}: the transfer stayed truncated after retries "
                                      f"({_short(exc)}); the next pull retries it")
    if isinstance(exc, InvalidDicomError):
        return "invalid_dicom", (f"{what}: the server sent a part that is not a DICOM file "
                                 f"({_first_line(exc)})")
    return "invalid_dicom", f"{what}: cannot be read ({_short(exc)})"


def _first_line(exc) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# ---------------------------------------------------------------------------------------
# Labels


def read_labels(path, key: str, column: str = "label") -> dict[str, _Label]:
    """``key value -> label`` from a CSV; a key listed twice with different labels is an
    error naming both lines."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: labels CSV not found (data.dicomweb.labels)")
    out: dict[str, _Label] = {}
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in (key, column) if c not in cols]
        if missing:
            raise ManifestError(f"{p}: missing column(s) {missing}; the header has {cols} "
                                f"(needed: {key} and {column}; optional: split)")
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            value = row.get(key, "")
            if not value:
                continue
            split = row.get("split") or None
            if split is not None:
                if split.lower() not in SPLIT_NAMES:
                    raise ManifestError(f"{p}:{lineno}: split {split!r} is not one of "
                                        "train/val/test")
                split = SPLIT_NAMES[split.lower()]
            label = _Label(row.get(column) or None, split, f"{p}:{lineno}")
            old = out.get(value)
            if old is not None and (old.label, old.split) != (label.label, label.split):
                raise ManifestError(f"{p}:{lineno}: {key} {value} is already labelled "
                                    f"{old.label!r} on {old.where}")
            out.setdefault(value, label)
    return out


# ---------------------------------------------------------------------------------------
# The store


class Store:
    """``objects/<sha[:2]>/<sha>.dcm`` plus an append-only journal (JSON lines) and the
    store's pseudonymisation key (``deid.key``); files 0600, folders 0700.

    Each journal line records one instance key (a keyed hash of its UIDs) and either the
    object holding it (``sha``, ``size``, ``frames``) or why it cannot be used (``skip``,
    ``reason``, with the instance written ``<instance>``) for faults that a retry would
    not cure.  A line torn by a crash is ignored; the last line for a key wins.
    """

    KEY_FILE = "deid.key"

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self.objects = os.path.join(self.folder, "objects")
        self.journal_path = os.path.join(self.folder, "journal.jsonl")
        legacy = os.path.exists(self.journal_path) and \
            not os.path.exists(os.path.join(self.folder, self.KEY_FILE))
        for d in (self.folder, self.objects):
            _private_dir(d)
        if os.path.exists(self.journal_path):
            os.chmod(self.journal_path, 0o600)
        if legacy:
            log.warning("the DICOMweb store %s was written by an older kmedtl that did not "
                        "de-identify (DICOM PS3.15 Basic Profile) nor restrict file modes; "
                        "its objects are not reused and may name patients: delete the "
                        "folder and pull again", self.folder)
        self.deid = Deidentifier(self._key())
        self._lock = threading.Lock()
        self.entries = self._load()

    def _key(self) -> bytes:
        """This store's secret key, made on first use (created 0600, never replaced)."""
        path = os.path.join(self.folder, self.KEY_FILE)
        for _ in range(50):
            try:
                with open(path, encoding="ascii") as fh:
                    text = fh.read().strip()
            except FileNotFoundError:
                try:  # O_EXCL: two first pulls agree on one key
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    continue
                try:
                    os.write(fd, (secrets.token_hex(32) + "\n").encode())
                finally:
                    os.close(fd)
                continue
            if re.fullmatch(r"[0-9a-f]{64}", text):
                return bytes.fromhex(text)
            time.sleep(0.01)
        raise ConfigError(f"{path}: not a kmedtl store key (64 hex digits); it pseudonymises "
                          "this store's UIDs and patients: restore it, or delete the store "
                          "and pull again")

    def _load(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        try:
            with open(self.journal_path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line torn by a crash
                    if isinstance(rec, dict) and "k" in rec:
                        out[rec["k"]] = rec
        except FileNotFoundError:
            pass
        return out

    def instance_key(self, study: str, series: str, sop: str) -> str:
        return self.deid.digest(f"instance:{study}/{series}/{sop}").hex()

    def object_path(self, digest: str) -> str:
        return os.path.join(self.objects, digest[:2], digest + ".dcm")

    def stored(self, key: str, verify: bool = False) -> dict | None:
        """The journal record of ``key`` if its object is present (and intact)."""
        rec = self.entries.get(key)
        if rec is None or "sha" not in rec:
            return rec if rec is not None and "skip" in rec else None
        path = self.object_path(rec["sha"])
        try:
            if os.path.getsize(path) != rec["size"]:
                return None
        except OSError:
            return None
        if verify:
            with open(path, "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() != rec["sha"]:
                    return None
        return rec

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.object_path(digest)
        if not (os.path.exists(path) and os.path.getsize(path) == len(data)):
            _private_dir(os.path.dirname(path))
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            _write_private(tmp, data)
            os.replace(tmp, path)  # atomic: a reader never sees half an instance
        return digest

    def record(self, rec: dict):
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)  # one write per line: concurrent pulls do not interleave
            finally:
                os.close(fd)
            self.entries[rec["k"]] = rec


def _private_dir(path: str):
    """``path`` (and missing parents) as a folder only its owner can enter (0700)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if (os.stat(path).st_mode & 0o777) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as exc:  # not ours: the files inside are 0600 all the same
            log.warning("cannot make %s private (mode 0700): %s", path, exc)


def _write_private(path: str, data: bytes):
    """Create ``path`` with mode 0600 (never wider, whatever the umask) and write it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# De-identification

#: The action table: DICOM PS3.15 (2026c) Annex E, Table E.1-1, column "Basic Profile", as
#: transcribed by dicom-anonymizer (KitwareMedical, BSD-3-Clause;
#: ``dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py``).  Only its table
#: is used: its engine treats top-level attributes only, draws new UIDs at random per
#: process (they must be stable within a store) and raises on some VRs.
PROFILE_TABLE = "dicomfields_2026c"
PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"

#: Table E.1-1 action codes -> what is done here.  Where the table allows a choice the
#: first (most removing) action is taken: X/Z, X/D, X/Z/D -> X, Z/D -> Z, except X/Z/U*
#: (Referenced/Source Image Sequence), which is kept with the UIDs inside it replaced so
#: references still resolve.  D on a sequence empties it (SR content trees, graphic
#: annotations: nothing the image pipeline reads).
_CATEGORY_ACTIONS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
                     "Z_D_TAGS": "Z", "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X",
                     "X_Z_U_STAR_TAGS": "U*"}

#: Never touched, whatever a table version says: what decoding and the pipeline read.
KEEP_KEYWORDS = (
    "SOPClassUID", "Modality", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "NumberOfFrames", "PixelSpacing", "SliceThickness",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "VOILUTSequence", "ModalityLUTSequence", "PixelData",
    "FloatPixelData", "DoubleFloatPixelData", "ImageType", "LossyImageCompression",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
)

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
                "PN": _DUMMY_TEXT, "IS": "0", "DS": "0"}
_MAX_DEPTH = 32  # sequence nesting; deeper is refused (invalid_dicom)
#: File meta elements that may name a site (not in Table E.1-1, which has only (0002,0003)):
#: Source/Sending/Receiving Application Entity Title, Private Information (Creator UID).
_META_REMOVED = {Tag(0x0002, e) for e in (0x0016, 0x0017, 0x0018, 0x0100, 0x0102)}


@functools.lru_cache(maxsize=1)
def _profile_table() -> tuple[dict, list]:
    """``({Tag: action}, [((group, element, group_mask, element_mask), action)])``."""
    try:
        # lazy: an optional extra (pip install 'kmedtl[dicomweb]'); refused below without it
        from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    except ImportError:
        raise BackendUnavailableError(
            "de-identifying the DICOMweb store needs dicom-anonymizer (the PS3.15 Annex E "
            "table): pip install 'kmedtl[dicomweb]'") from None
    categories = dicom_anonymization_database_selector(PROFILE_TABLE)
    exact: dict = {}
    masked: list = []
    for category, action in _CATEGORY_ACTIONS.items():
        for t in categories[category]:
            if len(t) == 2:
                exact[Tag(t[0], t[1])] = action
            else:
                masked.append((tuple(t), action))
    for kw in IDENTITY_KEYWORDS:
        exact.setdefault(Tag(tag_for_keyword(kw)), "X")
    for kw in KEEP_KEYWORDS:
        exact.pop(Tag(tag_for_keyword(kw)), None)
    exact[Tag(tag_for_keyword("PatientID"))] = "P"
    return exact, masked


class Deidentifier:
    """The store's de-identification (:data:`PROFILE_NAME`, action table
    :data:`PROFILE_TABLE`), keyed by the store's secret: :meth:`uid` and :meth:`patient`
    map one input to one output within a store, and to unrelated ones elsewhere."""

    def __init__(self, key: bytes):
        self._key = bytes(key)
        _profile_table()  # a missing table stops here, before anything is fetched

    def digest(self, text: str) -> bytes:
        return hmac.new(self._key, text.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def uid(self, value) -> str:
        value = str(value or "").strip().rstrip("\0")
        if not value:
            return ""
        # 2.25.<128-bit integer>: a UUID-derived UID (PS3.5 B.2), 44 characters at most
        return "2.25." + str(int.from_bytes(self.digest(f"uid:{value}")[:16], "big"))

    def patient(self, value) -> str | None:
        value = str(value or "").strip()
        if not value:
            return None
        return "anon-" + self.digest(f"patient:{value}").hex()[:20]

    def __call__(self, ds) -> None:
        """De-identify ``ds`` in place (file meta included)."""
        exact, masked = _profile_table()
        pseudonym = self.patient(ds.get("PatientID", None))
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = self.uid(meta.MediaStorageSOPInstanceUID)
            for tag in list(meta.keys()):  # the sender's and receiver's AE titles (sites)
                if Tag(tag) in _META_REMOVED:
                    del meta[tag]
        self._scrub(ds, exact, masked, 0)
        if pseudonym:
            ds.PatientID = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "PS3.15 E.1 Basic Profile (kmedtl, keyed UIDs)"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.LongitudinalTemporalInformationModified = "REMOVED"

    def _scrub(self, ds, exact: dict, masked: list, depth: int):
        if depth > _MAX_DEPTH:
            raise DataError("dataset", f"sequences nested deeper than {_MAX_DEPTH} levels",
                            kind="invalid_dicom")
        for tag in list(ds.keys()):
            tag = Tag(tag)
            if tag.is_private:
                del ds[tag]
                continue
            action = exact.get(tag)
            if action is None and tag.group >> 8 in (0x50, 0x60):
                action = next((a for (g, e, gm, em), a in masked
                               if tag.group & gm == g & gm and tag.element & em == e & em),
                              None)
            elem = ds[tag]
            if action is None or action == "U*":
                if elem.VR == "SQ" and elem.value:
                    for item in elem.value:
                        self._scrub(item, exact, masked, depth + 1)
                continue
            if action == "X" or action == "P":
                del ds[tag]  # PatientID: set to the pseudonym afterwards (top level only)
            elif elem.VR == "SQ":
                elem.value = Sequence()  # Z, D (see _CATEGORY_ACTIONS), U
            elif action == "U" or (action == "D" and elem.VR == "UI"):
                if elem.VR != "UI":
                    elem.value = None
                elif elem.VM > 1:
                    elem.value = [self.uid(v) for v in elem.value]
                else:
                    elem.value = self.uid(elem.value)
            elif action == "Z":
                elem.value = None
            else:  # D: a dummy value of the element's VR
                if elem.VR in _DUMMY_BY_VR:
                    elem.value = _DUMMY_BY_VR[elem.VR]
                elif elem.VR in ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"):
                    elem.value = _DUMMY_TEXT
                elif elem.VR in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
                    elem.value = 0
                else:
                    elem.value = None  # bytes, AT, UR: zero length


def deidentify(ds, deid: Deidentifier) -> None:
    """De-identify ``ds`` in place with ``deid`` (:class:`Deidentifier`)."""
    deid(ds)


# ---------------------------------------------------------------------------------------
# One instance


def _check_pixels(ds, name: str):
    """Raise ``DataError`` for an instance without (complete) pixel data."""
    dicom.check_pixels_present(ds, name)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or tsyntax is None or tsyntax.is_compressed:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = dicom.n_frames(ds)
    except (AttributeError, TypeError, ValueError):
        return  # the decoder reports the bad header
    n_bits = rows * cols * spp * frames * bits
    expected = (n_bits + 7) // 8
    got = len(ds.PixelData or b"")
    if got < expected:
        raise DataError(name, f"pixel data holds {got:,} of {expected:,} bytes: the instance "
                        "is truncated on the server; re-send it to the PACS",
                        kind="truncated")


def _serialise(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fetch(client, store: Store, spec: DicomWebSpec, inst: _Instance) -> dict:
    """Retrieve, check, de-identify and store one instance; returns its journal record.

    A problem with this instance alone comes back as a ``skip`` record; a whole-server
    problem raises (``_fatal``)."""
    rec: dict = {"k": inst.key}
    try:
        ds = client.retrieve_instance(inst.study, inst.series, inst.sop,
                                      media_types=(("application/dicom",
                                                    spec.transfer_syntax),))
    except Exception as exc:  # noqa: BLE001 - classified below; whole-server errors raise
        fatal = _fatal(exc, spec, f"retrieving {inst.name}", study=inst.study,
                       instance=inst.sop)
        if fatal is not None:
            raise fatal from None
        kind, reason = _skip_reason(exc, inst.name)
        out = {**rec, "skip": kind, "reason": reason, "retry": kind != "invalid_dicom"}
        if kind == "invalid_dicom":  # journalled: without the parser's text (file values)
            out["journal"] = (f"{inst.name}: the server sent a part that cannot be read as "
                              f"DICOM ({type(exc).__name__})")
        return out
    try:
        _check_pixels(ds, inst.name)
        frames = dicom.n_frames(ds)
        store.deid(ds)
        data = _serialise(ds)
    except DataError as err:
        # a non-image or truncated stored instance: fetching it again would not help
        return {**rec, "skip": err.kind, "reason": f"{inst.name}: {err.reason}",
                "retry": False}
    except (OSError, MemoryError, BackendUnavailableError):
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile part: this instance only
        what = f"{inst.name}: cannot be de-identified and written ({type(exc).__name__}"
        return {**rec, "skip": "invalid_dicom", "retry": False,
                "reason": f"{what}: {_first_line(exc)})", "journal": f"{what})"}
    del ds
    digest = store.put(data)
    return {**rec, "sha": digest, "size": os.path.getsize(store.object_path(digest)),
            "frames": frames}


# ---------------------------------------------------------------------------------------
# Queries


def _value(record, tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON record, as text; None when absent or
    of a shape no DICOM JSON has (a server's records are not trusted to be well formed)."""
    elem = record.get(tag) if isinstance(record, dict) else None
    values = elem.get("Value") if isinstance(elem, dict) else None
    if not isinstance(values, list) or not values:
        return None
    value = values[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return str(value)


def _bad_uid(value) -> bool:
    return not (isinstance(value, str) and len(value) <= 64 and _UID_RE.match(value))


def _show(value) -> str:
    """A server-given value for a message: escaped, at most 80 characters."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _count(record: dict, tag: str) -> int | None:
    try:
        return int(_value(record, tag))
    except (TypeError, ValueError):
        return None


def _search_all(search, key_tags: tuple[str, ...], expected: int | None = None,
                **kwargs) -> list[dict]:
    """Every record of a QIDO-RS search, asking for further pages (``offset``) until a
    page brings nothing new, unless the first page already holds ``expected`` records.

    Servers may cap a search and not say so (Orthanc's ``LimitFindResults`` sends no
    ``Warning`` header), so one more page is asked for; some ignore ``offset`` on some
    queries (Orthanc 1.10 answers every offset of a ``ModalitiesInStudy`` search with the
    full list, on which dicomweb-client's ``get_remaining`` loops forever), so a page
    with nothing new ends the search.
    """
    out: dict[tuple, dict] = {}
    page = search(**kwargs)
    offset = 0
    while True:
        new = 0
        for rec in page:
            key = tuple(_value(rec, t) for t in key_tags)
            if key not in out:
                out[key] = rec
                new += 1
        if not page or not new or (expected is not None and len(out) >= expected):
            return list(out.values())
        offset += len(page)
        page = search(offset=offset, **kwargs)


def _query_studies(client, spec: DicomWebSpec, uids):
    fields_ = ["StudyInstanceUID", "PatientID", "AccessionNumber",
               "NumberOfStudyRelatedInstances"]
    try:
        if uids is None:
            return _search_all(client.search_for_studies, (_STUDY,),
                               search_filters=dict(spec.filters), fields=fields_)
        found = []
        for i in range(0, len(uids), _UID_CHUNK):
            chunk = uids[i:i + _UID_CHUNK]
            filters = {**spec.filters, "StudyInstanceUID": ",".join(chunk)}
            found.extend(_search_all(client.search_for_studies, (_STUDY,),
                                     search_filters=filters, fields=fields_))
        return found
    except Exception as exc:  # noqa: BLE001
        fatal = _fatal(exc, spec, "searching for studies (QIDO-RS)")
        if fatal is not None:
            raise fatal from None
        if getattr(exc, "limit_kind", None):
            raise DicomWebError(f"the DICOMweb server {spec.redacted_url}: the study search "
                                f"(QIDO-RS) failed: {exc}", url=spec.redacted_url) from None
        raise DicomWebError(f"the DICOMweb server {spec.redacted_url} failed the study search "
                            f"({_short(exc)}); check data.dicomweb.filters",
                            url=spec.redacted_url) from None


def _query_instances(client, spec: DicomWebSpec, study: str,
                     expected: int | None = None) -> list | tuple[str, str]:
    """The instance records of ``study``, or ``(kind, reason)`` when this study cannot be
    listed (a whole-server problem raises)."""
    try:
        return _search_all(client.search_for_instances, (_SERIES, _SOP),
                           expected=None if spec.instance_filters else expected,
                           study_instance_uid=study,
                           search_filters=dict(spec.instance_filters) or None,
                           fields=["InstanceNumber", "SeriesInstanceUID"])
    except Exception as exc:  # noqa: BLE001
        fatal = _fatal(exc, spec, f"listing the instances of study {study}", study=study)
        if fatal is not None:
            raise fatal from None
        what = f"study {study}"
        if _status(exc) == 404:
            return "not_found", (f"{what}: not found on the DICOMweb server "
                                 f"{spec.redacted_url} (HTTP 404) when listing its instances")
        kind, reason = _skip_reason(exc, what)
        if kind == "invalid_dicom":
            kind, reason = "server_error", f"{what}: cannot be listed ({_short(exc)})"
        return kind, f"{reason} (QIDO-RS instance listing)"


# ---------------------------------------------------------------------------------------
# The pull


def pull(spec: DicomWebSpec, hierarchy=None, options: ImageOptions | None = None, *,
         strict: bool = False, session=None, verify: bool = False,
         on_progress: Callable[[int, int], None] | None = None) -> PullResult:
    """Query, retrieve what is not yet stored, and index the store.

    ``hierarchy`` (optional) turns labels it does not know into ``unknown_label`` skips;
    ``options.frames == "all"`` makes each frame of a multi-frame instance a sample;
    ``session`` replaces :func:`make_session` (its auth and TLS settings are then the
    caller's); ``verify`` re-hashes stored objects instead of trusting their size;
    ``on_progress(done, total)`` is called from this thread after each retrieval.
    """
    store = Store(spec.store)
    client = make_client(spec, session)
    url = spec.redacted_url
    labels = read_labels(spec.labels, spec.label_key, spec.label_column) if spec.labels \
        else None
    skipped: list[Skipped] = []
    read = 0

    def skip_entry(resource: str, reason: str, kind: str):
        nonlocal read
        read += 1
        path = os.path.join(store.folder, resource)
        skipped.append(Skipped(path, reason, kind, "dicomweb", entry=path))

    def label_problem(where: str, value: str | None) -> tuple[str, str] | None:
        if labels is None:
            return None
        found = labels.get(value) if value else None
        if found is None or found.label is None:
            return "no_label", (f"{where}: no label in {spec.labels} for {spec.label_key} "
                                f"{value or '(empty)'}")
        if hierarchy is not None and found.label not in hierarchy:
            return "unknown_label", (f"{where}: label {found.label!r} ({found.where}) is not in "
                                     f"the hierarchy (known: {sorted(hierarchy.raw_labels)})")
        return None

    uids = list(spec.study_uids) if spec.study_uids is not None else None
    if uids is None and labels is not None and spec.label_key == "StudyInstanceUID" and \
            not spec.filters:
        uids = list(labels)
    studies = _query_studies(client, spec, uids)
    by_uid: dict[str, dict] = {}
    for i, rec in enumerate(studies):
        uid = _value(rec, _STUDY)
        if _bad_uid(uid):
            skip_entry(f"studies/(record {i + 1}: {_show(uid)})",
                       f"study record {i + 1} of the DICOMweb server {url}: its "
                       f"StudyInstanceUID {_show(uid)} is not a DICOM UID (digits and dots, "
                       "at most 64 characters); it is not asked for", "bad_uid")
            continue
        by_uid.setdefault(uid, rec)
    if uids is not None:
        for uid in uids:
            if uid not in by_uid:
                skip_entry(f"studies/{uid}", f"study {uid}: not found on the DICOMweb server "
                           f"{url} (asked for by "
                           f"{'data.dicomweb.study_uids' if spec.study_uids else spec.labels})",
                           "not_found")
    log.info("DICOMweb %s: %d studies match", url, len(by_uid))

    plan: list[_Instance] = []
    wanted: list[tuple[str, _Label | None]] = []
    for study in sorted(by_uid):
        rec = by_uid[study]
        study_label = None
        if spec.label_key in ("StudyInstanceUID", "AccessionNumber") and labels is not None:
            key_value = study if spec.label_key == "StudyInstanceUID" else \
                _value(rec, _ACCESSION)
            problem = label_problem(f"study {study}", key_value)
            if problem:
                skip_entry(f"studies/{study}", problem[1], problem[0])
                continue
            study_label = labels[key_value]
        wanted.append((study, study_label))
    with ThreadPoolExecutor(max_workers=int(spec.workers),
                            thread_name_prefix="kmedtl-qido") as pool:
        listings = list(pool.map(lambda w: _query_instances(
            client, spec, w[0], _count(by_uid[w[0]], _N_INSTANCES)), wanted))
    for (study, study_label), instances in zip(wanted, listings):
        patient = store.deid.patient(_value(by_uid[study], _PATIENT_ID))
        if isinstance(instances, tuple):
            skip_entry(f"studies/{study}", instances[1], instances[0])
            continue
        expected = _count(by_uid[study], _N_INSTANCES)
        if not spec.instance_filters and expected is not None and len(instances) < expected:
            skip_entry(f"studies/{study}", f"study {study}: the server listed "
                       f"{len(instances)} of its {expected} instances "
                       "(NumberOfStudyRelatedInstances) even when asked page by page: its "
                       "search results are capped (Orthanc: LimitFindInstances); raise the "
                       "limit on the server, the missing instances cannot be named",
                       "incomplete_listing")
        series_problem: dict[str, tuple[str, str] | None] = {}
        for irec in instances:
            series, sop = _value(irec, _SERIES), _value(irec, _SOP)
            bad = [(k, v) for k, v in (("SeriesInstanceUID", series), ("SOPInstanceUID", sop))
                   if _bad_uid(v)]
            if bad:
                names = [v if not _bad_uid(v) else f"(bad UID {_show(v)})" for v in (series, sop)]
                skip_entry(f"studies/{study}/series/{names[0]}/instances/{names[1]}",
                           f"study {study}: the server listed an instance whose {bad[0][0]} "
                           f"{_show(bad[0][1])} is not a DICOM UID (digits and dots, at most 64 "
                           "characters); it is not asked for", "bad_uid")
                continue
            label = study_label
            if spec.label_key == "SeriesInstanceUID" and labels is not None:
                if series not in series_problem:
                    series_problem[series] = label_problem(
                        f"series {series} (study {study})", series)
                    if series_problem[series]:
                        kind_reason = series_problem[series]
                        skip_entry(f"studies/{study}/series/{series}", kind_reason[1],
                                   kind_reason[0])
                if series_problem[series]:
                    continue
                label = labels[series]
            try:
                number = int(_value(irec, _INSTANCE_NUMBER) or 0)
            except (TypeError, ValueError):
                number = 0
            plan.append(_Instance(study, series, sop, number,
                                  label.label if label else None,
                                  label.split if label else None, patient,
                                  store.instance_key(study, series, sop)))
    plan.sort(key=lambda i: (i.study, i.series, i.number, i.sop))
    plan = list({i.key: i for i in plan}.values())  # a server listing one twice

    records: dict[str, dict] = {}
    todo = []
    reused = 0
    for inst in plan:
        rec = store.stored(inst.key, verify=verify)
        if rec is not None:
            records[inst.key] = rec
            reused += "sha" in rec
        else:
            todo.append(inst)
    fetched = _retrieve_all(client, store, spec, todo, records, len(plan) - len(todo),
                            len(plan), on_progress)

    samples: list[Sample] = []
    n_skipped_instances = 0
    frames_all = options is not None and options.frames == "all"
    for inst in plan:
        read += 1
        rec = records[inst.key]
        entry = os.path.join(store.folder, "studies", inst.study, "series", inst.series,
                             "instances", inst.sop)
        if "skip" in rec:
            n_skipped_instances += 1
            reason = str(rec.get("reason", "")).replace("<instance>", inst.name)
            skipped.append(Skipped(entry, reason, rec["skip"], "dicomweb", entry=entry))
            continue
        path = store.object_path(rec["sha"])
        n = int(rec.get("frames", 1) or 1)
        frames = range(n) if frames_all and n > 1 else [None]
        samples.extend(Sample(path, inst.label, inst.patient, inst.split, f, entry=entry)
                       for f in frames)
    index = DatasetIndex(samples, skipped, read, root=store.folder)
    result = PullResult(index, store.folder, url, len(by_uid), len(plan), fetched, reused,
                        n_skipped_instances)
    log.info("DICOMweb %s: %d instances listed, %d fetched, %d already stored, %d skipped",
             url, len(plan), fetched, reused, n_skipped_instances)
    index.check_strict(strict)
    return result


def _journal_record(rec: dict, inst: _Instance) -> dict:
    """``rec`` as journalled: its reason names no UID (``<instance>``, ``<uid>``) and
    holds no parser message (``journal``: the reason without it), which may quote values
    of the file."""
    rec = dict(rec)
    safe = rec.pop("journal", None)
    if "reason" not in rec:
        return rec
    reason = str(safe or rec["reason"]).replace(inst.name, "<instance>")
    for uid in sorted({inst.study, inst.series, inst.sop}, key=len, reverse=True):
        reason = reason.replace(uid, "<uid>")
    return {**rec, "reason": reason}


def _retrieve_all(client, store: Store, spec: DicomWebSpec, todo: list[_Instance],
                  records: dict, done: int, total: int, on_progress) -> int:
    """Retrieve ``todo`` with ``spec.workers`` threads; journal each result as it comes.

    On a whole-server error no new retrieval starts, the ones in flight finish (and are
    journalled when they succeed), and the error is raised with the counts."""
    fetched = 0
    failure: DicomWebError | None = None
    pending = iter(todo)
    with ThreadPoolExecutor(max_workers=int(spec.workers),
                            thread_name_prefix="kmedtl-wado") as pool:
        running = {}

        def submit_next():
            inst = next(pending, None)
            if inst is not None:
                running[pool.submit(_fetch, client, store, spec, inst)] = inst
            return inst is not None

        for _ in range(int(spec.workers) * 2):
            if not submit_next():
                break
        while running:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                inst = running.pop(fut)
                try:
                    rec = fut.result()
                except DicomWebError as err:
                    failure = failure or err
                    continue
                if rec.get("retry"):
                    records[inst.key] = rec  # this run only: the next pull tries again
                else:
                    rec.pop("retry", None)
                    store.record(_journal_record(rec, inst))
                    rec.pop("journal", None)
                    records[inst.key] = rec
                fetched += "sha" in rec
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
                if failure is None:
                    submit_next()
    if failure is not None:
        stored = sum(1 for r in records.values() if "sha" in r)
        left = total - stored - sum(1 for r in records.values() if "skip" in r)
        message = (f"{failure}; {stored} of {total} instances are in the store {store.folder} "
                   f"({fetched} fetched by this run), {left} still to fetch: run the pull "
                   "again to resume (stored instances are not fetched again)")
        raise type(failure)(message, url=failure.url, study=failure.study,
                            instance=failure.instance) from None
    return fetched
