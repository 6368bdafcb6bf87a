"""fusionlab-learn's own files through the builder (docs/fusionlab.md)."""
