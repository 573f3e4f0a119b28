"""The build step: the config in, the run's parts out. It is the one place that reads the whole config; every
rule derived from it (per-rank batch, batches per epoch, mixed precision, run and checkpoint directories, the
loss family and mode) has its home here, and the loop (trainer/loop.py) receives built parts.

    trainer = build(cfg, env)     # collective: prepares data, claims the run directory, resumes, wraps the model
    metrics = trainer.fit()       # or train(cfg, env) for both

Order (as torchtitan builds its Trainer from component configs): what the config and the world allow (fail before
any work) -> data -> run directory and the checkpoint to resume -> model, criterion, optimizer, schedule, engine
-> restore -> config.yaml -> tracker -> report.
"""
from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass

import torch

import collectives
from data_shards import (
    LoaderOptions,
    Sampling,
    batches_per_epoch,
    check_decode,
    eval_loader,
    object_store,
    read_manifest,
    train_loader,
)
from data_shards.object_store import is_s3
from loss import get_family
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, amp_dtype, check_world_size, to_dict, to_yaml
from trainer.engines import TrainModule, build_engine
from trainer.loop import Parts, Schedule, StopFlag, Trainer
from trainer.model import build_model, check_weights
from trainer.preflight import check_data
from trainer.resume import apply_optim_hyperparameters, check_resume, class_digest
from trainer.summary import RunFacts, RunReport, describe_loss
from trainer.train_state import Position, Trained, TrainState


@dataclass(frozen=True)
class Plan:
    """What follows from the config, the world and the manifests; each value computed here only."""
    run_dir: str
    checkpoint_dir: str
    train_dir: str
    test_dir: str
    per_rank_batch: int
    batches_per_epoch: int
    amp_dtype: torch.dtype | None
    val_dir: str = ""  # "" without data.val_split


def run_dir(cfg) -> str:
    return os.path.join(cfg.run.output_dir, cfg.run.name)


def checkpoint_dir(cfg) -> str:
    """`checkpoint.dir`, by default <run_dir>/checkpoints (DeepSpeed keeps its own files in <that>/deepspeed)."""
    return cfg.checkpoint.dir or os.path.join(run_dir(cfg), "checkpoints")


def split_dir(cfg, split: str) -> str:
    """<data.root>/<split> (data.train_split, data.test_split or data.val_split)."""
    return os.path.join(cfg.data.root, split)


def make_plan(cfg, env, train_manifest) -> Plan:
    return Plan(run_dir=run_dir(cfg), checkpoint_dir=checkpoint_dir(cfg),
                train_dir=split_dir(cfg, cfg.data.train_split), test_dir=split_dir(cfg, cfg.data.test_split),
                per_rank_batch=check_world_size(cfg, env.world_size),
                batches_per_epoch=batches_per_epoch(train_manifest.num_samples, cfg.train.batch_size),
                amp_dtype=amp_dtype(cfg.train.amp, env.device),
                val_dir=split_dir(cfg, cfg.data.val_split) if cfg.data.val_split else "")


def prepare_data(cfg, env) -> None:
    """Write a built-in dataset's shards (the demo's digits) on rank 0 if the data root has none yet (an s3://
    root: written locally, then uploaded, manifests last)."""
    manifest = os.path.join(split_dir(cfg, cfg.data.train_split), "manifest.json")
    if cfg.data.prepare == "digits" and env.is_main and is_s3(cfg.data.root):
        if not object_store.exists(manifest):
            import tempfile

            from data_shards.upload import upload_dataset
            from trainer.demo import write_digits_shards
            with tempfile.TemporaryDirectory(prefix="digits-") as tmp:
                write_digits_shards(tmp)
                upload_dataset(tmp, cfg.data.root, progress=False)
    elif cfg.data.prepare == "digits" and env.is_main and not os.path.exists(manifest):
        from filelock import FileLock

        from trainer.demo import write_digits_shards
        os.makedirs(cfg.data.root, exist_ok=True)
        with FileLock(os.path.join(cfg.data.root, ".prepare.lock")):  # two runs started at once on a new root
            if not os.path.exists(manifest):
                write_digits_shards(cfg.data.root)
    collectives.barrier()


