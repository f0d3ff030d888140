"""A hostile DICOMweb server, and PHI in the DICOMweb store (issue 21, items 6 and 8).

A tiny QIDO-RS / WADO-RS server (``http.server`` on 127.0.0.1, in this process) serves a
few studies; some instances misbehave: a gzip bomb, an endless chunked reply, a reply
dripped one byte at a time (body or headers), HTTP 404 / 500, a multipart part that is not
DICOM, a part whose element cannot be read (it used to abort the whole pull), a UID that
is not a UID, and a study whose instance listing fails.  All pulls run in
ONE subprocess under ``tests/limits.py`` caps (RSS and time); each test then checks its
own instance: skipped with a reason that names the limit, the others pulled, counts that
reconcile.  The de-identification test plants identifying values and checks that none of
them is in any byte of the store, that grouping by patient and study still holds and that
every file is mode 0600 (folders 0700).
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pydicom
import pytest
from limits import python
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

RSS_MB = 500  # the whole batch: interpreter + pydicom + requests + every pull below
TIMEOUT_S = 60
CAP = 8 * 1024 * 1024  # data.dicomweb.max_response_bytes in the hostile pulls
DEADLINE = 2.0  # data.dicomweb.read_deadline in the hostile pulls (socket timeout: 10 s)
ROOT = "1.2.999.77"  # planted UIDs all start with this

PLANTED = {  # keyword -> a value that must not reach the store
    "PatientName": "Planted^Patientname", "PatientBirthDate": "19410203",
    "AccessionNumber": "PLANTEDACC77", "StudyDescription": "PLANTED STUDY DESCRIPTION",
    "ReferringPhysicianName": "Planted^Referrer", "InstitutionName": "PLANTED INSTITUTION",
    "InstitutionAddress": "1 Planted Street", "StudyDate": "19770707", "StudyTime": "071707.774411",
    "SeriesDate": "19770708", "ContentDate": "19770709", "AcquisitionDate": "19770710",
    "SeriesDescription": "PLANTED SERIES DESCRIPTION", "OperatorsName": "Planted^Operator",
    "PerformingPhysicianName": "Planted^Performer", "StationName": "PLANTEDSTATION",
    "DeviceSerialNumber": "PLANTEDSERIAL", "StudyID": "PLANTEDSTUDYID",
    "ImageComments": "PLANTED IMAGE COMMENT", "PatientAddress": "2 Planted Avenue",
}
PRIVATE_CREATOR, PRIVATE_VALUE = "PLANTED CREATOR", "PLANTED PRIVATE VALUE"
NESTED_VALUE = "Planted^Nested"  # ReferringPhysicianName inside a sequence
AE_TITLE = "PLANTEDSITEAE"  # the sender's AE title, in the file meta


def uid(*parts) -> str:
    return ".".join([ROOT, *map(str, parts)])


def make_instance(study: str, series: str, sop: str, patient: str, *, ref: str | None = None,
                  seed: int = 0) -> bytes:
    """A 16x16 secondary capture with every :data:`PLANTED` value, a private block, a
    nested name and (``ref``) a reference to another instance's SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = AE_TITLE
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.FrameOfReferenceUID = study + ".9"
    ds.PatientID = patient
    for kw, value in PLANTED.items():
        setattr(ds, kw, value)
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.5, 0.5], "1", "0"
    ds.WindowCenter, ds.WindowWidth = "128", "256"
    ds.PixelData = ((np.arange(256) + seed) % 256).astype(np.uint8).tobytes()
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
    item.ReferringPhysicianName = NESTED_VALUE
    ds.AnatomicRegionSequence = Sequence([item])
    if ref:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = SecondaryCaptureImageStorage, ref
        ds.ReferencedImageSequence = Sequence([r])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def odd_length_instance(study: str, series: str, sop: str) -> bytes:
    """A DICOM file whose Rows (US) is 3 bytes long: it parses, but the element cannot be
    read (pydicom raises BytesLengthException), which used to abort the whole pull."""
    good = make_instance(study, series, sop, "PID-ODD")
    at = good.find(b"\x28\x00\x10\x00US")
    return good[:at + 6] + b"\x03\x00" + good[at + 8:at + 10] + b"\0" + good[at + 10:]


