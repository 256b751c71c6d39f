"""docs/configuration.md is generated from the schemas and must not go stale."""

import subprocess
import sys
from pathlib import Path

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
