"""Peak memory does not follow the dataset size: 10x the data, same peak RSS with
data.mmap_release_every set, and the same anonymous (heap) memory always. Measured in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data.format import DatasetIndex, write_shard

ROOT = Path(__file__).resolve().parents[2]
SHARD_TOKENS = 2_000_000  # 8 MB per shard

PROBE = r"""
import json, sys
import numpy as np
from llmtrain.data.dataset import TokenDataset
from llmtrain.data.order import Permutation, derive_key

def status_kb(key):  # /proc, not ru_maxrss: that one keeps the parent's peak across fork + exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

ds = TokenDataset(sys.argv[1], 512, release_every=int(sys.argv[2]))
perm = Permutation(ds.num_samples, derive_key(0, 0, 0))
ds.read(perm(np.arange(8)))  # warm-up: allocator arenas, first shard opened
before = status_kb("VmRSS")
for step in range(400):  # 400 shuffled batches of 8 samples, drawn from every shard
    ds.read(perm(np.arange(step * 8, step * 8 + 8) % ds.num_samples))
after = status_kb("VmHWM")
print(json.dumps({"samples": ds.num_samples, "shards": len(ds.index.shards), "before_kb": before,
                  "peak_kb": after, "anon_kb": status_kb("RssAnon")}))
"""


def make(folder: Path, num_shards: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    index = DatasetIndex(tokenizer="synthetic", vocab_size=50_000, eos_id=0, pad_id=0)
    for s in range(num_shards):
        lengths = rng.integers(100, 4000, size=SHARD_TOKENS // 2000)
        tokens = rng.integers(1, 50_000, size=int(lengths.sum()), dtype=np.uint32)
        index.shards.append(write_shard(folder / f"shard_{s:05d}.arrow", tokens, lengths))
        index.num_tokens += index.shards[-1].num_tokens
    index.save(folder)


def probe(folder: Path, release_every: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), str(release_every)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(180)
def test_peak_rss_is_flat_when_data_grows_10x(tmp_path: Path) -> None:
    make(tmp_path / "small", 2)  # 16 MB of tokens
    make(tmp_path / "large", 20)  # 160 MB of tokens
    small, large = probe(tmp_path / "small", 8), probe(tmp_path / "large", 8)
    never = probe(tmp_path / "large", 0)  # the default
    print(f"\nsmall: {small}\nlarge: {large}\nlarge, never unmapped: {never}")
    assert large["samples"] > 9 * small["samples"]
    growth = {
        k: d["peak_kb"] - d["before_kb"] for k, d in [("small", small), ("large", large), ("never", never)]
    }
    # loading the large set would add >= 144 MB; the reader maps only the pages it reads and unmaps
    # them every `release_every` samples, so the peak does not follow the data size
    assert large["peak_kb"] - small["peak_kb"] < 20_000, (small, large)
    assert growth["large"] < 32_000, growth
    assert large["anon_kb"] - small["anon_kb"] < 8_000  # no heap copy of the data either
    # the control: without unmapping, page-cache mappings (whole folios per fault) pile up in RSS,
    # though the process's own (anonymous) memory stays flat even then
    assert growth["never"] > growth["large"] + 40_000, growth
    assert never["anon_kb"] - small["anon_kb"] < 8_000
