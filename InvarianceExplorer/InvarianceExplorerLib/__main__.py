"""``python -m InvarianceExplorerLib``: the same CLI as ``invariance-explorer``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
