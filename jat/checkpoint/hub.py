"""Checkpoints on the Hugging Face Hub: `hf://org/name[@revision]` (or a bare `org/name` that is not a
local path) names a model repository holding an inference folder (`jat.checkpoint.export`); it is
downloaded once into the Hub cache (huggingface_hub's `snapshot_download`, which honours HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE) and loaded like a local checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from jat.checkpoint.store import CheckpointError

PREFIX = "hf://"
FILES = ["weights.safetensors", "*.json", "*.md"]  # what an inference folder holds


def is_hub_name(name: str | Path) -> bool:
    """hf://org/name, or org/name with no such local path."""
    text = str(name)
    if text.startswith(PREFIX):
        return True
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).exists() and not text.startswith((".", "~"))


def resolve(name: str | Path) -> Path:
    """A local checkpoint path as given, or the local snapshot of a Hub repository (downloaded if needed)."""
    if not is_hub_name(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = str(name).removeprefix(PREFIX).partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=FILES))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"{name}: not in the local Hub cache and the Hub cannot be reached "
                              f"(HF_HUB_OFFLINE or no network): {exc}") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{name}: cannot download it from the Hub ({exc})") from None
