"""Raw text -> shards: formats, shard sizes, validation split, parallel determinism, idempotency, CLI."""

import gzip
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmtrain.data import DataError, DatasetIndex
from llmtrain.data.prepare import prepare_dataset
from llmtrain.data.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]


def docs_of(folder: Path) -> list[str]:
    """Decode every document of a byte-tokenized split (checking its EOS)."""
    index, tok, out = DatasetIndex.load(folder), ByteTokenizer(), []
    for info in index.shards:
        with pa.memory_map(str(folder / info.file)) as f:
            for row in pa.ipc.open_file(f).read_all().column(0).to_pylist():
                assert row[-1] == tok.eos_id
                out.append(tok.decode(row[:-1]))
    return out


@pytest.fixture
def texts() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "ε", "\n", "zeta"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 300)))) for _ in range(120)]


def test_every_input_format_round_trips(tmp_path: Path, texts: list[str]) -> None:
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts[:5]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(texts))
    pq.write_table(pa.table({"content": texts}), tmp_path / "a.parquet", row_group_size=17)
    prepare_dataset(tmp_path / "txt", tmp_path / "o1")
    assert docs_of(tmp_path / "o1") == texts[:5]
    prepare_dataset(tmp_path / "a.jsonl.gz", tmp_path / "o2", text_field="content")
    assert docs_of(tmp_path / "o2") == texts
    prepare_dataset(tmp_path / "a.parquet", tmp_path / "o3", text_field="content")
    assert docs_of(tmp_path / "o3") == texts


def test_shards_validation_split_and_parallel_determinism(tmp_path: Path, texts: list[str]) -> None:
    raw = tmp_path / "a.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kw = {"shard_tokens": 5000, "val_fraction": 0.1, "chunk_docs": 7}
    one = prepare_dataset(raw, tmp_path / "w1", workers=1, **kw)
    two = prepare_dataset(raw, tmp_path / "w2", workers=2, **kw)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]  # same bytes for any workers
    val = DatasetIndex.load(tmp_path / "w1" / "val")
    assert val.num_documents == 12 and one.num_documents == 108  # exactly 10%, spread evenly
    assert docs_of(tmp_path / "w1" / "val") == texts[9::10]
    longest = max(len(t.encode()) for t in texts) + 1
    assert len(one.shards) > 3
    for s in one.shards[:-1]:  # cut at the first document boundary at or past the target
        assert 5000 <= s.num_tokens < 5000 + longest
    assert one.num_tokens == sum(len(t.encode()) + 1 for i, t in enumerate(texts) if i % 10 != 9)
    assert one.tokenizer == "byte-v1" and all(len(s.sha256) == 64 for s in one.shards)


def test_rerun_is_idempotent_and_a_changed_input_rebuilds(tmp_path: Path, texts: list[str]) -> None:
    raw = tmp_path / "a.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    first = prepare_dataset(raw, tmp_path / "o", shard_tokens=4000)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    again = prepare_dataset(raw, tmp_path / "o", shard_tokens=4000)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == stamps  # nothing rewritten
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:10]))
    rebuilt = prepare_dataset(raw, tmp_path / "o", shard_tokens=4000)
    assert rebuilt.num_documents == 10 and len(rebuilt.shards) < len(first.shards)
    assert sorted(p.name for p in (tmp_path / "o").glob("*.arrow")) == [s.file for s in rebuilt.shards]