def multipart(*parts: bytes, boundary: bytes = b"kmedtl-boundary") -> bytes:
    out = b"".join(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + p +
                   b"\r\n" for p in parts)
    return out + b"--" + boundary + b"--\r\n"


def gzip_bomb(decoded_gib: float = 2.0) -> bytes:
    """``decoded_gib`` GiB of zeros as concatenated gzip members (about 1 MB per GiB)."""
    member = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    return member * int(decoded_gib * 64)


class HostilePacs:
    """``studies``: study UID -> {"patient": ID, "instances": [(series, sop, behaviour)]};
    ``behaviour`` is DICOM bytes (served as multipart) or the name of a misbehaviour.
    ``bad_listing``: studies whose instance listing answers HTTP 500.  ``late``: study UID
    -> instances that join it after its first listing (new instances of a known study)."""

    def __init__(self, studies: dict, bad_listing=(), late=None):
        self.studies, self.bad_listing = studies, set(bad_listing)
        self.late = dict(late or {})
        self.stop = threading.Event()
        self.hits: dict[str, int] = {}
        self.paths: list[str] = []
        self._bomb = None
        pacs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    pacs._handle(self)
                except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
                    pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hung up on a hostile reply

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _send(h, status: int, body: bytes, ctype: str, **headers):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, records):
        self._send(h, 200, json.dumps(records).encode(), "application/dicom+json")

    def _handle(self, h):
        self.paths.append(h.path)
        parts = urlsplit(h.path)
        path = parts.path.split("/dicom-web", 1)[1].strip("/").split("/")
        query = parse_qs(parts.query)
        if query.get("offset", ["0"])[0] not in ("0", ""):
            return self._json(h, [])  # one page holds everything
        if path == ["studies"]:
            wanted = set(",".join(query.get("StudyInstanceUID", [])).split(",")) - {""}
            return self._json(h, [
                {"0020000D": {"vr": "UI", "Value": [s]},
                 "00100020": {"vr": "LO", "Value": [info["patient"]]},
                 "00201208": {"vr": "IS", "Value": [len(info["instances"])]}}
                for s, info in self.studies.items() if not wanted or s in wanted])
        if len(path) == 3 and path[0] == "studies" and path[2] == "instances":
            if path[1] in self.bad_listing:
                return self._send(h, 500, b"listing failed", "text/plain")
            info = self.studies.get(path[1])
            if info is None:
                return self._send(h, 404, b"", "text/plain")
            records = list(info["instances"])
            if path[1] in self.late:
                info["instances"].extend(self.late.pop(path[1]))
            return self._json(h, [
                {"0020000E": {"vr": "UI", "Value": [se]}, "00080018": {"vr": "UI", "Value": [sop]},
                 "00200013": {"vr": "IS", "Value": [i + 1]}}
                for i, (se, sop, _) in enumerate(records)])
        if len(path) == 6 and path[0] == "studies" and path[4] == "instances":
            study, series, sop = path[1], path[3], path[5]
            self.hits[sop] = self.hits.get(sop, 0) + 1
            for se, s, behaviour in self.studies.get(study, {}).get("instances", []):
                if (se, s) == (series, sop):
                    return self._serve(h, behaviour)
        return self._send(h, 404, b"", "text/plain")

    def _serve(self, h, behaviour):
        ctype = 'multipart/related; type="application/dicom"; boundary=kmedtl-boundary'
        if isinstance(behaviour, bytes):
            return self._send(h, 200, multipart(behaviour), ctype)
        if behaviour in ("404", "500"):
            return self._send(h, int(behaviour), b"no", "text/plain")
        if behaviour == "malformed":  # a part that is not DICOM
            return self._send(h, 200, multipart(b"this is not a DICOM file " * 40), ctype)
        if behaviour == "gzip_bomb":  # Content-Encoding the client did not ask for
            if self._bomb is None:
                self._bomb = gzip_bomb()
            return self._send(h, 200, self._bomb, ctype, Content_Encoding="gzip")
        if behaviour == "endless":  # chunked zeros, never ending
            h.send_response(200)
            h.send_header("Content-Type", ctype)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            chunk = b"\0" * (1 << 20)
            while not self.stop.is_set():
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            return None
        if behaviour in ("drip", "drip_headers"):  # one byte every 0.5 s: never a timeout
            if behaviour == "drip":
                h.send_response(200)
                h.send_header("Content-Type", ctype)
                h.send_header("Content-Length", "100000")
                h.end_headers()
            h.wfile.flush()
            data = b"X-Drip: " + b"a" * 100000 if behaviour == "drip_headers" else b"-" * 100000
            if behaviour == "drip_headers":
                h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(len(data)):
                if self.stop.wait(0.5):
                    return None
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
            return None
        raise AssertionError(behaviour)


