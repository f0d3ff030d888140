"""The DICOMweb source against a real Orthanc (Debian's orthanc + orthanc-dicomweb).

The server holds the brain-tumour DICOM demo (16 studies, 48 instances, synthetic patient
IDs, an AccessionNumber per study) and real pydicom test files: compressed and
multi-frame images, a Basic Text SR (no pixels), a CT header without pixel data and an
RT Structure Set stored without file meta (a part that is not a DICOM file).

Faults are real: a closed port, wrong credentials, a study the server lacks, a study
deleted while it is pulled, responses cut short by a proxy, and Orthanc killed with
SIGKILL in the middle of a pull.  Tests skip only when Orthanc cannot be installed, and
fail instead under CI.
"""

import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import brain_tumor_hierarchy, pydicom_test_files
from orthanc_server import FaultProxy, Orthanc, OrthancUnavailable, find_orthanc, free_port

from kmedtl.data.dicomweb import (
    IDENTITY_KEYWORDS,
    DicomWebSpec,
    pull,
    read_labels,
)
from kmedtl.data.options import ImageOptions
from kmedtl.errors import (
    ConfigError,
    DicomWebAuthError,
    DicomWebConnectionError,
    DicomWebTLSError,
    ManifestError,
    StrictModeError,
)

pytestmark = pytest.mark.integration
USER_ENV, PASSWORD_ENV, TOKEN_ENV = "KMEDTL_TEST_PACS_USER", "KMEDTL_TEST_PACS_PASSWORD", \
    "KMEDTL_TEST_PACS_TOKEN"
EXTRAS = {  # pydicom test file -> what the pull must make of it
    "CT_small.dcm": "image", "MR_small.dcm": "image", "JPEG2000.dcm": "image",
    "emri_small.dcm": "image", "reportsi.dcm": "no_pixel_data", "IM000001": "truncated",
    "rtstruct.dcm": "invalid_dicom",
}


