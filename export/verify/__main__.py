"""`python -m export.verify PATH`: check published artifacts against their manifests."""

from export.reporting import exit_with
from export.runtime.verify.cli import main

if __name__ == "__main__":
    exit_with(main())
