#!/usr/bin/env python
"""Operations on runs: list a sweep's runs with their SLURM state, show where a run stands, cancel.

python tools/runs.py list --root runs [--sweep 20261123-111500]
python tools/runs.py status my-run [--json]
python tools/runs.py cancel my-run | --sweep ID
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from llmtrain.launch.runs_cli import main

    sys.exit(main())
