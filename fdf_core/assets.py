"""Where local weights and sample assets come from.

Nothing here downloads: these machines (and many cluster nodes) have no internet. Every model
loader resolves its file through :func:`resolve_file` so that a flag, an environment variable and
the shared asset folder are tried in one fixed order, and a missing file is reported with all three.
"""
from __future__ import annotations

import os
from pathlib import Path

from fdf_core.errors import MissingAssetError

__all__ = ["MissingAssetError", "assets_dir", "cache_dir", "resolve_file"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    """`$FDF_ASSETS`, else `../shared/assets` beside the checkout."""
    env = os.environ.get("FDF_ASSETS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "assets"


def resolve_file(explicit: str | os.PathLike | None, env_var: str, default_rel: str | None,
                 what: str, flag: str) -> Path:
    """Return the first existing file of: the flag's value, `$env_var`, `assets_dir()/default_rel`.

    Raises :class:`MissingAssetError` naming the flag, the variable and every path tried.
    """
    tried = []
    candidates = []
    if explicit:
        candidates.append(("flag " + flag, Path(explicit)))
    if os.environ.get(env_var):
        candidates.append(("$" + env_var, Path(os.environ[env_var])))
    if default_rel:
        candidates.append(("assets dir", assets_dir() / default_rel))
    for origin, path in candidates:
        path = path.expanduser()
        if path.is_file():
            return path
        tried.append(f"{origin}: {path}")
        if origin.startswith("flag"):
            break  # an explicit path that does not exist is an error, not a hint to look elsewhere
    raise MissingAssetError(
        f"{what} not found. Give it with {flag} PATH or the environment variable {env_var}"
        + (f" (or put it at $FDF_ASSETS/{default_rel})" if default_rel else "")
        + ". Tried: " + ("; ".join(tried) if tried else "nothing was given"))


def cache_dir() -> Path:
    """`$FDF_CACHE_DIR`, else `$XDG_CACHE_HOME/fdf`, else `~/.cache/fdf`: files derived from local
    weights that are slow to make and safe to delete (the detector's ONNX export)."""
    if os.environ.get("FDF_CACHE_DIR"):
        return Path(os.environ["FDF_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fdf"