def test_cli_prepares_verifies_and_reports_errors(tmp_path: Path, texts: list[str]) -> None:
    for i in range(2):
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::2]))
    tool = [sys.executable, str(ROOT / "tools" / "prepare_data.py")]
    out = tmp_path / "ds"
    run = subprocess.run(
        [*tool, str(tmp_path / "0.jsonl"), str(tmp_path / "1.jsonl"), "--out", str(out), "--workers", "2",
         "--val-fraction", "0.05", "--shard-mb", "0.01"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "120 documents" not in run.stdout and "114 documents" in run.stdout
    assert docs_of(out) + docs_of(out / "val") != [] and len(docs_of(out)) == 114
    assert sorted(docs_of(out) + docs_of(out / "val")) == sorted(texts[0::2] + texts[1::2])
    check = subprocess.run([*tool, "--verify", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "verified" in check.stdout
    (out / "shard_00000.arrow").write_bytes(b"garbage")
    bad = subprocess.run([*tool, "--verify", str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "shard_00000.arrow" in bad.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_prepare_leaves_the_existing_dataset_byte_identical(
    tmp_path: Path, texts: list[str]
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ds"
    prepare_dataset(good, out, shard_tokens=3000, val_fraction=0.1)
    before = snapshot(out)
    assert "index.json" in before and "val/index.json" in before and len(before) > 6
    bad = tmp_path / "bad.jsonl"  # 100 fine documents (several shards' worth), then a broken line
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:100]) + '{"text": "cut off\n')
    with pytest.raises(
        DataError, match=r"bad\.jsonl:101: malformed JSON \(Invalid control character at column 18\)"
    ):
        prepare_dataset(bad, out, shard_tokens=3000, val_fraction=0.1)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds", "good.jsonl"]  # no staging left
    assert docs_of(out) == [t for i, t in enumerate(texts) if i % 10 != 9]


def test_a_rebuild_replaces_only_the_dataset_files(tmp_path: Path, texts: list[str]) -> None:
    raw = tmp_path / "a.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "ds"
    prepare_dataset(raw, out, shard_tokens=3000, val_fraction=0.1)
    (out / "NOTES.md").write_text("kept by the user")
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]))
    prepare_dataset(raw, out, shard_tokens=1 << 20)  # no val split any more: the old val/ goes too
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "index.json", "shard_00000.arrow"]
    assert docs_of(out) == texts[:5] and (out / "NOTES.md").read_text() == "kept by the user"
    stale = tmp_path / f".ds.prepare-{socket.gethostname()}-999999999-x"  # a killed build's folder
    stale.mkdir()
    prepare_dataset(raw, out, shard_tokens=1 << 20, force=True)
    assert not stale.exists()


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "a" "b"}', r"x\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column 14\)"),
        ("[1, 2]", r"x\.jsonl:2: a JSON list, not an object with a 'text' field"),
        (
            '{"body": "b", "id": 3}',
            r"x\.jsonl:2: no 'text' field \(keys: body, id; choose one with --text-field\)",
        ),
        ('{"text": 7}', r"x\.jsonl:2: 'text' is int, not text"),
    ],
)
def test_each_malformed_line_is_reported_as_what_it_is(tmp_path: Path, line: str, message: str) -> None:
    raw = tmp_path / "x.jsonl"
    raw.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        prepare_dataset(raw, tmp_path / "ds")


def test_an_input_without_tokens_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        prepare_dataset(tmp_path / "empty.txt", tmp_path / "ds")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"blank\.jsonl: no tokens: every one of the 2 documents is empty"):
        prepare_dataset(tmp_path / "blank.jsonl", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_cli_progress_without_a_terminal_is_plain_lines_and_counts_shards(
    tmp_path: Path, texts: list[str]
) -> None:
    raw = tmp_path / "a.jsonl.gz"
    with gzip.open(raw, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts * 5)
    out = tmp_path / "ds"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), str(raw), "--out", str(out),
         "--workers", "1", "--val-fraction", "0.1", "--shard-mb", "0.02", "--progress-every", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    lines = [x for x in run.stderr.splitlines() if x.startswith(f"tokenizing -> {out}: ")]
    train, val = DatasetIndex.load(out), DatasetIndex.load(out / "val")
    shards = [int(x.split("shards=")[1].split()[0]) for x in lines]
    assert len(lines) >= 3 and shards == sorted(shards) and shards[0] < shards[-1]
    assert shards[-1] == len(train.shards) + len(val.shards) and lines[-1].endswith("done")
    assert "100% of" in lines[-1] and f"{len(texts) * 5:,} documents" in lines[-1]
    assert run.stdout.splitlines() == [
        f"{out}: {train.num_documents:,} documents, {train.num_tokens:,} tokens in {len(train.shards)} "
        f"shards (byte-v1) [{run.stdout.split('[')[1].split(']')[0]}]",
        f"{out / 'val'}: {val.num_documents:,} documents, {val.num_tokens:,} tokens in "
        f"{len(val.shards)} shards (validation split)",
    ]


@pytest.mark.timeout(120)
def test_parallel_prepare_finishes_under_a_graceful_stop_handler(tmp_path: Path, texts: list[str]) -> None:
    """A process whose SIGTERM only sets a flag (the trainer's StopFlag, the launcher's handlers) used
    to hang in a parallel prepare: the forked workers inherited the handler and ignored the SIGTERM
    with which the pool ends them (the full suite hung 300 s in the tokenizer tests)."""
    import signal

    from llmtrain.train.signals import StopFlag

    raw = tmp_path / "a.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    StopFlag().install()
    try:
        index = prepare_dataset(raw, tmp_path / "out", workers=2, chunk_docs=7)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert index.num_documents == len(texts)
