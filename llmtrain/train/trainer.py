"""The training loop (docs/architecture.md): resume, loop {step, log, validate, maybe save}, final save."""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from llmtrain.checkpoint import CheckpointManager, RankState, SaveResult, TrainerState, latest_checkpoint
from llmtrain.checkpoint.mirror import build_mirror, localize
from llmtrain.checkpoint.pin import InitPin, read_pin_file, write_pin_file
from llmtrain.checkpoint.policy import ResumePlan, SaveSchedule, plan_resume
from llmtrain.checkpoint.rng import capture_host_rng
from llmtrain.checkpoint.state import LRPosition
from llmtrain.config import Config, batch_geometry
from llmtrain.config.io import to_dict
from llmtrain.data import objstore
from llmtrain.distributed.collectives import broadcast_object
from llmtrain.distributed.env import DistEnv, init_distributed, pick_device
from llmtrain.models import model_args
from llmtrain.models.moe import moe_stats
from llmtrain.objectives import build_objective
from llmtrain.optim import lr_factor
from llmtrain.parallel import ParallelDims
from llmtrain.parallel.build import build_engine
from llmtrain.peft import base_checkpoint, build_peft
from llmtrain.peft.summary import describe_trainable, trainable_params
from llmtrain.resilience import HangWatchdog, Resilience, report_hang
from llmtrain.resilience.timeline import START
from llmtrain.tracking import ConsoleLogger
from llmtrain.tracking.commands import mlflow_ui_command
from llmtrain.tracking.console import format_metrics
from llmtrain.tracking.tracker import Tracker, ends_run_on_error, run_tags
from llmtrain.train.flops import recompute_fraction, run_flops_per_token
from llmtrain.train.perf import Meter, memory_gb, peak_tflops, processed_tokens
from llmtrain.train.profiler import build_profiler
from llmtrain.train.signals import StopFlag

log = logging.getLogger("llmtrain")