def build_criterion(cfg_loss, num_classes: int, dim: int, seed: int = 0):
    """The criterion of family `loss.family` in its distributed form `loss.mode` on the current group, from the
    family's section `loss.<family>` (loss/family.py). ProxyGML's initial proxy table is a function of `seed`
    alone: the same in every mode and world size."""
    family = get_family(cfg_loss.family)
    return family.build(cfg_loss[family.name], cfg_loss.mode, num_classes, dim, seed=seed)


def backbone_groups(cfg_optim, embedder) -> list[dict]:
    """The backbone's parameter groups: one, or with optim.layer_decay < 1 timm's layer-wise groups
    (timm.optim.param_groups_layer_decay: layer i of n at lr x decay^(n - i), no weight decay on biases and
    norms), each named "backbone" with its `lr_scale` and `wd_scale` (trainer.resume applies them)."""
    if cfg_optim.layer_decay >= 1:
        return [dict(params=embedder.backbone_parameters(), lr=cfg_optim.lr, name="backbone")]
    from timm.optim import param_groups_layer_decay
    net = embedder.timm_model()
    trainable = {id(p) for p in embedder.backbone_parameters()}
    frozen = [p for p in net.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:  # timm groups what requires grad; frozen BatchNorm affines stay out
        p.requires_grad_(False)
    try:
        no_decay = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
        timm_groups = param_groups_layer_decay(net, weight_decay=1.0, no_weight_decay_list=no_decay,
                                               layer_decay=cfg_optim.layer_decay)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return [dict(params=g["params"], lr=cfg_optim.lr * g["lr_scale"], lr_scale=g["lr_scale"],
                 wd_scale=g["weight_decay"], weight_decay=cfg_optim.weight_decay * g["weight_decay"],
                 name="backbone") for g in timm_groups if g["params"]]


def build_optimizer(cfg_optim, embedder, criterion) -> torch.optim.Optimizer:
    """Parameter groups with their own learning rates: backbone (one, or one per layer with optim.layer_decay),
    embedding head, proxies (ProxyGML's proxies, or a baseline loss's own weights)."""
    groups = [*backbone_groups(cfg_optim, embedder),
              dict(params=embedder.head_parameters(), lr=cfg_optim.head_lr, name="head"),
              dict(params=list(criterion.proxy_parameters()), lr=cfg_optim.proxy_lr, name="proxies")]
    groups = [g for g in groups if g["params"]]
    wd = cfg_optim.weight_decay
    if cfg_optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum, weight_decay=wd)
    opt = torch.optim.AdamW if cfg_optim.name == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg_optim.lr, eps=cfg_optim.eps, weight_decay=wd)


