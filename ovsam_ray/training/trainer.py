"""Ray Train glue shared by both stages: the per-worker loop, checkpoints and the trainer.

``fit(stage, cfg, ...)`` builds ``TorchTrainer(train_loop_per_worker, scaling_config=
ScalingConfig(num_workers, use_gpu), run_config=RunConfig(storage_path, name,
FailureConfig(max_failures)), datasets={"train": <factory>})`` (Ray Train V2, the default in
Ray >= 2.50). The dataset factory is called on every worker-group start, so after a failure, or
when the same run (storage_path + name) is started again, the stream begins at the data
position of the latest checkpoint, and each worker restores model, optimizer, scheduler and step
from ``ray.train.get_checkpoint()``.

A checkpoint directory holds ``model.pt`` (the trainable part), ``optimizer.pt``,
``scheduler.pt``, ``train_state.json`` (step, data position, versions) and ``config.json`` (the
resolved config); all ``.pt`` files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError
from ovsam_ray.training.config import CotrainConfig, DistillConfig, OptimConfig, RunSpec
from ovsam_ray.training.loop import BudgetClock, Runtime, Task, TrainState, train_loop
from ovsam_ray.training.networks import load_trainable_state_dict, trainable_state_dict
from ovsam_ray.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
# "<step>:<marker file>": raise once at that step (fault-injection for tests), via the worker env.
FAIL_ONCE_ENV = "OVSAM_RAY_TRAIN_FAIL_ONCE"


@dataclass
class StageSetup:
    """What a stage gives the generic worker loop: the (unwrapped) network and a task factory."""

    net: nn.Module
    make_task: Callable[[nn.Module], Task]
    optim: OptimConfig


def config_from_dict(stage: str, data: dict) -> CotrainConfig | DistillConfig:
    if stage == "cotrain":
        return CotrainConfig.from_dict(data)
    if stage == "distill":
        return DistillConfig.from_dict(data)
    raise ConfigError(f"unknown training stage {stage!r}; known: cotrain, distill")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --- checkpoints ---------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import ray

    from ovsam_ray import __version__

    return {"ovsam_ray": __version__, "torch": torch.__version__, "ray": ray.__version__}


def write_checkpoint(
    directory: str,
    *,
    stage: str,
    config: dict,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
) -> None:
    """Write one checkpoint directory (see the module docstring)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(trainable_state_dict(net), os.path.join(directory, "model.pt"))
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({**state.to_dict(), "stage": stage, "versions": _versions()}, f)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(storage.redact_config(config), f, indent=1)


