"""``kmedtl weights list`` and ``kmedtl weights import FILE --for BACKBONE``.

The CLI owner wires it in with::

    from kmedtl.pretrained.cli import add_parsers as add_weights_parsers
    add_weights_parsers(sub)   # sub = parser.add_subparsers(...)

Nothing here imports TensorFlow or Keras until a command needs it.
"""

from __future__ import annotations


def cmd_list(args) -> int:
    # lazy: the catalog builds Keras models; keeps `kmedtl weights --help` free of Keras
    from kmedtl.pretrained.catalog import format_table, list_sources

    print(format_table(list_sources()))
    return 0


def cmd_import(args) -> int:
    # lazy: the catalog builds Keras models; keeps `kmedtl weights --help` free of Keras
    from kmedtl.pretrained.catalog import import_weights

    rec = import_weights(args.file, args.family)
    print(f"imported {rec['file']} for {rec['family']} (sha256 {rec['sha256'][:12]}...) "
          f"-> {rec['path']}")
    print(f"`weights: imagenet` on {rec['family']} now loads it offline")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``weights`` on an ``add_subparsers()`` object."""
    w = subparsers.add_parser("weights", help="pretrained weights: list sources, import files")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    ls = wsub.add_parser("list", help="each known weight source: installed, cached or missing")
    ls.set_defaults(func=cmd_list)
    im = wsub.add_parser("import", help="register a weights file downloaded elsewhere")
    im.add_argument("file", help="e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    im.add_argument("--for", dest="family", required=True, help="backbone family, e.g. resnet50")
    im.set_defaults(func=cmd_import)