# ---------------------------------------------------------------------------------------
# The pulls, in one capped subprocess

RUNNER = r"""
import json, os, sys, time
from kmedtl.data.dicomweb import DicomWebSpec, pull
cases = json.load(sys.stdin)
out = {}
for name, kw in cases.items():
    t0 = time.monotonic()
    try:
        r = pull(DicomWebSpec(**kw))
        res = {"summary": r.summary(), "listed": r.listed, "fetched": r.fetched,
               "reused": r.reused, "skipped_instances": r.skipped_instances,
               "counts": r.index.counts(),
               "skipped": [[s.kind, s.reason, s.entry_key] for s in r.index.skipped],
               "samples": [[s.path, s.patient_id, s.entry] for s in r.index.samples]}
    except Exception as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res["seconds"] = time.monotonic() - t0
    # VmHWM, not ru_maxrss: ru_maxrss is inherited across fork and exec, so it would
    # report the (TensorFlow-sized) pytest parent that started this process
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    res["peak_mb"] = hwm / 1024
    out[name] = res
    print(name, json.dumps(res)[:300], file=sys.stderr, flush=True)
print(json.dumps(out))
"""

S_LIMITS, S_SLOW, S_BAD, S_BAD_LISTING = uid(1), uid(2), uid(3), uid(4)
S_PHI_A1, S_PHI_A2, S_PHI_B = uid(5), uid(6), uid(7)


def _study(patient, *instances):
    return {"patient": patient, "instances": list(instances)}


def _series(study):
    return study + ".1"


def _good(study, n, patient="PID-OK", **kw):
    return (_series(study), f"{study}.1.{n}",
            make_instance(study, _series(study), f"{study}.1.{n}", patient, seed=n, **kw))


def _hostile(study, n, behaviour):
    return (_series(study), f"{study}.1.{n}", behaviour)


BAD_UID = "1.2.3/../../../../etc/passwd"
PHI_PATIENTS = {"A": "PLANTED-PID-A", "B": "PLANTED-PID-B"}