def dicom_file(name: str) -> Path:
    """A real test file of the pydicom wheels by base name (first in sorted order)."""
    hits = [p for p in pydicom_test_files() if p.name == name]
    if not hits:
        pytest.fail(f"{name} is not in the installed pydicom / pydicom-data wheels")
    return hits[0]


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(scope="session")
def orthanc_installed():
    try:
        return find_orthanc()
    except OrthancUnavailable as exc:
        message = f"Orthanc with the DICOMweb plugin cannot be used here: {exc}"
        if _under_ci():
            pytest.fail(f"{message} (CI must run these tests: .ci/orthanc.sh install)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def demo(datasets_dir, tmp_path_factory):
    """The brain-tumour DICOM demo with one AccessionNumber per study; per-file facts."""
    from kmedtl.pipeline.make_dicom_demo import make_dicom_demo

    out = tmp_path_factory.mktemp("demo")
    manifest = make_dicom_demo(out, datasets_dir / "brain-tumor-mri")
    rows = list(csv.DictReader(open(manifest)))
    facts, accession = [], {}
    for row in rows:
        path = out / row["path"]
        ds = pydicom.dcmread(path)
        acc = accession.setdefault(ds.StudyInstanceUID, f"ACC{len(accession) + 1:04d}")
        ds.AccessionNumber = acc
        ds.save_as(path, enforce_file_format=True)
        facts.append({"path": path, "label": row["label"], "patient": row["patient_id"],
                      "study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                      "sop": ds.SOPInstanceUID, "accession": acc})
    return facts


@pytest.fixture(scope="module")
def pacs(orthanc_installed, demo, tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    with server:
        server.upload_many([f["path"] for f in demo])
        server.upload_many([dicom_file(name) for name in EXTRAS])
        yield server


@pytest.fixture
def creds(monkeypatch, pacs):
    monkeypatch.setenv(USER_ENV, pacs.user)
    monkeypatch.setenv(PASSWORD_ENV, pacs.password)
    return pacs


def labels_csv(path, rows, key="StudyInstanceUID", split=False):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([key, "label"] + (["split"] if split else []))
        w.writerows(rows)
    return str(path)


def study_labels(demo):
    return sorted({(f["study"], f["label"]) for f in demo})


def make_spec(url, tmp_path, **kw):
    kw.setdefault("username_env", USER_ENV)
    kw.setdefault("password_env", PASSWORD_ENV)
    kw.setdefault("store", str(tmp_path / "store"))
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.05)
    kw.setdefault("timeout", 10)
    return DicomWebSpec(url=url, **kw)


def identifiers(paths) -> set[str]:
    out = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        for kw in ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(kw, "") or "")
            if len(value) >= 4:
                out.add(value)
    return out


def store_text(folder) -> bytes:
    return b"".join(p.read_bytes() for p in Path(folder).rglob("*") if p.is_file())


def by_sop(result):
    """Samples by the server's SOP Instance UID (the stored files carry replaced UIDs; the
    sample's entry names the instance as the server knows it)."""
    return {s.entry.rsplit("/", 1)[1]: s for s in result.index.samples}


def reconcile(result):
    c = result.index.counts()
    assert c["read"] == c["used"] + c["skipped"]
    assert result.listed == result.fetched + result.reused + result.skipped_instances
    return c


# ---------------------------------------------------------------------------------------


def test_pull_labels_patients_pixels_and_nothing_identifying_on_disk(creds, demo, tmp_path,
                                                                     caplog):
    caplog.set_level(logging.DEBUG)
    missing = "1.2.826.0.1.3680043.8.498.999999999"
    csv_path = labels_csv(tmp_path / "labels.csv", study_labels(demo) + [(missing, "no_tumor")])
    spec = make_spec(creds.dicomweb_url, tmp_path, labels=csv_path)
    result = pull(spec, brain_tumor_hierarchy())

    c = reconcile(result)
    assert (c["read"], c["used"], c["skipped"], c["samples"]) == (49, 48, 1, 48)
    assert (result.studies, result.listed, result.fetched, result.reused) == (16, 48, 48, 0)
    (skip,) = result.index.skipped
    assert skip.kind == "not_found" and missing in skip.reason and "study" in skip.reason
    got = by_sop(result)
    pseudonyms, new_study = {}, {}
    for f in demo:
        s = got[f["sop"]]
        assert s.label == f["label"]
        # patients and studies group as on the server, under keyed pseudonyms / UIDs
        assert pseudonyms.setdefault(f["patient"], s.patient_id) == s.patient_id
        original = pydicom.dcmread(f["path"])
        stored = pydicom.dcmread(s.path)
        np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)
        assert Path(s.path).name == hashlib.sha256(Path(s.path).read_bytes()).hexdigest() + ".dcm"
        for kw in ("PatientName", "AccessionNumber"):
            assert str(stored.get(kw, "")) == "", kw
        assert stored.PatientID == s.patient_id and stored.PatientIdentityRemoved == "YES"
        assert stored.StudyInstanceUID != f["study"]
        assert new_study.setdefault(f["study"], stored.StudyInstanceUID) == \
            stored.StudyInstanceUID
    assert len(set(pseudonyms.values())) == len(pseudonyms) == 16
    assert len(set(new_study.values())) == len(new_study) == 16

    secrets_ = identifiers(f["path"] for f in demo) | {creds.password}
    assert {"DEMO-0001", "ACC0001", "Demo^DEMO-0001"} <= secrets_
    blob = store_text(spec.store)
    logs = caplog.text + str(result.summary())
    for value in secrets_:
        assert value.encode() not in blob, f"{value!r} written to the store"
        assert value not in logs, f"{value!r} logged"
    for f in demo:  # UIDs are replaced (PS3.15 Basic Profile), in files and journal alike
        for uid in (f["study"], f["series"], f["sop"]):
            assert uid.encode() not in blob, f"{uid} written to the store"


def test_rerun_fetches_only_new_instances(creds, demo, tmp_path):
    first_half = study_labels(demo)[:8]
    with FaultProxy(creds) as proxy:
        spec = make_spec(proxy.dicomweb_url, tmp_path,
                         labels=labels_csv(tmp_path / "a.csv", first_half))
        one = pull(spec)
        assert (one.listed, one.fetched, one.reused) == (24, 24, 0)
        assert sum(proxy.requests.values()) == 24
        proxy.requests.clear()
        spec = make_spec(proxy.dicomweb_url, tmp_path,
                         labels=labels_csv(tmp_path / "b.csv", study_labels(demo)))
        two = pull(spec)
    assert (two.listed, two.fetched, two.reused) == (48, 24, 24)
    new = {f["sop"] for f in demo if (f["study"], f["label"]) not in first_half}
    assert set(proxy.requests) == new and set(proxy.requests.values()) == {1}
    paths_one = {s.id for s in one.index.samples}
    assert paths_one < {s.id for s in two.index.samples}
    reconcile(two)


def test_label_keys_series_and_accession_with_splits(creds, demo, tmp_path):
    series = sorted({(f["series"], f["label"], "train" if f["patient"] < "DEMO-0009" else "test")
                     for f in demo})
    spec = make_spec(creds.dicomweb_url, tmp_path, label_key="SeriesInstanceUID",
                     labels=labels_csv(tmp_path / "s.csv", series[:-1], "SeriesInstanceUID",
                                       split=True),
                     filters={"ModalitiesInStudy": "MR"})
    result = pull(spec)
    got = by_sop(result)
    dropped = series[-1][0]
    for f in demo:
        if f["series"] == dropped:
            assert f["sop"] not in got
            continue
        s = got[f["sop"]]
        assert s.label == f["label"] and s.split == ("train" if f["patient"] < "DEMO-0009"
                                                     else "test")
    kinds = {(s.kind, os.path.basename(s.path)) for s in result.index.skipped}
    assert ("no_label", dropped) in kinds  # one entry for the whole unlabelled series
    reconcile(result)

    acc = sorted({(f["accession"], f["label"]) for f in demo})
    spec = make_spec(creds.dicomweb_url, tmp_path, label_key="AccessionNumber",
                     labels=labels_csv(tmp_path / "acc.csv", acc, "AccessionNumber"),
                     filters={"ModalitiesInStudy": "MR"}, instance_filters={"Modality": "MR"})
    result = pull(spec)
    got = by_sop(result)
    assert set(got) == {f["sop"] for f in demo}
    assert all(got[f["sop"]].label == f["label"] for f in demo)
    # MR studies of the pydicom files have no accession in the CSV: one skip per study
    mr_extras = set()
    for name in EXTRAS:
        ds = pydicom.dcmread(dicom_file(name), stop_before_pixels=True, force=True)
        if ds.get("Modality") == "MR":
            mr_extras.add(ds.StudyInstanceUID)
    assert mr_extras
    assert {s.kind for s in result.index.skipped} == {"no_label"}
    assert {s.path.rsplit("studies/", 1)[1] for s in result.index.skipped} == mr_extras
    assert all("AccessionNumber" in s.reason for s in result.index.skipped)
    reconcile(result)


def test_filters_study_uids_and_a_study_the_server_lacks(creds, demo, tmp_path):
    ct = pydicom.dcmread(dicom_file("CT_small.dcm"), stop_before_pixels=True)
    spec = make_spec(creds.dicomweb_url, tmp_path, filters={"ModalitiesInStudy": "CT"})
    result = pull(spec)
    assert ct.SOPInstanceUID in by_sop(result)
    assert all(pydicom.dcmread(s.path, stop_before_pixels=True).Modality == "CT"
               for s in result.index.samples)
    assert not result.index.labelled  # no labels CSV: unlabelled samples

    lacking = "1.2.840.99999.1.2.3"
    spec = make_spec(creds.dicomweb_url, tmp_path, study_uids=[demo[0]["study"], lacking])
    result = pull(spec)
    assert result.studies == 1 and len(result.index.samples) == 3
    (skip,) = result.index.skipped
    assert skip.kind == "not_found" and lacking in skip.reason
    assert "study_uids" in skip.reason and skip.path.endswith(f"studies/{lacking}")
    with pytest.raises(StrictModeError, match=lacking):
        pull(spec, strict=True)


def test_instances_without_pixels_or_not_dicom_are_skipped_once(creds, tmp_path):
    studies = {}
    for name in EXTRAS:
        ds = pydicom.dcmread(dicom_file(name), stop_before_pixels=True, force=True)
        studies[name] = ds.StudyInstanceUID
    rows = [(uid, "no_tumor") for uid in sorted(set(studies.values()))]
    with FaultProxy(creds) as proxy:
        spec = make_spec(proxy.dicomweb_url, tmp_path, labels=labels_csv(tmp_path / "x.csv",
                                                                         rows))
        result = pull(spec, options=ImageOptions(frames="all"))
        c = reconcile(result)
        by_kind = {}
        for s in result.index.skipped:
            by_kind.setdefault(s.kind, []).append(s.reason)
        sop = {n: pydicom.dcmread(dicom_file(n), stop_before_pixels=True, force=True
                                  ).SOPInstanceUID for n in EXTRAS}
        for name, want in EXTRAS.items():
            if want == "image":
                continue
            assert any(sop[name] in r for r in by_kind.get(want, [])), (name, by_kind)
        assert "no pixel data" in by_kind["no_pixel_data"][0]
        # the 10-frame MR is 10 samples of one stored object
        emri = pydicom.dcmread(dicom_file("emri_small.dcm"), stop_before_pixels=True)
        frames = [s for s in result.index.samples if s.entry.endswith(emri.SOPInstanceUID)]
        assert sorted(s.frame for s in frames) == list(range(10))
        assert c["used"] == 4 and c["samples"] == 3 + 10
        first_requests = dict(proxy.requests)
        proxy.requests.clear()
        again = pull(spec, options=ImageOptions(frames="all"))
    # what cannot change by asking again is remembered; nothing is fetched twice
    assert proxy.requests == {} and again.fetched == 0
    assert {s.kind for s in again.index.skipped} == {s.kind for s in result.index.skipped}
    assert len(first_requests) == len(EXTRAS)


def test_truncated_transfer_is_retried_then_skipped_and_resumed(creds, demo, tmp_path):
    victim = demo[4]
    rows = [(victim["study"], victim["label"])]
    csv_path = labels_csv(tmp_path / "t.csv", rows)
    with FaultProxy(creds, truncate={victim["sop"]}) as proxy:
        spec = make_spec(proxy.dicomweb_url, tmp_path, labels=csv_path, retries=2)
        result = pull(spec)
        assert proxy.requests[victim["sop"]] == 3  # first try + 2 retries, all cut short
    (skip,) = result.index.skipped
    assert skip.kind == "truncated_transfer"
    assert victim["sop"] in skip.reason and victim["study"] in skip.reason
    assert len(result.index.samples) == 2 and result.fetched == 2
    reconcile(result)
    assert len(list(Path(spec.store, "objects").rglob("*.dcm"))) == 2  # nothing partial
    assert not list(Path(spec.store).rglob("*.tmp"))

    with FaultProxy(creds, truncate={victim["sop"]}, truncate_times=1) as proxy:
        spec = make_spec(proxy.dicomweb_url, tmp_path, labels=csv_path, retries=2)
        healed = pull(spec)
        assert proxy.requests == {victim["sop"]: 2}  # cut once, retried, only that one
    assert not healed.index.skipped and healed.fetched == 1 and healed.reused == 2
    stored = pydicom.dcmread(by_sop(healed)[victim["sop"]].path)
    np.testing.assert_array_equal(stored.pixel_array,
                                  pydicom.dcmread(victim["path"]).pixel_array)


def test_server_down_wrong_credentials_and_missing_variables(creds, tmp_path, monkeypatch):
    port = free_port()
    down = make_spec(f"http://127.0.0.1:{port}/dicom-web", tmp_path)
    with pytest.raises(DicomWebConnectionError, match=f"127.0.0.1:{port}") as err:
        pull(down)
    assert "searching for studies" in str(err.value) and "running" in str(err.value)

    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    with pytest.raises(DicomWebAuthError) as err:
        pull(make_spec(creds.dicomweb_url, tmp_path))
    text = str(err.value)
    assert "401" in text and USER_ENV in text and PASSWORD_ENV in text
    assert "not-the-password" not in text and creds.password not in text

    with pytest.raises(DicomWebAuthError, match="none are configured"):
        pull(make_spec(creds.dicomweb_url, tmp_path, username_env=None, password_env=None))

    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ConfigError, match=PASSWORD_ENV):
        pull(make_spec(creds.dicomweb_url, tmp_path))


