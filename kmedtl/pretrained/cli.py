"""``kmedtl weights list`` and ``kmedtl weights import FILE --for BACKBONE``.

The CLI owner wires it in with::

    from kmedtl.pretrained.cli import add_parsers as add_weights_parsers
    add_weights_parsers(sub)   # sub = parser.add_subparsers(...)

``weights list`` and the argument checks of ``weights import`` import neither TensorFlow
nor Keras (:mod:`kmedtl.pretrained.sources`).  Only proving that an imported file fits
its family starts TensorFlow (it builds the family's network), with TensorFlow's native
start-up lines filtered out (:mod:`kmedtl._quiet`; ``--verbose`` keeps them).
"""

from __future__ import annotations

from kmedtl._quiet import native_output_filtered
from kmedtl.pretrained.sources import check_import, format_table, list_sources


def cmd_list(args) -> int:
    print(format_table(list_sources()))
    return 0


def cmd_import(args) -> int:
    check_import(args.file, args.family)  # a wrong file name fails here, before TensorFlow
    with native_output_filtered():  # TensorFlow's start-up lines (not with --verbose)
        # Checking the file builds the family's Keras network (TensorFlow starts).
        # lazy: builds the family's Keras network; keeps `kmedtl weights list` Keras-free
        from kmedtl.models.catalog import import_weights

        rec = import_weights(args.file, args.family)
    print(f"imported {rec['file']} for {rec['family']} (sha256 {rec['sha256'][:12]}...) "
          f"-> {rec['path']}")
    print(f"`weights: imagenet` on {rec['family']} now loads it offline")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``weights`` on an ``add_subparsers()`` object."""
    w = subparsers.add_parser("weights", help="pretrained weights: list sources, import files")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    ls = wsub.add_parser("list", help="each known weight source: installed, cached or missing "
                                      "(needs neither TensorFlow nor Keras)")
    ls.set_defaults(func=cmd_list)
    im = wsub.add_parser(
        "import", help="register a weights file downloaded elsewhere (loads it into the "
                       "family's network to check it: starts TensorFlow, a few seconds)",
        description="Copy FILE into kmedtl's weights cache as BACKBONE's ImageNet weights. "
                    "The file's name is checked first; then the file is loaded into the "
                    "family's Keras network (an EfficientNet-Lite checkpoint is converted), "
                    "which starts TensorFlow and takes a few seconds.")
    im.add_argument("file", help="e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    im.add_argument("--for", dest="family", required=True, help="backbone family, e.g. resnet50")
    im.set_defaults(func=cmd_import)