def read_checkpoint(
    directory: str,
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    device: torch.device | str = "cpu",
) -> TrainState:
    """Restore what ``write_checkpoint`` wrote (optimizer/scheduler only when given)."""

    def load(name: str) -> Any:
        return torch.load(os.path.join(directory, name), map_location=device, weights_only=True)

    load_trainable_state_dict(net, load("model.pt"))
    if optimizer is not None:
        optimizer.load_state_dict(load("optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(load("scheduler.pt"))
    with open(os.path.join(directory, STATE_FILE)) as f:
        data = json.load(f)
    return TrainState(
        step=int(data["step"]), resume_item=int(data["resume_item"]), images_seen=int(data.get("images_seen", 0))
    )


def latest_checkpoint(run_url: str, *, s3_endpoint: str | None = None) -> tuple[str, dict] | None:
    """(URL of the run's checkpoint with the highest step, its train_state) or None. Checkpoint
    folders without a readable train_state.json (a partial upload) are ignored."""
    fs, root = storage.get_filesystem(run_url, s3_endpoint=s3_endpoint)
    if not fs.exists(root):
        return None
    best: tuple[str, dict] | None = None
    for path in fs.ls(root, detail=False):
        if not os.path.basename(path.rstrip("/")).startswith(CHECKPOINT_PREFIX):
            continue
        try:
            with fs.open(path.rstrip("/") + "/" + STATE_FILE, "rb") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if best is None or int(state["step"]) > int(best[1]["step"]):
            best = (storage.to_url(fs, path.rstrip("/")), state)
    return best


def resume_item(run: RunSpec) -> int:
    """The data position to start the stream at: that of the run's latest checkpoint, else 0."""
    found = latest_checkpoint(run.run_url, s3_endpoint=run.s3_endpoint)
    return int(found[1]["resume_item"]) if found else 0


# --- the worker loop ------------------------------------------------------------------------------------


class _FailOnce:
    """Task wrapper raising once at a given step (marker file), for fault-tolerance tests."""

    def __init__(self, task: Task, spec: str) -> None:
        step, _, marker = spec.partition(":")
        self.task, self.step, self.marker = task, int(step), marker

    def losses(self, samples: list, step: int, micro: int):
        if step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")
        return self.task.losses(samples, step, micro)


def _runtime(run: RunSpec) -> Runtime:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if run.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world, device=device, precision=run.precision)


def worker_loop(stage: str, config: dict, setup_fn: Callable[[Any, Runtime], StageSetup]) -> None:
    """``train_loop_per_worker`` body: set up, restore, wrap in DDP, stream, optimise, report."""
    import ray.train

    cfg = config_from_dict(stage, config)
    run = cfg.run
    runtime = _runtime(run)
    seed_everything(run.seed)  # identical initialisation on every rank
    setup = setup_fn(cfg, runtime)
    net = setup.net.to(runtime.device)
    optimizer = build_optimizer(net, setup.optim, run.global_batch)
    assert run.max_steps is not None, "max_steps is resolved before a run starts (recipes.resolve_steps)"
    scheduler = build_scheduler(optimizer, setup.optim, run.max_steps)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, net=net, optimizer=optimizer, scheduler=scheduler, device=runtime.device)
        log.info("rank %d resumed at step %d (data item %d)", runtime.rank, state.step, state.resume_item)
    seed_everything(run.seed * 1000 + runtime.rank + state.step)
    wrapped = net
    if runtime.world_size > 1:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    task = setup.make_task(wrapped)
    if os.environ.get(FAIL_ONCE_ENV):
        task = _FailOnce(task, os.environ[FAIL_ONCE_ENV])
    rows = ray.train.get_dataset_shard("train").iter_rows()

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        log.info("%s step %d: %s", stage, state.step, _fmt(metrics))
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if runtime.rank == 0:
                write_checkpoint(
                    tmp, stage=stage, config=config, net=net, optimizer=optimizer, scheduler=scheduler, state=state
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{state.step:09d}")

    net.train()
    train_loop(
        task=task,
        net=wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        rows=iter(rows),
        run=run,
        state=state,
        runtime=runtime,
        report=report,
        grad_clip=setup.optim.grad_clip,
    )


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# --- the trainer ---------------------------------------------------------------------------------------


def _storage(run: RunSpec) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local as is; s3:// through pyarrow."""
    if not storage.is_remote(run.storage_path):
        return os.path.abspath(run.storage_path), None
    import pyarrow.fs

    endpoint = run.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        kwargs.setdefault("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    path = run.storage_path.split("://", 1)[1].rstrip("/")
    return path, pyarrow.fs.S3FileSystem(**kwargs)


def fit(
    stage: str,
    cfg: CotrainConfig | DistillConfig,
    train_fn: Callable[[dict], None],
    dataset_factory: Callable[[], Any],
    *,
    worker_env: dict[str, str] | None = None,
):
    """Run (or resume) the training run ``cfg.run`` on Ray Train; returns ``ray.train.Result``."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    run = cfg.run
    if not ray.is_initialized():
        ray.init()
    storage_path, storage_fs = _storage(run)
    resources = {"CPU": run.cpus_per_worker}
    found = latest_checkpoint(run.run_url, s3_endpoint=run.s3_endpoint)
    if found:
        log.info(
            "run %s exists: resuming from %s (step %s)",
            storage.redact(run.run_url),
            storage.redact(found[0]),
            found[1]["step"],
        )
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"stage": stage, "config": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
            # Train v2's RunConfig at run time (RAY_TRAIN_V2_ENABLED); the stubs show Train v1's.
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,  # type: ignore[call-arg]
        ),
        datasets={"train": dataset_factory},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()


# --- in-process runs (no Ray) ------------------------------------------------------------------------------


def run_local(
    stage: str,
    cfg: CotrainConfig | DistillConfig,
    setup_fn: Callable[[Any, Runtime], StageSetup],
    builder: Callable[[dict], Any],
    *,
    time_budget_s: float | None = None,
    clock: str = "wall",
    on_report: Callable[[dict[str, float]], None] | None = None,
) -> tuple[TrainState, nn.Module]:
    """The same loop in this process, one worker, no Ray (on the GPU with ``run.use_gpu`` where
    there is one, in ``run.precision``): rows come straight from the shards,
    checkpoints go to ``cfg.run.run_url`` (local) in the same layout, and an existing checkpoint
    there is resumed. With ``time_budget_s`` it stops when the time is up and the lr schedule
    follows elapsed time (the tiny recipe's fixed budget); ``clock`` says which time
    (``loop.BudgetClock``: "wall" or "cpu"). ``on_report`` also gets every
    reported metrics dict. Returns the final state and the trained (unwrapped) network."""
    from ovsam_ray.training.recipes import resolve_steps
    from ovsam_ray.training.stream import dataset_items, iter_local_rows

    cfg = resolve_steps(cfg)
    run = cfg.run
    device = torch.device("cuda" if run.use_gpu and torch.cuda.is_available() else "cpu")
    runtime = Runtime(device=device, precision=run.precision)
    budget = BudgetClock(time_budget_s or 0.0, clock)
    seed_everything(run.seed)
    setup = setup_fn(cfg, runtime)
    net = setup.net.to(device)
    optimizer = build_optimizer(net, setup.optim, run.global_batch)
    max_steps = run.max_steps
    assert max_steps is not None, "max_steps is resolved before a run starts (recipes.resolve_steps)"

    def progress(step: int) -> float:
        return max(step / max_steps, budget.fraction() if time_budget_s else 0.0)

    scheduler = build_scheduler(optimizer, setup.optim, max_steps, progress)
    state = TrainState()
    found = latest_checkpoint(run.run_url)
    if found is not None:
        state = read_checkpoint(found[0], net=net, optimizer=optimizer, scheduler=scheduler)
        log.info("resumed %s at step %d", found[0], state.step)
    items = dataset_items(
        cfg.datasets, epochs=cfg.epochs, seed=run.seed, s3_endpoint=run.s3_endpoint, shards_per_item=run.shuffle_shards
    )
    rows = iter_local_rows(items[state.resume_item :], builder)
    config = cfg.to_dict()

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        log.info("%s step %d: %s", stage, state.step, _fmt(metrics))
        if on_report is not None:
            on_report(metrics)
        if with_checkpoint:
            directory = os.path.join(run.run_url, f"{CHECKPOINT_PREFIX}{state.step:09d}")
            write_checkpoint(
                directory, stage=stage, config=config, net=net, optimizer=optimizer, scheduler=scheduler, state=state
            )

    def out_of_time() -> bool:
        return time_budget_s is not None and budget.expired()

    net.train()
    state = train_loop(
        task=setup.make_task(net),
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        rows=rows,
        run=run,
        state=state,
        runtime=runtime,
        report=report,
        grad_clip=setup.optim.grad_clip,
        should_stop=out_of_time,
    )
    return state, net.eval()
