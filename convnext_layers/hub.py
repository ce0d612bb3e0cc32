"""The Hugging Face Hub as this project reaches it: offline mode, reachability, cache.

No Keras; shared by `convnext_layers.presets` and `weights_convert.checkpoint`, which
download through `hub_download`.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import huggingface_hub

_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> str | None:
    """The Hub cache folder the environment names (HF_HUB_CACHE, HF_HOME/hub), or None
    for huggingface_hub's default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.environ[variable]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (False under HF_HUB_OFFLINE).

    Asked once before a download, so that with no network the Hub cache is
    used at once instead of after huggingface_hub's ~20 s of retries.
    """
    if hub_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_download(repo_id: str, filename: str, revision: str | None, offline: bool) -> str:
    """The local path of `filename` of `repo_id` at `revision`, downloaded into the
    environment's cache (`hub_cache_dir`) or, `offline`, taken from it; huggingface_hub's
    `EntryNotFoundError` / `LocalEntryNotFoundError` for the caller to explain."""
    return huggingface_hub.hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        cache_dir=hub_cache_dir(),
        local_files_only=offline,
        library_name="keras-convnext",
    )