class RunLoaders:
    """The run's two loaders of device batches (data_shards decodes on the workers or on the device), each made
    at first use and kept: with persistent workers every epoch and evaluation uses the same processes."""

    def __init__(self, cfg, plan: Plan, env):
        d = cfg.data
        options = LoaderOptions(num_workers=d.num_workers, decode=d.decode, device=env.device, verify=d.verify,
                                persistent_workers=d.persistent_workers)
        common = dict(rank=env.rank, world_size=env.world_size, transform=d.transform, options=options)
        sampling = Sampling(sampler=d.sampler, m_per_class=d.m_per_class, sampler_window=d.sampler_window,
                            draft=d.draft_decode)
        self._train = functools.partial(train_loader, plan.train_dir, batch_size=plan.per_rank_batch,
                                        seed=cfg.run.seed, sampling=sampling, **common)
        self._eval = functools.partial(eval_loader, plan.test_dir, batch_size=cfg.eval.batch_size, **common)
        self._val = functools.partial(eval_loader, plan.val_dir, batch_size=cfg.eval.batch_size, **common)
        self.batches_per_epoch = plan.batches_per_epoch
        self.train_batches = self.eval_batches = self.val_batches = None

    def train(self, epoch: int, start_batch: int):
        """Batches start_batch.. of `epoch` on this rank (images and labels on the device)."""
        if self.train_batches is None:
            self.train_batches = self._train(epoch=epoch, start_batch=start_batch)
        else:
            self.train_batches.set_epoch(epoch, start_batch)
        return self.train_batches

    def eval(self):
        if self.eval_batches is None:
            self.eval_batches = self._eval()
        return self.eval_batches

    def val(self):
        """The val split's loader (data.val_split; made at first use)."""
        if self.val_batches is None:
            self.val_batches = self._val()
        return self.val_batches

    def close(self) -> None:
        for loader in (self.train_batches, self.eval_batches, self.val_batches):  # their persistent workers end
            if loader is not None:
                loader.close()
        self.train_batches = self.eval_batches = self.val_batches = None


def schedule(cfg) -> Schedule:
    return Schedule(
        epochs=cfg.train.epochs, warmup_epochs=cfg.train.warmup_epochs, max_steps=cfg.train.max_steps,
        progress_every_steps=cfg.train.log_every_steps, track_every_steps=cfg.tracking.log_every_steps,
        eval_every_epochs=cfg.eval.every_epochs, eval_at_start=cfg.eval.at_start,
        checkpoint_every_epochs=cfg.checkpoint.every_epochs, checkpoint_every_steps=cfg.checkpoint.every_steps,
        track_proxies=cfg.tracking.enabled)


