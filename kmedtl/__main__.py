"""``python -m kmedtl``: the same as the ``kmedtl`` command."""

from kmedtl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
