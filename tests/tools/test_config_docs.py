"""docs/configuration.md is generated from the schemas and must not go stale."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + "\nregenerate with: python tools/config_docs.py"


def test_every_field_is_documented():
    sys.path.insert(0, str(ROOT / "tools"))
    import dataclasses

    from config_docs import field_docs

    from llmtrain.config.schema import GROUP_SCHEMAS

    for cls in GROUP_SCHEMAS.values():
        docs = field_docs(cls)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(f.type) and f.name not in docs
        ]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


DOC_ENV_UNSET = ("LLMTRAIN_DATA_CACHE", "LLMTRAIN_CACHE_DIR", "XDG_CACHE_HOME", "LLMTRAIN_DATA")
CELL = re.compile(r"(?<!\\)\|")


def _composed(monkeypatch, overrides: list[str]):
    """The config `llmtrain <overrides>` runs, in the environment the reference is generated in."""
    from llmtrain.testing import compose_config

    for var in DOC_ENV_UNSET:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "~")
    return compose_config(overrides)


def _value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    if isinstance(cfg, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in cfg]
    return cfg


def _literal(cell: str):
    return ast.literal_eval(cell.strip().strip("`").replace("\\|", "|"))


def test_documented_defaults_and_experiment_values_equal_the_composed_config(monkeypatch) -> None:
    """Every row of docs/configuration.md: `default` is what runs with no overrides, and each
    `experiment: value` is what that overlay runs; keys without a note run the default there."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = [CELL.split(line)[1:-1] for line in text.splitlines() if line.startswith("| `")]
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    default = _composed(monkeypatch, [])
    overlays = {e: _composed(monkeypatch, [f"experiment={e}"]) for e in experiments}
    checked = 0
    for key_cell, _, default_cell, _, sets_cell, _ in rows:
        key = key_cell.strip().strip("`")
        if "[]" in key:  # list-item defaults; the composed list is in its parent's row
            continue
        assert _literal(default_cell) == _value(default, key), key
        noted = dict(x.split(": ", 1) for x in sets_cell.strip().split("; ") if x)
        for exp, cfg in overlays.items():
            expected = _literal(noted[f"`{exp}`"]) if f"`{exp}`" in noted else _value(default, key)
            assert _value(cfg, key) == expected, (key, exp)
        checked += 1
    assert checked > 130
    for key, value in (("optim.lr", 1e-3), ("optim.warmup_steps", 20), ("checkpoint.every_steps", 100),
                       ("trainer.val_every", 100), ("trainer.max_steps", 200)):  # fmt: skip
        row = next(r for r in rows if r[0].strip() == f"`{key}`")
        assert _literal(row[2]) == value, key  # the values the issue found documented wrongly


# other pages that state defaults: (page, overrides the table describes, key prefix of its rows)
DEFAULT_TABLES = [("checkpoints.md", [], ""), ("slurm.md", ["launcher=slurm"], "launcher.")]
PROSE_DEFAULT = re.compile(r"`([a-z_]+\.[a-z_]+)`[^`()]{0,40}\(default:? `?([\w. ]+?)`?\)")


def test_defaults_stated_in_other_docs_equal_the_composed_config(monkeypatch) -> None:
    checked = []
    for page, overrides, prefix in DEFAULT_TABLES:
        cfg, in_table = _composed(monkeypatch, overrides), False
        for line in (ROOT / "docs" / page).read_text().splitlines():
            cells = [c.strip() for c in CELL.split(line)[1:-1]]
            in_table = (cells[:2] == ["key", "default"]) or (in_table and bool(cells))
            if in_table and cells and cells[0].startswith("`"):
                for key in re.findall(r"`([a-z_.]+)`", cells[0]):
                    assert yaml.safe_load(cells[1]) == _value(cfg, prefix + key), (page, key)
                    checked.append(prefix + key)
    cfg = _composed(monkeypatch, [])
    for page in sorted((ROOT / "docs").glob("*.md")):
        for key, stated in PROSE_DEFAULT.findall(page.read_text()):
            value = yaml.safe_load(stated.replace(" ", "") if stated.replace(" ", "").isdigit() else stated)
            assert value == _value(cfg, key), (page.name, key, stated)
            checked.append(key)
    assert {
        "checkpoint.every_steps",
        "checkpoint.keep_last",
        "launcher.time_min",
        "tracking.max_buffer",
    } <= set(checked)
