"""Sealing staged artifact sets (artifact, manifest, golden vectors, reference) for publishing.

Called by the pipeline under the folder lock, right before the atomic publish: the reference is
shared with the sets already published under the same name, each manifest is written (the only
time it is), then each set is signed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from export.publish import sha256_path
from export.runtime import signing
from export.runtime.manifest import write_manifest
from export.runtime.schema import check_manifest_schema

log = logging.getLogger("export")


def kept_reference(output_dir: str, reference_name: str, rebuilt: set[str]) -> str | None:
    """The sha256 of the published reference to keep, or None to publish the new one.

    Keras stamps the save time into a `.keras`, so the same weights saved twice differ in bytes.
    A published reference that a set not rebuilt here records (reference_sha256) stays: replacing
    it would fail that set's verification. The same-name guard has already checked that those
    sets share this export's golden vectors, i.e. its weights.
    """
    path = os.path.join(output_dir, reference_name)
    if not os.path.isfile(path):
        return None
    recorded = set()
    for entry in os.listdir(output_dir):
        if not entry.endswith(".json") or entry in rebuilt or entry.startswith("."):
            continue
        try:
            with open(os.path.join(output_dir, entry), encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("reference") == reference_name:
                recorded.add(str(manifest.get("reference_sha256")))
        except (OSError, ValueError, AttributeError):
            continue  # not one of ours, or damaged: export.runtime.verify reports those
    digest = sha256_path(path)
    return digest if digest in recorded else None


def seal(stage: str, output_dir: str, manifests: dict[str, dict], *,
         sign_key: str | None = None) -> list[str]:
    """Write each staged set's manifest, once and final, then sign each set; the signature names.

    Called under the folder lock, right before the publish: a reference that published sets
    still record is kept (its sha256 goes into the new manifests), every manifest is checked
    against the schema and written into `stage`, and only then is anything signed, so a signature
    covers the manifest's final bytes.

    Args:
        stage: the staging folder. output_dir: where the sets are published.
        manifests: manifest name -> its finished manifest (every report in: deployment, ARM).
        sign_key: a PEM elliptic-curve private key, or None.
    """
    signer = signing.load_signer(sign_key) if sign_key else None  # a bad key: before any write
    rebuilt = set(manifests)
    for reference_name in sorted({m["reference"] for m in manifests.values()}):
        kept = kept_reference(output_dir, reference_name, rebuilt)
        if kept is None:
            continue
        # Publish the same bytes again (a no-op rename) and record them in the new manifests.
        shutil.copyfile(os.path.join(output_dir, reference_name), os.path.join(stage, reference_name))
        for manifest in manifests.values():
            if manifest["reference"] == reference_name:
                manifest["reference_sha256"] = kept
        log.debug("keep     the published %s (sha256 %s...)", reference_name, kept[:12])
    for name, manifest in manifests.items():
        check_manifest_schema(manifest)  # what every verifier holds it to (manifest.schema.json)
        write_manifest(os.path.join(stage, name), manifest)
    if signer is None:
        return []
    names = []
    for name, manifest in manifests.items():
        path = signing.sign_set(signer, stage, name, manifest)
        names.append(os.path.basename(path))
    log.info("sign     %d set(s) with %s", len(names), os.path.basename(sign_key))
    return names
