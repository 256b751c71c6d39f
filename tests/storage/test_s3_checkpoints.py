"""Checkpoints mirrored to a real S3 API (moto on 127.0.0.1): a 2-rank gloo run (the real launcher) uploads its checkpoints
in the background (retention deletes on S3), a 1-process run with no local checkpoint resumes from the
mirror exactly like one resumed from the local copy (DCP reshards 2 -> 1), init_from reads s3://, no
credential reaches any file, config, checkpoint or MLflow record, and a server that goes down in the
middle of an upload fails that upload only: retried, reported, the previous remote checkpoint intact,
training goes on."""

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmtrain.checkpoint.folder import step_dir, verify_manifest
from llmtrain.checkpoint.mirror import download, remote_steps
from llmtrain.distributed.env import DistEnv
from llmtrain.train.trainer import Trainer
from tests.checkpoint.common import TINY
from tests.storage.conftest import AWS_ENV, SECRET, upload_folder

ENV = DistEnv(0, 0, 1, 1)
ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "llmtrain.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]]


@pytest.mark.slow
@pytest.mark.distributed
def test_mirror_resume_reshard_init_from_and_no_secrets(make_config, s3, shakespeare_dir, tmp_path) -> None:
    bucket = s3.bucket()
    data, mirror = upload_folder(s3, shakespeare_dir, bucket, "data"), f"s3://{bucket}/mirrors/src"
    base = [*TINY, f"storage.endpoint_url={s3.url}", "checkpoint.every_steps=4", "checkpoint.keep_last=1",
            f"data.sources.0.path={data}"]  # fmt: skip
    # 2 gloo ranks through the real launcher, data and checkpoints on S3, MLflow tracking on
    cli = [*base, f"run.root={tmp_path / 'runs'}", "tracking=mlflow", "launcher.nproc=2", "run.name=src"]
    two = _cli([*cli, "trainer.max_steps=8", f"checkpoint.mirror={mirror}"])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert [s for s, _ in remote_steps(mirror)] == [8]  # step 4 went up, then retention deleted it on S3
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix="mirrors/")["Contents"]]
    assert "mirrors/src/step_00000008/COMPLETE" in keys and not any("step_00000004" in k for k in keys)
    src = tmp_path / "runs" / "src"
    local8 = step_dir(src / "checkpoints", 8)
    ref = Trainer(
        make_config(*base, "run.name=ref", "trainer.max_steps=12", f"checkpoint.resume={local8}"), ENV
    )
    ref_losses = losses(ref.train())
    shutil.rmtree(src / "checkpoints")  # a new node: no checkpoint on local disk, the mirror has them
    again = Trainer(
        make_config(*base, "run.name=src", "trainer.max_steps=12", f"checkpoint.mirror={mirror}"), ENV
    ).train()
    assert [h["step"] for h in again["history"]] == [9, 10, 11, 12]
    assert losses(again) == ref_losses  # resumed from S3 == resumed from the local copy, 2 ranks -> 1
    assert [s for s, _ in remote_steps(mirror)] == [12]
    step12 = step_dir(src / "checkpoints", 12)
    ft = [*base, "trainer.max_steps=2"]
    ft_s3 = Trainer(make_config(*ft, "run.name=ft", f"checkpoint.init_from={mirror}"), ENV).train()
    ft_disk = Trainer(make_config(*ft, "run.name=ft-disk", f"checkpoint.init_from={step12}"), ENV).train()
    assert [h["step"] for h in ft_s3["history"]] == [1, 2] and losses(ft_s3) == losses(ft_disk)
    _assert_no_credentials(tmp_path, f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", two.stdout + two.stderr)


def _assert_no_credentials(root: Path, tracking_uri: str, output: str) -> None:
    """No secret in any file the runs wrote (logs, resolved configs, train logs, checkpoints, the MLflow
    store), nor in the MLflow run's params and tags."""
    import mlflow

    secrets = (SECRET, AWS_ENV["AWS_ACCESS_KEY_ID"])
    assert not any(s in output for s in secrets)  # the launcher's and the ranks' console output
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "train.log" for p in files) and any(p.name == "config.yaml" for p in files)
    for f in files:  # logs, resolved config, train log, checkpoints, the MLflow store
        data = f.read_bytes()
        assert not any(s.encode() in data for s in secrets), f
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["storage.endpoint_url"].startswith("http://127.0.0.1")  # params were logged
    for k, v in {**run.data.params, **run.data.tags}.items():
        assert not any(s in f"{k}={v}" for s in secrets), k


def test_server_down_mid_upload_fails_that_upload_only(make_config, s3, caplog) -> None:
    bucket = s3.bucket()
    mirror = f"s3://{bucket}/mirrors/cut"
    cfg = make_config(
        *TINY, "run.name=cut", "trainer.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
        f"checkpoint.mirror={mirror}", f"storage.endpoint_url={s3.url}", "storage.upload_retries=2",
        "storage.retry_backoff_s=1.5",
    )  # fmt: skip
    trainer = Trainer(cfg, ENV)
    state = {"cut": False}

    def cut_at_step_8(rel: str) -> None:  # runs in the upload thread after each object
        if not state["cut"] and trainer.mirror.uploaded == [4]:
            state["cut"] = True
            s3.stop()  # the server goes away after the first object of step 8
            threading.Thread(target=restart_after_failure, daemon=True).start()

    def restart_after_failure() -> None:
        while not trainer.mirror.failures:
            time.sleep(0.02)
        s3.start()

    trainer.mirror.after_object = cut_at_step_8
    with caplog.at_level(logging.WARNING, logger="llmtrain"):
        result = trainer.train()
    assert result["step"] == 12 and result["status"] == "FINISHED"  # training went on
    local = Path(result["run_dir"]) / "checkpoints"
    assert verify_manifest(step_dir(local, 8)) and verify_manifest(step_dir(local, 12))
    m = trainer.mirror
    assert (
        state["cut"]
        and m.uploaded == [4, 12]
        and len(m.failures) == 1
        and m.failures[0].startswith("step 8:")
    )
    attempts = [r.getMessage() for r in caplog.records if "step_00000008 failed (attempt" in r.getMessage()]
    assert len(attempts) == 2, attempts  # retried per storage.upload_retries
    assert any("was not uploaded" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert [s for s, _ in remote_steps(mirror)] == [4, 12]  # step 4 intact, the cut step 8 never listed
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any("step_00000008" in k for k in keys)  # its partial objects were cleaned up
    got = download(f"{mirror}/step_00000004", Path(result["run_dir"]) / "check4")
    verify_manifest(got, checksums=True)  # every byte of the previous checkpoint as written
    # a job stopped before its last upload: the next start uploads the newest local checkpoint
    s3.client().delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys if "step_00000012" in k]}
    )
    assert [s for s, _ in remote_steps(mirror)] == [4]
    again = Trainer(cfg, ENV)
    assert again.train()["step"] == 12 and again.mirror.uploaded == [12]
    assert [s for s, _ in remote_steps(mirror)] == [4, 12]
