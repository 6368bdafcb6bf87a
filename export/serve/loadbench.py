"""`python -m export.serve.loadbench`: an alias of export.runtime.serve.loadbench (the serving load
benchmark, also `python -m export.bench serve`)."""

from export.reporting import exit_with
from export.runtime.serve.loadbench import main

if __name__ == "__main__":
    exit_with(main())
