"""Per-user folders that do not depend on the working directory."""

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """llmtrain's cache folder: $LLMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/llmtrain, else
    ~/.cache/llmtrain. The same precedence builds the default tokenized-data cache in
    conf/data/shakespeare.yaml (`<cache>/data`), so every run of a user finds the same files
    whatever folder it is started from."""
    if explicit := os.environ.get("LLMTRAIN_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmtrain"


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status; elsewhere set and
    restore, which is momentary)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file written by a library that creates it 0600 (safetensors' save_file goes through a
    private temp file) the mode a plain open() would give it: 0666 minus the umask, so an exported
    model is as readable by the group/others as the config.json beside it."""
    os.chmod(path, 0o666 & ~current_umask())