def _phi_studies():
    a1, a2, b = S_PHI_A1, S_PHI_A2, S_PHI_B
    first = f"{a1}.1.1"
    return {
        a1: _study(PHI_PATIENTS["A"], _good(a1, 1, PHI_PATIENTS["A"]),
                   _good(a1, 2, PHI_PATIENTS["A"], ref=first)),
        a2: _study(PHI_PATIENTS["A"], _good(a2, 1, PHI_PATIENTS["A"])),
        b: _study(PHI_PATIENTS["B"], _good(b, 1, PHI_PATIENTS["B"]),
                  _good(b, 2, PHI_PATIENTS["B"])),
    }


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Run every hostile pull once, in one capped subprocess: the per-case results, the
    server's request log, the stores' folder and the studies served."""
    tmp = tmp_path_factory.mktemp("hostile")
    studies = {
        S_LIMITS: _study("PID-L", _good(S_LIMITS, 1), _hostile(S_LIMITS, 2, "gzip_bomb"),
                         _hostile(S_LIMITS, 3, "endless"), _good(S_LIMITS, 4)),
        S_SLOW: _study("PID-S", _good(S_SLOW, 1), _hostile(S_SLOW, 2, "drip"),
                       _hostile(S_SLOW, 3, "drip_headers"), _good(S_SLOW, 4)),
        S_BAD: _study("PID-B", _good(S_BAD, 1), _hostile(S_BAD, 2, "404"),
                      _hostile(S_BAD, 3, "500"), _hostile(S_BAD, 4, "malformed"),
                      (_series(S_BAD), BAD_UID, "404"), _good(S_BAD, 5),
                      (_series(S_BAD), f"{S_BAD}.1.6",
                       odd_length_instance(S_BAD, _series(S_BAD), f"{S_BAD}.1.6"))),
        S_BAD_LISTING: _study("PID-B", _good(S_BAD_LISTING, 1)),
        **_phi_studies(),
    }
    late = {S_PHI_B: [_good(S_PHI_B, 3, PHI_PATIENTS["B"])]}
    with HostilePacs(studies, bad_listing={S_BAD_LISTING}, late=late) as pacs:
        common = {"url": pacs.url, "timeout": 10, "retries": 1, "backoff": 0.01,
                  "max_response_bytes": CAP, "read_deadline": DEADLINE}
        cases = {
            "limits": {**common, "store": str(tmp / "limits"), "study_uids": [S_LIMITS]},
            "slow": {**common, "store": str(tmp / "slow"), "study_uids": [S_SLOW]},
            "bad": {**common, "store": str(tmp / "bad"),
                    "study_uids": [S_BAD, S_BAD_LISTING]},
            # again: what cannot change is remembered (journal), not fetched again
            "bad_again": {**common, "store": str(tmp / "bad"), "study_uids": [S_BAD]},
            "phi": {**common, "store": str(tmp / "phi"),
                    "study_uids": [S_PHI_A1, S_PHI_A2, S_PHI_B]},
            # study B has gained an instance since: the same store, then another one
            "phi_again": {**common, "store": str(tmp / "phi"), "study_uids": [S_PHI_B]},
            "phi_other": {**common, "store": str(tmp / "other"), "study_uids": [S_PHI_B]},
        }
        res = python(RUNNER, rss_mb=RSS_MB, timeout=TIMEOUT_S, stdin=json.dumps(cases))
        hits = dict(pacs.hits)
        paths = list(pacs.paths)
    assert res.ok, res.why()
    assert res.rc == 0, res.why()
    out = json.loads(res.out.strip().splitlines()[-1])
    print(f"hostile DICOMweb batch: peak {res.peak_mb:.0f} MB, {res.seconds:.1f} s; "
          + ", ".join(f"{k} {v['seconds']:.1f}s/{v['peak_mb']:.0f}MB" for k, v in out.items()),
          file=sys.stderr)
    return {"out": out, "res": res, "tmp": tmp, "studies": studies, "hits": hits,
            "paths": paths}


def _case(batch, name):
    r = batch["out"][name]
    assert "error" not in r, r["error"]
    c = r["counts"]
    assert c["read"] == c["used"] + c["skipped"], c
    assert r["listed"] == r["fetched"] + r["reused"] + r["skipped_instances"], r
    return r


def _skip_of(r, sop):
    hits = [(k, reason) for k, reason, entry in r["skipped"] if entry.endswith(sop)]
    assert len(hits) == 1, (sop, r["skipped"])
    return hits[0]


def _pulled(r):
    return {entry.rsplit("/", 1)[1] for _, _, entry in r["samples"]}


def test_gzip_bomb_and_endless_reply_stop_at_the_response_cap(batch):
    """1 GB-per-MB gzip (Content-Encoding not asked for) and an endless chunked reply:
    each stops at max_response_bytes (decoded bytes), is skipped naming the limit, and the
    good instances beside them are pulled; the process stays far below the RSS cap."""
    r = _case(batch, "limits")
    for n in (2, 3):
        kind, reason = _skip_of(r, f"{S_LIMITS}.1.{n}")
        assert kind == "response_too_large", reason
        assert "data.dicomweb.max_response_bytes" in reason and f"{CAP:,}" in reason, reason
    assert _pulled(r) == {f"{S_LIMITS}.1.1", f"{S_LIMITS}.1.4"}
    assert r["summary"]["skipped_kinds"] == {"response_too_large": 2}
    # a cap is not retried: retrying would download it again
    assert batch["hits"][f"{S_LIMITS}.1.2"] == 1 and batch["hits"][f"{S_LIMITS}.1.3"] == 1
    assert r["peak_mb"] < 300, r["peak_mb"]
    assert r["seconds"] < 20, r["seconds"]


def test_slow_drip_is_cut_at_the_read_deadline(batch):
    """1 byte every 0.5 s (body, or the headers themselves) never trips the 10 s socket
    timeout; read_deadline (2 s) ends each request, the item is skipped naming the limit."""
    r = _case(batch, "slow")
    for n in (2, 3):
        kind, reason = _skip_of(r, f"{S_SLOW}.1.{n}")
        assert kind == "response_too_slow", reason
        assert "data.dicomweb.read_deadline" in reason and "2 s" in reason, reason
    assert _pulled(r) == {f"{S_SLOW}.1.1", f"{S_SLOW}.1.4"}
    assert batch["hits"][f"{S_SLOW}.1.2"] == 1  # not retried
    assert r["seconds"] < 3 * DEADLINE + 4, r["seconds"]  # the drips run side by side


def test_one_bad_uid_is_skipped_with_a_reason_and_the_rest_pulled(batch):
    r = _case(batch, "bad")
    kinds = {n: _skip_of(r, f"{S_BAD}.1.{n}")[0] for n in (2, 3, 4, 6)}
    assert kinds == {2: "not_found", 3: "server_error", 4: "invalid_dicom",
                     6: "invalid_dicom"}
    assert "cannot be de-identified" in _skip_of(r, f"{S_BAD}.1.6")[1]
    (reason,) = [reason for k, reason, _ in r["skipped"] if k == "bad_uid"]
    assert ascii(BAD_UID) in reason and "not a DICOM UID" in reason
    assert not [p for p in batch["paths"] if "passwd" in p]  # never sent to the server
    listing = [(k, reason) for k, reason, e in r["skipped"] if e.endswith(S_BAD_LISTING)]
    assert [k for k, _ in listing] == ["server_error"], r["skipped"]
    assert "500" in listing[0][1] and S_BAD_LISTING in listing[0][1]
    assert _pulled(r) == {f"{S_BAD}.1.1", f"{S_BAD}.1.5"}
    s = r["summary"]
    assert s["skipped_kinds"] == {"not_found": 1, "server_error": 2, "invalid_dicom": 2,
                                  "bad_uid": 1}
    assert s["read"] == s["used"] + s["skipped"]
    # the journal remembers the unreadable parts without naming them; a re-run says
    # which instance each was and fetches neither again
    journal = (batch["tmp"] / "bad" / "journal.jsonl").read_bytes()
    assert journal.count(b"<instance>") == 2 and ROOT.encode() not in journal
    again = _case(batch, "bad_again")
    assert (again["fetched"], again["reused"]) == (0, 2)
    for n in (4, 6):
        kind, reason = _skip_of(again, f"{S_BAD}.1.{n}")
        assert kind == "invalid_dicom" and f"instance {S_BAD}.1.{n} (series" in reason
        assert batch["hits"][f"{S_BAD}.1.{n}"] == 1


# ---------------------------------------------------------------------------------------
# PHI in the store


def _store_files(folder):
    return [p for p in Path(folder).rglob("*") if p.is_file()]


def test_store_is_deidentified_and_grouping_still_holds(batch):
    r = _case(batch, "phi")
    store = batch["tmp"] / "phi"
    assert r["fetched"] == 5 and not r["skipped"]
    blob = b"".join(p.read_bytes() for p in _store_files(store))
    planted = [*PLANTED.values(), PRIVATE_CREATOR, PRIVATE_VALUE, NESTED_VALUE, AE_TITLE,
               *PHI_PATIENTS.values(), ROOT]
    for value in planted:
        for form in {value, value.replace("^", " "), value.rstrip()}:
            assert form.encode() not in blob, f"{form!r} is in the store"
    assert b"Planted" not in blob and b"PLANTED" not in blob

    by_entry = {e: (p, pid) for p, pid, e in r["samples"]}
    stored = {e.rsplit("/", 1)[1]: (pydicom.dcmread(p), pid) for e, (p, pid) in by_entry.items()}
    assert len(stored) == 5
    a11, a12 = stored[f"{S_PHI_A1}.1.1"], stored[f"{S_PHI_A1}.1.2"]
    a21, b1, b2 = stored[f"{S_PHI_A2}.1.1"], stored[f"{S_PHI_B}.1.1"], stored[f"{S_PHI_B}.1.2"]
    # studies and patients group as before, under new identifiers
    assert a11[0].StudyInstanceUID == a12[0].StudyInstanceUID != a21[0].StudyInstanceUID
    assert b1[0].StudyInstanceUID == b2[0].StudyInstanceUID != a11[0].StudyInstanceUID
    assert a11[0].SeriesInstanceUID == a12[0].SeriesInstanceUID
    pids = {k: v[0].PatientID for k, v in
            {"a11": a11, "a12": a12, "a21": a21, "b1": b1, "b2": b2}.items()}
    assert pids["a11"] == pids["a12"] == pids["a21"] != pids["b1"] == pids["b2"]
    assert all(pid for pid in pids.values())
    # the in-memory patient key of each sample is the same pseudonym
    assert [v[1] for v in (a11, a12, a21, b1, b2)] == list(pids.values())
    for ds, _ in stored.values():
        assert ds.StudyInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.startswith("2.25.")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.FrameOfReferenceUID.startswith("2.25.")
        assert ds.PatientIdentityRemoved == "YES"
        assert "Basic" in str(ds.DeidentificationMethod) or \
            ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        # what the image pipeline needs is kept
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert [float(x) for x in ds.PixelSpacing] == [0.5, 0.5]
        assert (float(ds.RescaleSlope), float(ds.WindowWidth)) == (1.0, 256.0)
        assert ds.pixel_array.shape == (16, 16)
        assert not any(e.tag.is_private for e in ds.iterall())
    # a reference to another instance follows that instance's new UID
    assert a12[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == a11[0].SOPInstanceUID
    original = pydicom.dcmread(io.BytesIO(
        batch["studies"][S_PHI_A1]["instances"][0][2]))
    np.testing.assert_array_equal(a11[0].pixel_array, original.pixel_array)


def test_store_files_are_0600_and_folders_0700(batch):
    store = batch["tmp"] / "phi"
    files = _store_files(store)
    assert len(files) >= 6  # 5 objects + the journal (+ the key)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    for d in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, (d, oct(d.stat().st_mode))


def test_uid_mapping_is_stable_across_pulls_into_one_store(batch):
    """A later pull into the same store (a new instance of a known study) maps the study
    and the patient as before; a pull into another store maps them elsewhere (the key is
    per store)."""
    def read(case):
        return {e.rsplit("/", 1)[1]: (pydicom.dcmread(p, stop_before_pixels=True), pid)
                for p, pid, e in _case(batch, case)["samples"]}

    first, again, other = read("phi"), read("phi_again"), read("phi_other")
    r = batch["out"]["phi_again"]
    assert (r["fetched"], r["reused"]) == (1, 2)
    b1, b3 = first[f"{S_PHI_B}.1.1"][0], again[f"{S_PHI_B}.1.3"][0]
    assert b3.StudyInstanceUID == b1.StudyInstanceUID and b3.PatientID == b1.PatientID
    assert b3.SeriesInstanceUID == b1.SeriesInstanceUID
    assert {pid for _, pid in again.values()} == {first[f"{S_PHI_B}.1.1"][1]}
    o3 = other[f"{S_PHI_B}.1.3"][0]
    assert o3.StudyInstanceUID != b1.StudyInstanceUID and o3.PatientID != b1.PatientID


def test_limits_are_config_fields_with_documented_defaults():
    from kmedtl.data.dicomweb import DicomWebSpec
    from kmedtl.errors import ConfigError

    base = {"url": "https://pacs.example/dicom-web", "store": "s"}
    spec = DicomWebSpec.from_dict(base)
    assert (spec.max_response_bytes, spec.read_deadline) == (256 * 1024 * 1024, 300.0)
    spec = DicomWebSpec.from_dict({**base, "max_response_bytes": 1000, "read_deadline": 5})
    assert (spec.max_response_bytes, spec.read_deadline) == (1000, 5.0)
    for bad in ({"max_response_bytes": 0}, {"read_deadline": -1}, {"read_deadline": "soon"}):
        with pytest.raises(ConfigError, match="max_response_bytes >= 1.*read_deadline > 0"):
            DicomWebSpec.from_dict({**base, **bad})
