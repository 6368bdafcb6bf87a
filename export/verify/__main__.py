"""`python -m export.verify PATH`: check published artifacts against their manifests."""

import sys

from export.runtime.verify.cli import main

if __name__ == "__main__":
    sys.exit(main())
