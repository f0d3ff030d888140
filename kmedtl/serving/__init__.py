"""kmedtl.serving: client side of a model served by TF Serving (REST and gRPC).

- :func:`load_pixels` -- files (PNG/JPEG/DICOM) -> the exact model pixels of training
  (DICOM decoding, rescale, windowing, MONOCHROME1 all happen here: TF Serving has no DICOM
  op, and the windowing options belong to the run, so DICOM is sent as pixels to the
  ``predict_pixels`` signature; PNG/JPEG go as encoded bytes to ``serving_default``);
- :func:`rest_request` / :func:`grpc_request` -- the request bodies TF Serving documents;
- :class:`ServingClient` -- sends them (``http://`` -> REST, ``grpc://`` -> gRPC) and
  returns the named outputs as NumPy arrays.

Example::

    >>> c = ServingClient("http://localhost:8501/v1/models/brain_tumor")  # doctest: +SKIP
    >>> c.predict_files(["slice.jpg"])["label"]                            # doctest: +SKIP
"""

from kmedtl.serving.client import (
    ServingClient,
    grpc_request,
    load_pixels,
    parse_grpc_response,
    parse_rest_response,
    parse_server_url,
    rest_request,
)

__all__ = [
    "ServingClient",
    "grpc_request",
    "load_pixels",
    "parse_grpc_response",
    "parse_rest_response",
    "parse_server_url",
    "rest_request",
]
