"""Where downloads and caches live: the user's cache folder, never the work tree.

`$XATTN_CACHE_DIR` when set, else `$XDG_CACHE_HOME/xattn` (the XDG base directory rule: an
absolute `XDG_CACHE_HOME` only), else `~/.cache/xattn`. The ARM root file system (which holds
absolute symlinks into the host: a copy of a checkout that follows links once grew to 59 GB), the
aarch64 wheels and the runtime-only test venv go there. Standard library only: both halves use it.
"""

from __future__ import annotations

import os

ENV = "XATTN_CACHE_DIR"


def cache_root() -> str:
    """The folder every xattn cache lives under (not created here)."""
    explicit = os.environ.get(ENV, "").strip()
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xattn")


def cache_dir(*parts: str) -> str:
    """`cache_root()/<parts...>`: the folder of one cache (`cache_dir("arm")`), not created here."""
    return os.path.join(cache_root(), *parts)
