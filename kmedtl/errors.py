"""Every exception kmedtl raises on purpose.

Each message names the file or config field at fault and says what to do about it, e.g.::

    DicomDecodeError: scan_017.dcm: transfer syntax JPEG 2000 needs pylibjpeg-openjpeg:
    pip install pylibjpeg-openjpeg

``DataError`` subclasses carry a short machine-readable ``kind`` (``"zero_byte"``,
``"codec_missing"`` ...) so dataset passes can skip the file, record why, and reconcile
counts (read = used + skipped).  Messages never contain patient identifiers.
"""

from __future__ import annotations

from kmedtl._text import printable


class KmedtlError(Exception):
    """Base class of every kmedtl error."""


class ConfigError(KmedtlError, ValueError):
    """A config file or argument is invalid; the message names the field and allowed values."""


class HierarchyError(KmedtlError, ValueError):
    """A label tree is malformed, or a label is not in it."""


class BackendUnavailableError(KmedtlError, ImportError):
    """An optional backend (e.g. tensorflow-io) cannot be used in this environment."""


class DatasetNotFoundError(KmedtlError, FileNotFoundError):
    """A dataset folder (usually under ``$KMEDTL_DATASETS``) is missing."""


class DataError(KmedtlError):
    """One input file (or manifest row) cannot be used.

    ``path`` is the file, ``kind`` a short reason code and ``reason`` the human-readable
    explanation (which also says how to fix it where there is a fix).
    """

    kind = "data_error"

    def __init__(self, path, reason: str, kind: str | None = None):
        self.path = str(path)
        self.reason = reason
        if kind is not None:
            self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.path, self.reason, self.kind))


class DecodeError(DataError):
    """An image file could not be decoded."""

    kind = "decode_error"


class DicomDecodeError(DecodeError):
    """A DICOM file could not be decoded into an image."""

    kind = "dicom_error"


class ImageTooLargeError(DecodeError):
    """The header announces dimensions beyond the configured limit; refused before allocating."""

    kind = "too_large"


class LabelError(DataError):
    """A sample's label is missing or not part of the hierarchy."""

    kind = "unknown_label"


class ManifestError(KmedtlError, ValueError):
    """A CSV manifest is malformed as a whole (missing column, unreadable file)."""


class StrictModeError(KmedtlError):
    """Raised in strict mode when a dataset pass would have skipped files."""

    def __init__(self, skipped):
        self.skipped = list(skipped)
        # names from the data: escaped, so each skip stays one line
        lines = [f"  {printable(s.path)}: {printable(s.reason)}" for s in self.skipped[:20]]
        more = len(self.skipped) - len(lines)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"strict mode: {len(self.skipped)} file(s) could not be used "
            f"(set data.strict: false to skip them and report why):\n" + "\n".join(lines) + tail
        )


class ModelError(KmedtlError, ValueError):
    """A model cannot be built or loaded as asked (unknown backbone family or cut point,
    incompatible weight file, ...); the message names the argument and the allowed values."""


class WeightsError(ModelError):
    """Pretrained weights cannot be found, read or trusted.

    The message names the file (or the file Keras wanted), where kmedtl looks for it, and
    the command that fixes it (``kmedtl weights import FILE --for BACKBONE``).
    """


class UntrustedModelError(KmedtlError):
    """A model file would run code kmedtl does not trust (a file, process, network or
    Python op in a SavedModel, a custom or Flex op in a TFLite file, a custom ONNX domain,
    a Keras ``Lambda`` with bytecode).  Refused before anything is loaded (exit 2); the
    message names the op and the file, and ``--trust-model`` overrides it."""


class ModelFileError(KmedtlError):
    """A model file is broken (cannot be parsed or loaded) or does not match its metadata
    (``kmedtl.json``/``export.json`` from another export: digest, leaf count or leaf order).
    ``kmedtl`` exits 3.  Not :class:`ModelError`, which is an argument error (exit 2)."""


class DicomWebError(KmedtlError):
    """A DICOMweb server cannot be used as a whole (down, rejecting the credentials, TLS
    failing); the message names the server (never the credentials), the study or instance
    being handled and what to do.  Per-instance problems are skips, not errors."""

    def __init__(self, message: str, *, url: str | None = None, study: str | None = None,
                 instance: str | None = None):
        self.url, self.study, self.instance = url, study, instance
        super().__init__(message)

    def __reduce__(self):
        return (_rebuild_dicomweb_error, (type(self), str(self), self.__dict__))


def _rebuild_dicomweb_error(cls, message, state):
    err = cls.__new__(cls)
    KmedtlError.__init__(err, message)
    err.__dict__.update(state)
    return err


class DicomWebConnectionError(DicomWebError, ConnectionError):
    """The server cannot be reached, or stopped answering during a pull (resumable)."""


class DicomWebAuthError(DicomWebError, PermissionError):
    """The server rejected the request's credentials (HTTP 401 / 403)."""


class DicomWebTLSError(DicomWebError, ConnectionError):
    """The TLS handshake failed (unknown CA, wrong host name, client certificate needed)."""


class ServingError(KmedtlError):
    """A prediction request cannot be built, sent or answered (client side).

    Defined here, below both ``kmedtl.serving`` and ``kmedtl.export`` (which re-exports
    it), so that neither package has to import the other's face to raise it.
    """
