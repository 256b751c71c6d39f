"""Commands that llmtrain prints for the user to paste (follow, status, cancel, replay, open the UI).

A printed command must work as printed, from any directory and in a shell where the virtual
environment is not activated: relative paths and a bare `python` only work in the shell (and the
folder) that started the run. So a command names
- an installed entry point (`mlflow`) by its name only when that name on PATH is this very
  environment's, else this interpreter (`sys.executable`, absolute) with `-m <module>`;
- a repository tool (`tools/runs.py`) by the absolute paths of the interpreter and the script, or
  `-m <module>` when the package is installed without its tools/ folder;
- every file and folder by its absolute path, and the real tracking URI.
"""

import shlex
import shutil
import sys
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"


def _interpreter() -> str:
    """This interpreter, absolute but not resolved: a venv's `bin/python` symlink must stay the venv's."""
    return str(Path(sys.executable).absolute())


def entry_point(name: str, module: str) -> list[str]:
    """argv prefix for a console script of this environment: `name` when PATH finds this
    environment's own script, else `<python> -m <module>`."""
    own = Path(_interpreter()).parent / name
    found = shutil.which(name)
    if found and own.is_file() and Path(found).absolute() == own:
        return [name]
    return [_interpreter(), "-m", module]


def python_tool(script: str, module: str, *args: str) -> str:
    """`<python> /abs/tools/<script> args...` (the tool puts the repository on sys.path itself), or
    `<python> -m <module>` when there is no tools/ folder next to the package."""
    path = TOOLS_DIR / script
    prefix = [_interpreter(), str(path)] if path.is_file() else [_interpreter(), "-m", module]
    return shlex.join([*prefix, *args])


def runs_tool(*args: str) -> str:
    """A `tools/runs.py` command (list, status, cancel)."""
    return python_tool("runs.py", "llmtrain.launch.runs_cli", *args)


def mlflow_ui_command(uri: str) -> str:
    """`mlflow ui` on a local store (sqlite:///<absolute path>; the store's experiments keep their
    absolute artifact folders, so the cwd does not matter)."""
    return shlex.join([*entry_point("mlflow", "mlflow"), "ui", "--backend-store-uri", uri])


def tail_command(*files: str | Path) -> str:
    return shlex.join(["tail", "-F", *(str(Path(f).absolute()) for f in files)])
