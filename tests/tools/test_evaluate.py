"""tools/evaluate.py: the loss of a checkpoint equals the trainer's own validation loss, splits over
ranks without changing the number, and lands in the run's MLflow run; tools/generate.py samples."""

import json
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.objectives.common import tiny_config, train


@pytest.fixture(scope="module")
def tracked_run(shakespeare_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 4-step run tracked to an MLflow file store (a sqlite store's schema migration costs ~5 s)."""
    root = tmp_path_factory.mktemp("evalrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield _tracked_run(shakespeare_dir, root)


def _tracked_run(shakespeare_dir: Path, root: Path) -> tuple[Path, dict, str]:
    uri = (root / "mlruns").as_uri()
    cfg = tiny_config(
        shakespeare_dir,
        root,
        "run.name=ev",
        "trainer.max_steps=4",
        "trainer.val_batches=2",
        "tracking=mlflow",
        f"tracking.uri={uri}",
        "tracking.system_metrics=false",
    )
    return root / "ev", train(cfg), uri


def _eval_main(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    from tools.evaluate import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_matches_validation_and_logs_to_the_same_mlflow_run(
    tracked_run, shakespeare_dir, capsys
) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, out, uri = tracked_run
    client = MlflowClient(uri)
    run_id = out["mlflow"]["run_id"]
    val = client.get_metric_history(run_id, "val/loss")
    res = _eval_main(
        [str(run_dir), "--data", str(shakespeare_dir / "val"), "--batches", "2", "--micro-batch-size", "2"],
        capsys,
    )
    assert res["step"] == 4 and res["mlflow_run_id"] == run_id
    assert res["loss"] == pytest.approx(val[-1].value, rel=1e-6)  # same weights, same held-out batches
    assert res["ppl"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
    logged = client.get_metric_history(run_id, "eval/heldout/loss")
    assert [(m.step, m.value) for m in logged] == [(4, pytest.approx(res["loss"]))]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # no new run


def _two_rank_eval(rank: int, world_size: int, run_dir: str, data: str) -> dict:
    import contextlib
    import io

    from tools.evaluate import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([run_dir, "--data", data, "--batches", "1", "--micro-batch-size", "2", "--no-log"])
    return {"code": code, "out": buf.getvalue()}


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_evaluate_across_two_ranks_equals_one_rank(tracked_run, shakespeare_dir, capsys) -> None:
    run_dir, _, _ = tracked_run
    one = _eval_main(
        [
            str(run_dir),
            "--data",
            str(shakespeare_dir / "val"),
            "--batches",
            "2",
            "--micro-batch-size",
            "2",
            "--no-log",
        ],
        capsys,
    )
    ranks = run_distributed(_two_rank_eval, 2, args=(str(run_dir), str(shakespeare_dir / "val")), timeout=100)
    assert [r["code"] for r in ranks] == [0, 0] and ranks[1]["out"] == ""  # rank 0 reports
    two = json.loads(ranks[0]["out"].strip().splitlines()[-1])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6) and two["tokens"] == one["tokens"]


def test_generate_greedy_is_deterministic_and_top_p_samples(tracked_run, capsys) -> None:
    from tools.generate import main

    run_dir, _, _ = tracked_run
    outs = []
    for extra in ([], [], ["--temperature", "1.0", "--top-p", "0.9", "--seed", "1"]):
        assert main([str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("ROMEO:") and outs[2].startswith("ROMEO:")
    assert outs[2] != outs[0]
    with pytest.raises(SystemExit, match="2"):
        main([str(run_dir), "--prompt", "x", "--top-p", "0"])


def test_top_p_keeps_the_nucleus_only() -> None:
    import torch

    from llmtrain.objectives.inference import sample_top_p

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_top_p(logits, 0.7, g) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn
    assert {sample_top_p(logits, 1e-6, g) for _ in range(20)} == {0}


def test_evaluate_scores_sft_jsonl_like_the_trainers_validation(shakespeare_dir, tmp_path, capsys) -> None:
    """An SFT run validated on a prompt/response jsonl: evaluate.py on that file (same micro-batch
    size and batch count) gives the trainer's own validation loss, counting response tokens only."""
    from llmtrain.distributed.env import DistEnv
    from llmtrain.train.trainer import Trainer
    from tests.objectives.common import addition_examples, write_jsonl

    data = write_jsonl(tmp_path / "add.jsonl", addition_examples())
    cfg = tiny_config(
        shakespeare_dir,
        tmp_path,
        "run.name=sft-ev",
        "objective=sft",
        f"objective.sft.train_path={data}",
        f"objective.sft.val_path={data}",
        "data.seq_len=48",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=3",
        "trainer.val_batches=2",
        "trainer.val_every=3",
    )
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1))
    trainer.train()
    val = trainer.validate()  # the final weights (the step-3 checkpoint) on the val jsonl
    res = _eval_main(
        [
            str(tmp_path / "sft-ev"),
            "--data",
            str(data),
            "--batches",
            "2",
            "--micro-batch-size",
            "4",
            "--no-log",
        ],
        capsys,
    )
    assert res["step"] == 3 and res["batches_per_rank"] == 2 and res["rows"] == 8
    rows_total = res["rows"] + res["rows_unused"]
    assert 0 < res["rows_unused"] == rows_total - 8
    # only response tokens (1-2 digits + EOS per example) carry loss: far fewer than 8 x 48 positions
    assert 2 * 8 <= res["tokens"] <= 3 * 25
    assert res["loss"] == pytest.approx(val, rel=1e-6), (res, val)
