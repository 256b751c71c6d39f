#!/usr/bin/env python
"""Upload a spilled MLflow buffer (`<run_dir>/mlflow_spill.jsonl`) into a tracking server; see
llmtrain/tracking/replay.py (also `python -m llmtrain.tracking.replay`).

    python tools/mlflow_replay.py runs/my-run [--uri http://mlflow:5000] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.tracking.replay import configured_uri, main, replay

__all__ = ["configured_uri", "main", "replay"]

if __name__ == "__main__":
    raise SystemExit(main())