def configure_torch(cfg: Config, env: DistEnv) -> None:
    """Threads per rank and determinism (bitwise-reproducible resumes on CPU need both)."""
    threads = cfg.trainer.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """Builds every component from the config for this rank, then `train()` runs the loop."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.root) / cfg.run.name
        objstore.configure(cfg.storage)  # endpoint/read-ahead for every s3:// path of this process
        self.device = pick_device(cfg.trainer.device, env.local_rank)
        configure_torch(cfg, env)
        START.mark("rendezvous_start")  # restart cost marks (resilience/timeline.py)
        init_distributed(env, self.device, cfg.resilience.pg_timeout_s)
        START.mark("rendezvous_done")
        self.watchdog = HangWatchdog(  # watches train(): docs/resilience.md "Hangs"
            cfg.resilience, env.rank, env.world_size, self.run_dir,
            lambda msg, _: report_hang(getattr(self, "tracker", None), self.step, msg),
        )  # fmt: skip
        p, t = cfg.parallel, cfg.trainer
        self.dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, env.world_size, ep=p.ep, cp=p.cp)
        self.mesh = self.dims.build_mesh(self.device.type) if env.world_size > 1 else None
        self.grad_accum = batch_geometry(cfg, self.dims.dp)
        self.engine = build_engine(cfg, self.dims, self.mesh, self.device, build_peft(cfg))
        dp_rank = self.dims.coords(env.rank)["dp"]
        # objective.name: its data loaders, per-step batch transform and (optionally) loss function
        self.objective = build_objective(cfg, self.engine, self.dims, self.mesh, self.device, dp_rank)
        self.train_loader, self.val_loader = self.objective.build_loaders(
            micro_batch_size=t.micro_batch_size, grad_accum=self.grad_accum
        )
        ck = cfg.checkpoint
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", ck.keep_last, ck.keep_every, ck.async_save, ck.async_staging_dir
        )
        self.mirror = build_mirror(ck, cfg.storage, self.ckpt.folder) if env.is_main else None  # uploads
        self.save_schedule, self.saving = SaveSchedule(ck.every_steps, ck.every_minutes), None
        self.console = ConsoleLogger(env.is_main)
        self.resilience = Resilience(cfg.resilience, self.engine, self.console, self.run_dir, env.rank)
        self.stop = StopFlag()
        self.stop.install()
        self.step, self.tokens_seen, self.last_saved = 0, 0, -1
        self.resume_origin: str | None = None
        self.init_pin: InitPin | None = None
        self.history: list[dict[str, float]] = []
        margs, seq = model_args(cfg.model), cfg.data.seq_len  # MFU counts model FLOPs, HFU + recompute
        peak_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        peak_dtype = torch.float8_e4m3fn if p.fp8.recipe != "none" else peak_dtype  # FP8 peak table
        self.meter = Meter(  # LoRA: frozen weights compute no weight gradient (run_flops_per_token)
            run_flops_per_token(cfg, margs, seq),
            peak_tflops(self.device, t.peak_tflops, peak_dtype),
            env.world_size,
            run_flops_per_token(cfg, margs, seq, recompute_fraction(p.activation_checkpoint, margs.n_layers)),
            peak_dtype,
        )

    def train(self) -> dict[str, Any]:
        """Run to trainer.max_steps (or until a stop signal), saving and logging along the way. An
        exception (resume, data, checkpoint, step) ends the MLflow run FAILED, see ends_run_on_error."""
        try:
            self.watchdog.start()
            with ends_run_on_error(self):
                return self._train()
        finally:
            self.watchdog.stop()

    def _train(self) -> dict[str, Any]:
        run_id = self.maybe_resume()
        peft = trainable_params(self.engine.modules) if self.cfg.peft.method != "none" else {}
        self.tracker = Tracker(
            self.cfg, self.run_dir, self.env.is_main, run_id, run_tags(self), start_step=self.step
        )
        max_steps, status, val_every = self.cfg.trainer.max_steps, "FINISHED", self.cfg.trainer.val_every
        self.console.info(
            f"training {self.cfg.model.name} on {self.env.world_size} rank(s) "
            f"[{self.dims.describe()}] from step {self.step}, accumulation {self.grad_accum}"
        )
        if peft:  # LoRA: how much of the model trains (console + MLflow metrics)
            self.console.info(describe_trainable(peft, self.cfg.peft.method))
            self.tracker.log_metrics(peft, self.step)
        self.profiler = build_profiler(
            self.cfg.trainer, self.run_dir, self.env.rank, self.device, self.tracker
        )
        self.profiler.begin(self.step)
        while self.step < max_steps:
            self.watchdog.step_started(self.step)
            if self.stop.should_stop():
                status = "KILLED"
                self.console.info(f"stop requested ({self.stop.signal_name}) at step {self.step}")
                break
            t0 = time.perf_counter()
            batches = self.objective.prepare(
                [b.to(self.device) for b in self.train_loader.next_step()], self.step
            )
            t_data = time.perf_counter() - t0
            lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.optim, max_steps)
            res = self.resilience.train_step(batches, lr, self.train_loader)
            if self.resilience.handle(self, res):  # skipped (non-finite loss/grad, spike): no step
                continue
            self.step += 1
            self.tokens_seen += res.num_tokens
            self.meter.update(
                processed_tokens(batches, self.dims.dp, res.num_tokens), time.perf_counter() - t0, t_data
            )
            self.profiler.on_step_end(self.step)
            self.record(res.loss, res.grad_norm, lr)
            self.watchdog.step_done()
            if val_every and self.step % val_every == 0:
                self.validate()
            if self.should_save():
                self.save()
        self.profiler.close()
        if status == "FINISHED" and not (val_every and self.step % val_every == 0):
            self.validate()
        if self.cfg.checkpoint.enabled and self.cfg.checkpoint.save_at_end and self.last_saved != self.step:
            self.save()
        self.finish_save()
        if self.mirror is not None:  # uploads to checkpoint.mirror finish (or are given up) first
            self.mirror.wait()
        self.tracker.finish(status, model_dir=latest_checkpoint(self.ckpt.folder))
        self.summarize(status)
        return {
            "step": self.step,
            "status": status,
            "history": self.history,
            "run_dir": str(self.run_dir),
            "mlflow": self.tracker.describe(),
        }

    def summarize(self, status: str) -> None:
        """Tell the user where everything landed and how to look at it."""
        info = self.tracker.describe()
        lines = [
            f"run {status.lower()} at step {self.step}: {self.run_dir.resolve()}",
            f"  checkpoints: {self.ckpt.folder.resolve()}",
        ]
        if info.get("run_id"):
            lines.append(f"  mlflow run {info['run_id']} in {info['uri']}")
            if str(info["uri"]).startswith("sqlite"):
                lines.append(f"  open the UI: {mlflow_ui_command(info['uri'])}")
        for line in lines:
            self.console.info(line)

    def truncate_log(self) -> None:
        """After resuming from step N, drop train_log.jsonl entries past N: those steps are re-run, and
        the trace must stay one entry per step (as the MLflow run does, see docs/tracking.md)."""
        log_file = self.run_dir / "train_log.jsonl"
        if self.env.is_main and log_file.is_file():
            keep = [
                ln for ln in log_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step
            ]
            tmp = log_file.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(log_file)

    def record(self, loss: float, grad_norm: float, lr: float) -> None:
        """Per-step trace (train_log.jsonl, used by resume tests) and the interval log line/metrics."""
        entry = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": lr}
        self.history.append(entry)
        if self.env.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.step % self.cfg.trainer.log_every and self.step != self.cfg.trainer.max_steps:
            return
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_seen": float(self.tokens_seen),
            "sys/mem_gb": memory_gb(self.device),
            **self.meter.metrics(self.cfg.trainer.max_steps - self.step),
            **self.moe_metrics(),
            **self.objective.metrics("train"),  # e.g. distillation's CE and KL apart from the mixed loss
        }
        self.meter.reset()
        self.console.step(self.step, self.cfg.trainer.max_steps, metrics, self.meter.peak_label)
        self.tracker.log_metrics(metrics, self.step)

    def moe_metrics(self) -> dict[str, float]:
        """Router statistics (MoE models only), of the layers of every pipeline stage."""
        pp_group = getattr(self.engine, "pp_group", None) if self.cfg.model.moe_num_experts else None
        return moe_stats(getattr(self.engine, "model", None), pp_group)

    def validate(self) -> float | None:
        """Loss/perplexity on the same held-out batches every time (the val loader restarts)."""
        if self.val_loader is None:
            return None
        self.val_loader.consumed = 0
        batches = self.objective.prepare(
            [
                b.to(self.device)
                for _ in range(self.cfg.trainer.val_batches)
                for b in self.val_loader.next_step()
            ],
            None,
        )
        loss = self.engine.evaluate(batches)
        metrics = {"val/loss": loss, "val/ppl": float(torch.tensor(loss).exp())} | self.objective.metrics(
            "val"
        )
        self.console.info(f"validation at step {self.step}: " + format_metrics(metrics, "val/"))
        self.tracker.log_metrics(metrics, self.step)
        return loss

    def should_save(self) -> bool:
        """Step cadence and/or wall-clock cadence (decided on rank 0, so every rank agrees)."""
        return self.cfg.checkpoint.enabled and self.save_schedule.due(self.step)

    def save(self) -> None:
        """Checkpoint now (collective). With checkpoint.async_save only the staging blocks the loop."""
        self.finish_save()  # a background save still in flight completes (or raises) first
        o, max_steps = self.cfg.optim, self.cfg.trainer.max_steps
        state = TrainerState(
            tokens_seen=self.tokens_seen,
            config=to_dict(self.cfg),
            mlflow_run_id=self.tracker.run_id,
            run_dir=str(self.run_dir.resolve()),
            world_size=self.env.world_size,
            layout=self.dims.describe(),
            engine=self.cfg.parallel.backend,
            lr_schedule=LRPosition(self.step, max_steps, o.lr * lr_factor(self.step, o, max_steps)),
            resume_origin=self.resume_origin,
            init_from=self.init_pin,
        )
        rank_state = RankState(data=self.train_loader.state_dict(), rng=capture_host_rng())
        self.saving = self.ckpt.save(self.step, self.engine, state, rank_state)
        self.last_saved = self.step
        self.save_schedule.saved()
        if self.cfg.checkpoint.async_save:
            self.console.info(
                f"checkpoint step {self.step}: loop blocked {self.saving.blocked_s:.2f}s, "
                "writing in the background"
            )
        else:
            self.finish_save()

    def finish_save(self) -> None:
        """Wait for the pending save, then report it (size, time) to the console and tracking."""
        res: SaveResult | None = self.saving
        if res is None:
            return
        self.saving = None
        path = res.done.result()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if self.env.is_main else 0
        self.console.info(f"saved {path} ({size / 1e6:.1f} MB; loop blocked {res.blocked_s:.2f}s)")
        self.tracker.log_checkpoint(res.step, path, size, deleted=self.ckpt.deleted)
        if self.mirror is not None:
            self.mirror.upload(path)  # in the background, see checkpoint/mirror.py

    def maybe_resume(self) -> str | None:
        """Start state per llmtrain.checkpoint.policy (auto-resume, resume=<path>, init_from, fresh).
        Returns the tracking run id to continue (only when resuming this very run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        plan = self._agree_resume_plan()
        for note in plan.notes:
            self.console.warning(note)
        self.resume_origin, self.init_pin = plan.origin, plan.pin
        if plan.pin is not None:
            self.console.info(f"checkpoint.init_from={plan.pin.spec} pinned to {plan.pin.describe()}")
        if plan.path is None:
            return None
        if base_checkpoint(self.cfg) is not None and plan.full_state:  # adapters-only: the frozen base first
            assert plan.pin is not None
            self.ckpt.load(Path(plan.pin.path), self.engine, load_optimizer=False, model=self.cfg.model)
        START.mark("load_start")
        state = self.ckpt.load(
            plan.path, self.engine, load_optimizer=plan.load_optimizer, model=self.cfg.model, state=plan.state
        )
        START.mark("load_done")
        self.console.info(f"{plan.reason} (step {state.step})")
        if not plan.full_state:
            return None
        self.step, self.tokens_seen, self.last_saved = state.step, state.tokens_seen, state.step
        self.train_loader.load_state_dict(state.rank(self.env.rank).data)
        START.mark("seek_done")
        self.ckpt.restore_rng(plan.path, state)
        self.truncate_log()
        self._announce_changes(state)
        return state.mlflow_run_id if state.run_dir == str(self.run_dir.resolve()) else None

    def _agree_resume_plan(self) -> ResumePlan:
        """Rank 0 removes leftovers of killed saves and decides what to start from (it may set damaged
        checkpoints aside); every rank follows the same plan, or raises the same error."""
        plan: ResumePlan | None = None
        error: Exception | None = None
        if self.env.is_main:
            for p in self.ckpt.clean_stale():
                self.console.info(f"removed {p}: an incomplete checkpoint (a save that did not finish)")
            try:  # remote resume/init_from/mirror checkpoints are downloaded first
                ck, notes = localize(self.cfg.checkpoint, self.run_dir, self.mirror)
                for note in notes:
                    self.console.info(note)
                plan = plan_resume(ck, self.ckpt.folder)
                if plan.pin is not None and read_pin_file(self.run_dir) is None:
                    write_pin_file(self.run_dir, plan.pin)
            except ValueError as e:  # CheckpointError / ConfigError: bad input, one line on every rank
                error = e
        plan, error = broadcast_object((plan, error))
        if error is not None:
            raise error
        assert plan is not None
        return plan

    def _announce_changes(self, state: TrainerState) -> None:
        """Say what differs from the saved run: the layout, and the LR schedule (a changed max_steps,
        lr, warmup or schedule moves the LR from the step on)."""
        if state.world_size != self.env.world_size:
            self.console.info(
                f"checkpoint saved on {state.world_size} ranks [{state.layout}], "
                f"resharded onto {self.env.world_size} [{self.dims.describe()}]"
            )
        saved, o, max_steps = state.lr_schedule, self.cfg.optim, self.cfg.trainer.max_steps
        if saved is None:
            return
        lr_now = o.lr * lr_factor(state.step, o, max_steps)
        if saved.max_steps != max_steps or abs(lr_now - saved.next_lr) > 1e-9 * max(
            abs(saved.next_lr), 1e-30
        ):
            self.console.warning(
                f"LR schedule changed since the checkpoint: horizon trainer.max_steps {saved.max_steps} -> "
                f"{max_steps}, LR at step {state.step} {saved.next_lr:.3e} -> {lr_now:.3e}"
            )
