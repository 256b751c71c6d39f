#!/usr/bin/env python
"""Start a training run: the same as the `llmtrain` command (Hydra overrides as arguments).

python launchers/train.py model=tiny launcher.nproc=2
torchrun --nproc_per_node=8 launchers/train.py launcher=torchrun ...   # ranks started by torchrun
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from llmtrain.cli import main

    main()
