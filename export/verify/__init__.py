"""`python -m export.verify`: an alias of export.runtime.verify (the runtime half's verifier).

The Python API lives in export.runtime.verify; its public names are re-exported here so that
`from export.verify import verify_path` keeps working.
"""

from export.runtime.verify import (
    ASCII_MARKS,
    MANIFEST_SUFFIXES,
    MARKS,
    RuntimeNotRun,
    VerifyResult,
    find_manifests,
    outputs_digest,
    verify_manifest,
    verify_path,
)

__all__ = ["ASCII_MARKS", "MARKS", "MANIFEST_SUFFIXES", "RuntimeNotRun", "VerifyResult",
           "find_manifests", "outputs_digest", "verify_manifest", "verify_path"]