def test_bearer_token_from_the_environment(creds, demo, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    token = "tok-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    csv_path = labels_csv(tmp_path / "b.csv", study_labels(demo)[:1])
    with FaultProxy(creds, bearer=token) as proxy:
        spec = make_spec(proxy.dicomweb_url, tmp_path, username_env=None, password_env=None,
                         token_env=TOKEN_ENV, labels=csv_path)
        monkeypatch.setenv(TOKEN_ENV, token)
        assert len(pull(spec).index.samples) == 3
        monkeypatch.setenv(TOKEN_ENV, token[::-1])
        with pytest.raises(DicomWebAuthError, match=f"\\${TOKEN_ENV}") as err:
            pull(spec)
    assert token not in str(err.value) and token not in caplog.text
    assert token[::-1] not in str(err.value)


@pytest.mark.slow
def test_tls_ca_bundle_verify_and_client_certificate(creds, demo, tmp_path):
    """HTTPS with a private CA and a required client certificate, in front of Orthanc."""
    from orthanc_server import make_tls_files

    tls = make_tls_files(tmp_path / "tls")
    one_study = labels_csv(tmp_path / "tls.csv", study_labels(demo)[:1])
    client = {"client_cert": tls["client_cert"], "client_key": tls["client_key"],
              "labels": one_study}
    with FaultProxy(creds, tls=tls, client_ca=True) as proxy:
        url = proxy.dicomweb_url
        assert url.startswith("https://")
        ok = pull(make_spec(url, tmp_path / "a", ca_bundle=tls["ca"], **client))
        assert len(ok.index.samples) == 3 and ok.fetched == 3

        with pytest.raises(DicomWebTLSError, match="ca_bundle") as err:
            pull(make_spec(url, tmp_path / "b", **client))
        assert "certificate verify failed" in str(err.value).lower()
        assert url.split("/dicom-web")[0] in str(err.value)

        insecure = pull(make_spec(url, tmp_path / "c", verify_tls=False, **client))
        assert len(insecure.index.samples) == 3

        with pytest.raises((DicomWebTLSError, DicomWebConnectionError)) as err:
            pull(make_spec(url, tmp_path / "d", ca_bundle=tls["ca"], labels=one_study))
        assert url.split("/dicom-web")[0] in str(err.value)
        assert "client_cert" in str(err.value) or "did not answer" in str(err.value)


@pytest.mark.slow
def test_server_killed_mid_pull_then_resumed_loses_nothing(orthanc_installed, demo, tmp_path,
                                                            monkeypatch):
    csv_path = labels_csv(tmp_path / "k.csv", study_labels(demo))
    server = Orthanc(tmp_path / "dying")
    with server:
        server.upload_many([f["path"] for f in demo])
        monkeypatch.setenv(USER_ENV, server.user)
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        spec = make_spec(server.dicomweb_url, tmp_path, labels=csv_path, workers=2)

        def kill_at_12(done, total):
            if done == 12:
                server.kill()

        with pytest.raises(DicomWebConnectionError) as err:
            pull(spec, on_progress=kill_at_12)
        text = str(err.value)
        assert "instance" in text and "of 48 instances are in the store" in text
        assert "run the pull again to resume" in text and err.value.instance in text
        stored = len(list(Path(spec.store, "objects").rglob("*.dcm")))
        assert 12 <= stored < 48
        assert not list(Path(spec.store).rglob("*.tmp"))

        server.start()  # same port, same storage
        resumed = pull(spec)
    assert resumed.fetched == 48 - stored and resumed.reused == stored
    reconcile(resumed)
    # nothing lost: every instance stored, pixels equal to the files uploaded
    got = by_sop(resumed)
    assert set(got) == {f["sop"] for f in demo}
    for f in demo:
        np.testing.assert_array_equal(pydicom.dcmread(got[f["sop"]].path).pixel_array,
                                      pydicom.dcmread(f["path"]).pixel_array)


@pytest.mark.slow
def test_study_deleted_during_the_pull_is_a_404_skip(orthanc_installed, demo, tmp_path,
                                                     monkeypatch):
    csv_path = labels_csv(tmp_path / "d.csv", study_labels(demo))
    with Orthanc(tmp_path / "deleting") as server:
        server.upload_many([f["path"] for f in demo])
        monkeypatch.setenv(USER_ENV, server.user)
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        spec = make_spec(server.dicomweb_url, tmp_path, labels=csv_path, workers=1)
        last = sorted({f["study"] for f in demo})[-1]

        def delete_last(done, total):
            if done == 1:
                server.delete_study(last)

        result = pull(spec, on_progress=delete_last)
    c = reconcile(result)
    assert c["used"] == 45 and c["skipped"] == 3
    assert {s.kind for s in result.index.skipped} == {"not_found"}
    gone = {f["sop"] for f in demo if f["study"] == last}
    for s in result.index.skipped:
        assert "404" in s.reason and last in s.reason
        assert any(sop in s.reason for sop in gone)


def test_a_capped_instance_listing_is_reported_not_silent(orthanc_installed, demo, tmp_path,
                                                          monkeypatch):
    """Orthanc's LimitFindInstances cuts QIDO answers short without a Warning header, and
    its paging cannot reach past the cap: the pull pages as far as the server lets it,
    then reports each study whose listing fell short of NumberOfStudyRelatedInstances."""
    with Orthanc(tmp_path / "capped", extra_config={"LimitFindInstances": 1}) as server:
        server.upload_many([f["path"] for f in demo[:6]])  # 2 studies of 3 instances
        monkeypatch.setenv(USER_ENV, server.user)
        monkeypatch.setenv(PASSWORD_ENV, server.password)
        result = pull(make_spec(server.dicomweb_url, tmp_path))
    c = reconcile(result)
    studies = sorted({f["study"] for f in demo[:6]})
    incomplete = [s for s in result.index.skipped if s.kind == "incomplete_listing"]
    assert sorted(s.path.rsplit("studies/", 1)[1] for s in incomplete) == studies
    assert all("of its 3 instances" in s.reason and "LimitFindInstances" in s.reason
               for s in incomplete)
    assert 0 < result.listed < 6 and c["used"] == result.listed


@pytest.mark.slow
def test_train_a_short_pipeline_from_the_server(creds, demo, tmp_path):
    """Pull -> patient-grouped split (PatientID in memory) -> cache -> tf.data -> fit."""
    import keras

    from kmedtl.data.cache import build_cache
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.splits import check_no_leak, holdout, leakage_groups

    hierarchy = brain_tumor_hierarchy()
    options = ImageOptions(size=32)
    spec = make_spec(creds.dicomweb_url, tmp_path,
                     labels=labels_csv(tmp_path / "l.csv", study_labels(demo)))
    result = pull(spec, hierarchy, options)
    samples = result.index.samples
    ids = [s.id for s in samples]
    groups = leakage_groups(ids, patients={s.id: s.patient_id for s in samples})
    splits = holdout(ids, [s.label for s in samples], groups, val=0.25, test=0.25)
    assert check_no_leak(splits, dict(zip(ids, groups))) == []
    assert len(set(groups)) == 16  # 16 synthetic patients, 3 images each
    cache = build_cache(result.index, options, tmp_path / "cache", workers=1, progress=False)
    assert not cache.skipped and cache.decoded == 48
    by_id = {s.id: s for s in samples}
    train = [by_id[i] for i in splits.folds[0].train]
    ds = make_dataset(train, hierarchy, options, cache=cache, batch_size=8, training=True,
                      normalization="unit")
    images, targets = next(iter(ds))
    n_out = targets.shape[-1] if len(targets.shape) > 1 else int(max(4, np.max(targets) + 1))
    model = keras.Sequential([keras.Input(options.shape), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(n_out, activation="softmax")])
    loss = ("categorical_crossentropy" if len(targets.shape) > 1
            else "sparse_categorical_crossentropy")
    model.compile("adam", loss)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert images.shape[1:] == options.shape


def test_spec_refuses_secrets_and_names_fields(tmp_path):
    base = {"url": "https://pacs.example/dicom-web", "store": "s"}
    with pytest.raises(ConfigError, match="must not be in the config file"):
        DicomWebSpec.from_dict({**base, "password": "hunter2"})
    with pytest.raises(ConfigError, match="must not carry credentials") as err:
        DicomWebSpec(url="https://bob:hunter2@pacs.example/dicom-web", store="s")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown field"):
        DicomWebSpec.from_dict({**base, "studies": ["1.2"]})
    with pytest.raises(ConfigError, match="must name an environment variable"):
        DicomWebSpec(**base, username_env="bob smith", password_env="P")
    with pytest.raises(ConfigError, match="label_key"):
        DicomWebSpec(**base, label_key="PatientID")
    with pytest.raises(ConfigError, match="go together"):
        DicomWebSpec(**base, username_env="U")
    spec = DicomWebSpec.from_dict({**base, "labels": "l.csv", "ca_bundle": "ca.pem"},
                                  base_dir=tmp_path)
    assert spec.labels == str(tmp_path / "l.csv") and spec.store == str(tmp_path / "s")
    assert set(IDENTITY_KEYWORDS) >= {"PatientID", "PatientName", "PatientBirthDate"}

    bad = tmp_path / "bad.csv"
    bad.write_text("StudyInstanceUID,label\n1.2.3,glioma_tumor\n1.2.3,no_tumor\n")
    with pytest.raises(ManifestError, match="bad.csv:3.*already labelled"):
        read_labels(bad, "StudyInstanceUID")
    with pytest.raises(ManifestError, match="missing column"):
        read_labels(bad, "SeriesInstanceUID")


@pytest.mark.slow
def test_kmedtl_run_trains_and_evaluates_from_the_server(creds, demo, tmp_path, monkeypatch):
    """`data.source: dicomweb` through the config, the audit/split stages and `kmedtl run`
    (credentials from the environment only), with the shipped Lite0 backbone.  The run
    queries the server once: one pull, and no study search after it."""
    import yaml
    from dicomweb_client import DICOMwebClient

    import kmedtl.data.prepare as prepare_mod
    from kmedtl.pipeline import run_pipeline

    calls = {"pull": 0, "qido": 0, "qido_in_first_pull": None}
    real_pull, real_search = prepare_mod.pull, DICOMwebClient.search_for_studies

    def counting_pull(*args, **kwargs):
        calls["pull"] += 1
        out = real_pull(*args, **kwargs)
        if calls["qido_in_first_pull"] is None:
            calls["qido_in_first_pull"] = calls["qido"]
        return out

    def counting_search(self, *args, **kwargs):
        calls["qido"] += 1
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "pull", counting_pull)
    monkeypatch.setattr(DICOMwebClient, "search_for_studies", counting_search)

    labels = labels_csv(tmp_path / "labels.csv", study_labels(demo))
    cfg = {
        "name": "from_pacs",
        "data": {"source": "dicomweb",
                 "dicomweb": {"url": creds.dicomweb_url, "store": "store",
                              "labels": os.path.basename(labels),
                              "username_env": USER_ENV, "password_env": PASSWORD_ENV},
                 "hierarchy": {"normal": ["no_tumor"],
                               "tumor": {"glioma": ["glioma_tumor"],
                                         "meningioma": ["meningioma_tumor"],
                                         "pituitary": ["pituitary_tumor"]}},
                 "image": {"size": 32, "channels": 1}, "cache_dir": str(tmp_path / "cache"),
                 "workers": 1},
        "split": {"method": "holdout", "val": 0.25, "test": 0.25, "dedupe": "near"},
        "train": {"backbone": "efficientnet_lite0", "weights": "imagenet",
                  "strategy": "fine_tune", "epochs": 2, "batch_size": 8, "verbose": 0,
                  "tensorboard": False},
        "output_dir": str(tmp_path / "runs"),
        "pipeline": {"stages": ["audit", "split", "train", "evaluate"],
                     "evaluate": {"n_boot": 20, "n_gradcam": 0, "n_examples": 0}},
    }
    path = tmp_path / "pacs.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = run_pipeline(path)
    assert res.ran == ["audit", "split", "train", "evaluate"]
    assert calls["pull"] == 1, calls  # the data index is built once per run
    assert calls["qido"] == calls["qido_in_first_pull"] >= 1, calls
    s = res.summary
    assert s["data"]["counts"]["used"] == 48 and s["data"]["counts"]["skipped"] == 0
    assert s["split"]["cross_split"]["patients"] == 0 and s["split"]["patients"] == 16
    run = res.run_dir
    assert run == tmp_path / "runs" / "from_pacs"
    assert (run / "metrics.json").is_file() and (run / "predictions.csv").is_file()
    written = b"".join(p.read_bytes() for p in run.rglob("*")
                       if p.is_file() and p.suffix in (".json", ".yaml", ".md", ".csv"))
    assert creds.password.encode() not in written