def build(cfg, env) -> Trainer:
    """Collective: every part of the run, ready to `fit()`. Fails (every rank the same way) before any work when
    the config, the world size, the device or the data cannot make a run."""
    stop = StopFlag()  # from the start: a preemption during setup still ends in a checkpoint
    state = None
    try:
        check_world_size(cfg, env.world_size)  # fail before any work
        try:
            check_decode(cfg.data.decode, env.device)
        except ValueError as e:  # a user's choice this machine cannot run: one line, exit 2
            raise ConfigError(str(e)) from None
        check_weights(cfg.model)  # no weights, or weights that do not fit: one line now, before the data
        prepare_data(cfg, env)
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        train_manifest = read_manifest(split_dir(cfg, cfg.data.train_split))
        test_manifest = read_manifest(split_dir(cfg, cfg.data.test_split))
        check_data(cfg.train.batch_size, train_manifest, test_manifest, env.world_size,  # what the manifests tell,
                   cfg.data.sampler, cfg.data.m_per_class)                                 # now
        plan = make_plan(cfg, env, train_manifest)
        val_manifest = read_manifest(plan.val_dir) if plan.val_dir else None
        if val_manifest is not None:
            check_val(val_manifest, train_manifest, test_manifest)
        data_info = {"classes": train_manifest.num_classes, "samples": train_manifest.num_samples,
                     "class_names": class_digest(train_manifest.class_names),
                     "class_list": [str(c) for c in train_manifest.class_names]}
        log = functools.partial(log_line, env.is_main)
        state = TrainState(env, plan.run_dir, Checkpointer(plan.checkpoint_dir, cfg.checkpoint.keep_last),
                           fmt=cfg.checkpoint.format, async_save=cfg.checkpoint.async_save, config=to_dict(cfg),
                           data_info=data_info, batches_per_epoch=plan.batches_per_epoch, log=log)
        saved = state.claim(cfg.checkpoint.resume, functools.partial(_check_resume, cfg, data_info))

        embedder = build_model(cfg.model, load_weights=saved is None)  # a resume takes the checkpoint's
        weights = describe_weights(cfg.model, embedder, saved)  # told in the start summary and to MLflow
        embedder = batch_norm_setup(cfg, env, embedder, plan.per_rank_batch, log).to(env.device)
        criterion = build_criterion(cfg.loss, train_manifest.num_classes, cfg.model.dim,
                                    seed=cfg.run.seed).to(env.device)
        module = TrainModule(embedder, criterion, compile=cfg.train.compile)
        optimizer = build_optimizer(cfg.optim, embedder, criterion)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.lr_milestones), cfg.optim.lr_gamma)
        warm = (saved["epoch"] if saved else 0) < cfg.train.warmup_epochs
        embedder.set_backbone_trainable(not warm)  # before the engine: DDP fixes its parameter set
        engine = build_engine(cfg.engine.name, module, optimizer, env, grad_clip=cfg.train.grad_clip,
                              find_unused_parameters=cfg.engine.find_unused_parameters,
                              deepspeed_config=cfg.engine.deepspeed_config, per_rank_batch=plan.per_rank_batch,
                              amp_dtype=plan.amp_dtype, checkpoint_dir=plan.checkpoint_dir,
                              keep_last=cfg.checkpoint.keep_last)
        trained = Trained(embedder, criterion, module, optimizer, scheduler, engine)
        apply_optim = functools.partial(apply_optim_hyperparameters, optimizer, scheduler, cfg.optim)
        pos = state.restore(saved, trained, apply_optim) if saved else Position()
        if env.is_main:  # only now: a checkpoint that does not fit the config has refused before (restore)
            with open(os.path.join(plan.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        tracker = build_tracker(cfg, plan, env, saved)
        if saved is None:
            tracker.log_params({"weights.loaded": weights})
        report = RunReport.start(facts(cfg, plan, env, train_manifest, test_manifest, val_manifest, weights), tracker,
                                 pos, state.latest, log)
        options = dict(device=env.device, recall_ks=list(cfg.eval.recall_ks), nmi=cfg.eval.nmi, map_r=cfg.eval.map_r,
                       amp_dtype=plan.amp_dtype)
        evaluate = functools.partial(_evaluate, class_names=test_manifest.class_names, **options)
        best = evaluate_val = None
        if val_manifest is not None:  # model selection on the val classes (trainer/selection.py)
            from trainer.selection import BestCheckpoint
            best = BestCheckpoint(plan.checkpoint_dir, cfg.eval.select_metric, is_main=env.is_main, log=log,
                                  step=pos.step)
            evaluate_val = functools.partial(_evaluate, class_names=val_manifest.class_names, **options)
        lookup = None
        if cfg.tracking.enabled and env.is_main:
            from data_shards.lookup import shard_image_lookup
            lookup = shard_image_lookup(plan.test_dir)
        parts = Parts(env=env, trained=trained, loaders=RunLoaders(cfg, plan, env), state=state, tracker=tracker,
                      report=report, schedule=schedule(cfg), stop=stop, pos=pos,
                      run_uid=(saved or {}).get("run_uid") or uuid.uuid4().hex, evaluate=evaluate,
                      amp_dtype=plan.amp_dtype, warm=warm, image_lookup=lookup, log=log, best=best,
                      evaluate_val=evaluate_val, test_at_end=cfg.eval.test)
        return Trainer(parts)
    except BaseException:
        stop.restore()
        if state is not None:
            state.release()
        raise


def build_tracker(cfg, plan: Plan, env, saved: dict | None):
    from trainer.tracking import Tracker
    return Tracker(cfg.tracking, plan.run_dir, rank=env.rank, config=to_dict(cfg), world_size=env.world_size,
                   resume_run_ids=saved["tracker_run_ids"] if saved else None)


def describe_weights(cfg_model, embedder, saved) -> str:
    """The backbone's initial weights in words (the run's log line, summary and MLflow param `weights.loaded`)."""
    if saved is not None:
        return "from the checkpoint"
    if embedder.loaded is not None:
        return embedder.loaded.describe()
    return "random initialisation (model.pretrained=false)" if not cfg_model.pretrained else \
        f"random initialisation ({cfg_model.backbone} has no published weights)"


BN_MIN_BATCH = 16  # images per BatchNorm statistic below which training-mode BN is noisy


def batch_norm_setup(cfg, env, embedder, per_rank_batch: int, log):
    """model.sync_bn under DDP on GPUs: SyncBatchNorm (statistics over the global batch). Warn (rank 0) when
    BatchNorm trains on fewer than BN_MIN_BATCH images per statistic, naming the keys that change it."""
    if not embedder.has_batch_norm() or cfg.model.freeze_bn:
        return embedder
    synced = cfg.model.sync_bn and env.world_size > 1
    if synced:
        if env.device.type != "cuda":
            raise ConfigError(f"model.sync_bn: SyncBatchNorm needs CUDA devices (this run is on "
                              f"{env.device.type}); set model.sync_bn=false")
        embedder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(embedder)
    bn_batch = cfg.train.batch_size if synced else per_rank_batch
    if bn_batch < BN_MIN_BATCH:
        where = (f"per rank (train.batch_size={cfg.train.batch_size} over {env.world_size} ranks)"
                 if env.world_size > 1 else f"(train.batch_size={cfg.train.batch_size})")
        log(f"warning: BatchNorm trains on {bn_batch} images {where}: statistics that small are noisy; "
            f"set model.sync_bn=true (over the global batch, GPUs), model.freeze_bn=true, or a larger "
            f"train.batch_size")
    return embedder


def check_val(val, train, test) -> None:
    """The val split can score a run and shares no class with the train or the test split (by class name)."""
    if val.num_samples < 2 or val.num_classes < 2:
        raise ConfigError(f"data.val_split: {val.location} has {val.num_samples} sample(s) of {val.num_classes} "
                          f"class(es); retrieval needs at least 2 classes (rewrite it with more --val-classes)")
    for other, what in ((train, "train"), (test, "test")):
        shared = sorted(set(val.class_names) & set(other.class_names))
        if shared:
            raise ConfigError(f"data.val_split: {val.location} shares classes {shared[:5]} with the {what} split "
                              f"{other.location}; val classes are held out of training and never test classes "
                              f"(python -m data_shards write ... --val-fraction F writes such a split)")


def facts(cfg, plan: Plan, env, train_manifest, test_manifest, val_manifest=None, weights: str = "") -> RunFacts:
    return RunFacts(weights=weights, run_name=cfg.run.name, run_dir=plan.run_dir, loss=describe_loss(cfg.loss),
                    backbone=cfg.model.backbone, dim=cfg.model.dim, engine=cfg.engine.name, data_root=cfg.data.root,
                    epochs=cfg.train.epochs, global_batch=cfg.train.batch_size,
                    batches_per_epoch=plan.batches_per_epoch, world_size=env.world_size,
                    device_type=env.device.type, is_main=env.is_main, train=train_manifest, test=test_manifest,
                    val=val_manifest, select_metric=cfg.eval.select_metric, test_at_end=cfg.eval.test)


def train(cfg, env) -> dict:
    """Build and fit: the last evaluation's metrics on rank 0."""
    return build(cfg, env).fit()


def _check_resume(cfg, data_info: dict, state: dict, path: str, at_epoch_start: bool) -> list[str]:
    return check_resume(state["config"], cfg, path, at_epoch_start=at_epoch_start,
                        saved_data={"classes": state.get("train_classes"), "samples": state.get("train_samples"),
                                    "class_names": state.get("train_class_names")},
                        data_now=data_info)


def _evaluate(embedder, loader, **options):
    from trainer.evaluation import evaluate
    return evaluate(embedder, loader, **options)


def log_line(is_main: bool, line: str) -> None:
    """Print `line` on rank 0 only, above the progress bar (the build step's and the loop's log)."""
    if is_main:
        from tqdm import tqdm

        from trainer.redact import redact
        tqdm.write(redact(line))
