#!/usr/bin/env python
"""Generate docs/configuration.md from the composed default config and the config dataclasses.

    python tools/config_docs.py            # rewrite docs/configuration.md
    python tools/config_docs.py --check    # exit 1 if the file is stale (used by the tests)

The default of each key is what `llmtrain` with no overrides runs (conf/config.yaml and its defaults
list, composed by Hydra), not the dataclass default, which applies only where no YAML sets the key:
the two differ for many keys (optim.lr 1e-3 vs 3e-4, trainer.max_steps 200 vs 1000), and documenting
the dataclass one told users values that never run. Where they differ both are shown, and every value
an `experiment=<name>` overlay sets is listed. Field docstrings (the string literal under each field)
are read with `ast`. Composition runs in a fixed environment (DOC_ENV) so paths built from
environment variables do not depend on the machine that generated the file.
"""

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import MISSING  # noqa: E402

from llmtrain.config.schema import GROUP_SCHEMAS, Config  # noqa: E402
from llmtrain.testing import compose_config  # noqa: E402

OUT = ROOT / "docs" / "configuration.md"
DOC_ENV: dict[str, str | None] = {
    "HOME": "~",
    "LLMTRAIN_DATA_CACHE": None,
    "LLMTRAIN_CACHE_DIR": None,
    "XDG_CACHE_HOME": None,
    "LLMTRAIN_DATA": None,
}
"""The environment the documented defaults are composed in (None = unset)."""


@contextmanager
def documented_env() -> Iterator[None]:
    """Set DOC_ENV for the duration of a composition, then restore the real environment."""
    saved = {k: os.environ.get(k) for k in DOC_ENV}
    try:
        for k, v in DOC_ENV.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def compose(overrides: list[str] | None = None) -> Config:
    """The config `llmtrain <overrides>` would run, in the documented environment."""
    with documented_env():
        return compose_config(overrides)


def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def plain(value: Any) -> Any:
    """Dataclasses (list items such as data.sources) as dicts, as they are written in YAML."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def lookup(cfg: Config, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def literal(value: Any) -> str:
    return "`" + repr(plain(value)).replace("|", "\\|") + "`"


def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring literal that follows it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        )
        if is_field and is_doc:
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def type_name(tp: object) -> str:
    s = str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    return s.replace("typing.", "").replace("llmtrain.config.data.", "").replace("|", "\\|")


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "required" if f.default == MISSING else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def section(name: str, cls: type, default: Config, overlays: dict[str, Config]) -> list[str]:
    """One table: the composed default of each key, the dataclass default where it differs, and the
    values experiment overlays set. A list item's section (data.sources[]) has no composed value of
    its own (the composed list is in its parent's row), so it shows the item defaults."""
    docs, item = field_docs(cls), name.endswith("[]")
    lines = [
        f"## `{name}` ({cls.__name__})",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "| key | type | default | dataclass default | set by experiments | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            continue
        key, schema = f"{name}.{f.name}", default_of(f)
        meaning = docs.get(f.name, "").replace("|", "\\|")
        if item:
            shown, differs, sets = f"`{schema}`", "", ""
        else:
            shown = literal(lookup(default, key))
            differs = f"`{schema}`" if f"`{schema}`" != shown.replace("\\|", "|") else ""
            sets = "; ".join(
                f"`{exp}`: {literal(lookup(cfg, key))}"
                for exp, cfg in overlays.items()
                if plain(lookup(cfg, key)) != plain(lookup(default, key))
            )
        lines.append(f"| `{key}` | `{type_name(f.type)}` | {shown} | {differs} | {sets} | {meaning} |")
    return [*lines, ""]


def sections(name: str, cls: type, default: Config, overlays: dict[str, Config]) -> list[str]:
    """A table for cls, then one per nested dataclass (objective.sft) or list item (data.sources[])."""
    out = section(name, cls, default, overlays)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            out += sections(f"{name}.{f.name}", f.type, default, overlays)  # type: ignore[arg-type]
        args = typing.get_args(f.type)
        if args and dataclasses.is_dataclass(args[0]):
            out += sections(f"{name}.{f.name}[]", args[0], default, overlays)
    return out


HEADER = """# Configuration reference

Generated by `python tools/config_docs.py`; do not edit by hand (a test fails when it is stale).

- **default**: what `llmtrain` with no overrides runs: `conf/config.yaml` and the group options its
  defaults list picks (`model=tiny`, `data=shakespeare`, `optim=adamw`, `trainer=default`,
  `checkpoint=default`, `launcher=local`, ...), composed by Hydra.
- **dataclass default**: the schema's own default (`llmtrain/config/*.py`), shown only where it
  differs; it applies where no YAML sets the key (e.g. in Python, `TrainerConfig()`).
- **set by experiments**: the value each `experiment=<name>` overlay (`conf/experiment/`) runs with,
  where it differs from the default.

Other group options (`parallel=zero3`, `launcher=slurm`, `objective=sft`, ...) set further keys: print
any composition with `llmtrain --cfg job <overrides>`. Paths are shown as composed without
`LLMTRAIN_DATA_CACHE`, `LLMTRAIN_CACHE_DIR`, `XDG_CACHE_HOME` and `LLMTRAIN_DATA` set, `~` being
`$HOME`.
"""


def render() -> str:
    default = compose()
    overlays = {name: compose([f"experiment={name}"]) for name in experiments()}
    out = [HEADER]
    run_cls = Config.__dataclass_fields__["run"].default_factory().__class__  # type: ignore[misc]
    out += section("run", run_cls, default, overlays)
    for group, cls in GROUP_SCHEMAS.items():
        out += sections(group, cls, default, overlays)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/configuration.md is stale")
    text = render()
    if ap.parse_args().check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python tools/config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
