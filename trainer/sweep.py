"""python -m trainer.sweep --config PRESET --space SPACE.yaml --trials N --storage URL [options] [key=value ...]

Hyperparameter search on Optuna, scored on validation classes only (the test classes stay untouched): each trial
is a trainer run (`python -m trainer`, a subprocess in its own process group: isolated, killable, dying with its
worker) of PRESET + key=value + the trial's values, with `eval.test=false`; its score is the best value of the
config's `eval.select_metric` (MAP@R by default) on the val split (`data.val_split`, see data_shards write
--val-fraction), or with `--folds K` the mean over K folds of the train classes (the val split's classes joined
in), each fold's classes held out in turn (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).

SPACE.yaml maps config keys to Optuna distributions:

    optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    loss.proxygml.proxies_per_class: {type: int, low: 1, high: 12}
    loss.proxygml.scale: {type: categorical, choices: [1, 4, 8, 16]}

The study lives in the storage: an RDB URL (`sqlite:///study.db`, `postgresql://...`) or a journal file path
(Optuna's JournalStorage: several processes, or SLURM jobs on shared storage, may work on one study). Any number
of workers may run on one study at once; each takes trials until the study holds N trials that completed, were
pruned or are running (failed ones do not count: the study goes on). A trial whose trainer fails or is killed is
marked FAIL; a worker killed mid-trial leaves a RUNNING trial that the next worker marks FAIL (same host: its
process is gone; elsewhere: no heartbeat for --grace-s). Started again with the same --study, a sweep continues.

Pruning: the trainer's val evaluations (every `eval.every_epochs`, read from the trial's summary.json while it
runs) are reported as intermediate values (step = fold x (train.epochs + 1) + epoch); a pruned trial's trainer
is stopped with SIGTERM (it checkpoints and exits). `--pruner median | hyperband | none`.

MLflow (when the config's tracking is enabled): one parent run per study (named after it) and each trial's runs
nested under it (`tracking.parent_run_id`); the parent gets the trials' values and the best preset. Files go to
`--out` (default runs/sweeps/<study>): trials/<study>-tNNNN[-fK]/ (run directories, .log files), folds/,
and best.yaml: PRESET with key=value and the best trial's values, a preset for `python -m trainer --config`.

Exit status: 0 done, 2 a user error (the space, the config, the storage), 1 too many failed trials in a row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from trainer.config import ConfigError, load_config, load_yaml, resolve_config_path
from trainer.errors import UserError

HEARTBEAT_S = 15.0  # a running trial's heartbeat (user attr sweep.heartbeat) is refreshed this often
POLL_S = 0.5  # how often a running trial's summary.json is read
STOP_WAIT_S = 60.0  # a trainer asked to stop (SIGTERM) gets this long before SIGKILL
PARENT_WAIT_S = 120.0  # a worker that did not create the study waits this long for the creator's parent run


class SweepError(UserError):
    """A bad space, storage or option: one line, exit 2."""


class TrialFailed(Exception):
    """The trainer of a trial exited non-zero or was killed."""


# ----------------------------------------------------------------------------- the search space

DIST_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
             "categorical": {"choices"}}


def read_space(path: str) -> dict[str, dict]:
    """{config key: {type, low, high, log, step | choices}} from SPACE.yaml. Raises SweepError naming the key."""
    try:
        with open(path) as f:
            space = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"--space {path}: cannot read it ({str(e).splitlines()[0]})") from None
    if not isinstance(space, dict) or not space:
        raise SweepError(f"--space {path}: a mapping of config keys to distributions, e.g. "
                         "'optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}'")
    for key, spec in space.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in DIST_KEYS:
            raise SweepError(f"--space {path}: {key}: 'type' must be float, int or categorical, got {spec!r}")
        extra = set(spec) - DIST_KEYS[kind] - {"type"}
        if extra:
            raise SweepError(f"--space {path}: {key}: unknown fields {sorted(extra)} for type {kind}")
        if kind == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise SweepError(f"--space {path}: {key}: categorical needs a non-empty list 'choices'")
        else:
            for k in ("low", "high", "step"):  # YAML 1.1 reads 1e-4 (no dot) as a string
                if isinstance(spec.get(k), str):
                    with contextlib.suppress(ValueError):
                        spec[k] = float(spec[k])
            low, high = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
                raise SweepError(f"--space {path}: {key}: {kind} needs numbers low <= high, got {low!r}, {high!r}")
            if spec.get("log") and low <= 0:
                raise SweepError(f"--space {path}: {key}: log needs low > 0, got {low}")
    return space


def corners(space: dict) -> list[dict]:
    """Two assignments (all lows / first choices, all highs / last choices) to check the keys against the schema."""
    lo = {k: s["choices"][0] if s["type"] == "categorical" else s["low"] for k, s in space.items()}
    hi = {k: s["choices"][-1] if s["type"] == "categorical" else s["high"] for k, s in space.items()}
    return [lo, hi]


def suggest(trial, space: dict) -> dict:
    """The trial's value for every key of the space."""
    out = {}
    for key, s in space.items():
        if s["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, s["choices"])
        elif s["type"] == "int":
            out[key] = trial.suggest_int(key, int(s["low"]), int(s["high"]), step=int(s.get("step") or 1),
                                         log=bool(s.get("log")))
        else:
            out[key] = trial.suggest_float(key, float(s["low"]), float(s["high"]), step=s.get("step"),
                                           log=bool(s.get("log")))
    return out


def as_overrides(params: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in params.items()]


# ----------------------------------------------------------------------------- storage, sampler, pruner


def open_storage(url: str):
    """An RDB URL (has '://') or a journal file path (Optuna's JournalStorage with a file backend)."""
    import optuna
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def make_sampler(name: str, seed: int | None, startup_trials: int):
    import optuna
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str, startup_trials: int, warmup_steps: int, max_resource: int):
    import optuna
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_steps), max_resource=max_resource)
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Sweep:
    """What every trial of this worker shares."""
    preset: str
    overrides: list[str]  # the user's key=value
    space: dict
    study_name: str
    out: str
    metric: str  # eval.select_metric
    epochs: int
    folds: list[list[str]] = field(default_factory=list)  # per fold: data.* overrides; [] = the config's own val split
    tracking: list[str] = field(default_factory=list)  # tracking.* overrides of every trial (parent run, store)
    timeout_s: float = 0.0
    log: object = print

    def trial_runs(self, number: int, params: dict) -> list[tuple[str, list[str]]]:
        """(run name, trainer arguments) per fold of trial `number`."""
        runs = []
        for k, data in enumerate(self.folds or [{}]):
            name = f"{self.study_name}-t{number:04d}" + (f"-f{k}" if self.folds else "")
            args = ["--config", self.preset, *self.overrides, *as_overrides(params), *data,
                    f"run.output_dir={os.path.join(self.out, 'trials')}", f"run.name={name}", "eval.test=false",
                    "checkpoint.resume=false", *self.tracking, f"tracking.run_name={name}"]
            runs.append((name, args))
        return runs


def best_val(summary_path: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, value of `metric`) of every val evaluation in a run's summary.json so far."""
    try:
        with open(summary_path) as f:
            evaluations = json.load(f).get("evaluations", [])
    except (OSError, ValueError):
        return []
    return [(int(e["epoch"]), float(e["metrics"][metric])) for e in evaluations
            if e.get("split") == "val" and metric in e.get("metrics", {})]


def run_fold(sweep: Sweep, trial, fold: int, name: str, args: list[str]) -> float:
    """One trainer run of a trial; reports its val evaluations to the pruner as they come. Returns its best val
    value. Raises optuna.TrialPruned (the trainer stopped) or TrialFailed."""
    import optuna
    run_dir = os.path.join(sweep.out, "trials", name)
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        os.remove(summary)  # a run of an earlier attempt with this name (checkpoint.resume=false moves the rest)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    log_path = run_dir + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_worker(os.getpid()))
    trial.storage.set_trial_user_attr(trial._trial_id, "sweep.pid", proc.pid)
    reported, beat, t0 = set(), 0.0, time.monotonic()
    try:
        while True:
            done = proc.poll() is not None
            for epoch, value in best_val(summary, sweep.metric):
                step = fold * (sweep.epochs + 1) + epoch
                if step in reported:
                    continue
                reported.add(step)
                trial.report(value, step)
                if trial.should_prune():
                    stop(proc)
                    raise optuna.TrialPruned(f"pruned at fold {fold} epoch {epoch}: val {sweep.metric} {value:.4f}")
            if done:
                break
            if time.monotonic() - beat > HEARTBEAT_S:
                beat = time.monotonic()
                trial.storage.set_trial_user_attr(trial._trial_id, "sweep.heartbeat", time.time())
            if sweep.timeout_s and time.monotonic() - t0 > sweep.timeout_s:
                stop(proc)
                raise TrialFailed(f"{name}: over --trial-timeout-s {sweep.timeout_s:g}; stopped (log {log_path})")
            time.sleep(POLL_S)
    except BaseException:
        if proc.poll() is None:
            stop(proc)
        raise
    values = [v for _, v in best_val(summary, sweep.metric)]
    if proc.returncode != 0 or not values:
        why = f"exit {proc.returncode}" if proc.returncode != 0 else "no val evaluation recorded"
        raise TrialFailed(f"{name}: trainer {why}: {last_line(log_path)} (log {log_path})")
    return max(values)


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else "(no output)"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the trainer's process group (it checkpoints and exits), SIGKILL after STOP_WAIT_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _die_with_worker(worker: int):
    def setup():
        from data_shards.workers import die_with_parent
        die_with_parent(signal.SIGTERM, parent=worker)
    return setup


def run_trial(sweep: Sweep, trial) -> float:
    """The objective: the mean over the folds of each run's best val value."""
    params = suggest(trial, sweep.space)
    values = []
    for fold, (name, args) in enumerate(sweep.trial_runs(trial.number, params)):
        values.append(run_fold(sweep, trial, fold, name, args))
        trial.set_user_attr("fold_values", values)
    return float(sum(values) / len(values))


# ----------------------------------------------------------------------------- workers sharing one study


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_stale(study, grace_s: float, log) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is gone: on this host its process is dead, elsewhere its heartbeat
    is older than `grace_s`. Returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = str(t.user_attrs.get("sweep.worker", ""))
        w_host, _, w_pid = who.rpartition(":")
        beat = float(t.user_attrs.get("sweep.heartbeat", t.datetime_start.timestamp() if t.datetime_start else 0))
        gone = (w_host == host and w_pid.isdigit() and not _alive(int(w_pid))) or time.time() - beat > grace_s
        if not gone:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "sweep.failed", f"its worker {who} stopped mid-trial")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue
        failed.append(t.number)
        log(f"trial {t.number}: its worker {who} stopped mid-trial; marked FAIL")
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def budget_lock(storage_url: str):
    """Counting the trials and asking for one is atomic between the workers of a journal file (a lock file beside
    it); with an RDB two workers asking at the same instant may run one trial more than --trials."""
    if "://" in storage_url:
        return contextlib.nullcontext()
    from filelock import FileLock
    return FileLock(os.path.abspath(storage_url) + ".sweep-lock")


def next_trial(study, budget: int, storage_url: str):
    """A new (or an enqueued) trial, or None once the study holds `budget` trials that completed, were pruned or are
    running."""
    from optuna.trial import TrialState
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    with budget_lock(storage_url):
        n = len(study.get_trials(deepcopy=False, states=counted))
        if n >= budget:
            return None
        trial = study.ask()
        trial.set_user_attr("sweep.worker", worker_id())
        trial.set_user_attr("sweep.heartbeat", time.time())
        return trial


def open_study(args, sampler, pruner, log):
    """Create the study (this worker then makes the MLflow parent run and enqueues --enqueue) or load it.
    Returns (study, created)."""
    import optuna
    storage = open_storage(args.storage)
    try:
        study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=False)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=args.study, storage=storage, sampler=sampler, pruner=pruner)
        log(f"study {args.study}: continuing ({len(study.trials)} trials so far)")
        return study, False


# ----------------------------------------------------------------------------- MLflow parent run


def parent_run(study, created: bool, cfg, out: str, params: dict) -> tuple[str, str] | None:
    """(tracking URI, parent run id) of the study, or None when the config's tracking is off."""
    if not cfg.tracking.enabled:
        return None
    from trainer.tracking.store import Store, resolve_tracking_uri
    trials_dir = os.path.join(out, "trials")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, os.path.join(trials_dir, "x"))
    if created:
        store = Store(uri, artifact_root=os.path.join(trials_dir, "mlartifacts") if uri.startswith("sqlite") else None)
        run_id = store.ensure_run(cfg.tracking.experiment or "proxygml", study.study_name, None)
        store.client.set_tag(run_id, "sweep.study", study.study_name)
        for k, v in params.items():
            store.client.log_param(run_id, k, str(v)[:6000])
        study.set_user_attr("mlflow_parent_run_id", run_id)
        study.set_user_attr("mlflow_tracking_uri", uri)
        return uri, run_id
    deadline = time.monotonic() + PARENT_WAIT_S
    while time.monotonic() < deadline:
        attrs = study.user_attrs
        if "mlflow_parent_run_id" in attrs:
            return attrs["mlflow_tracking_uri"], attrs["mlflow_parent_run_id"]
        time.sleep(1.0)
    raise SweepError(f"study {study.study_name}: no MLflow parent run recorded by the worker that created it "
                     f"within {PARENT_WAIT_S:.0f} s; is tracking enabled there?")


def log_parent(tracking, study, best_path: str | None, finished: bool) -> None:
    """The trials' values and the best so far as metrics of the parent run (step = trial number)."""
    if tracking is None:
        return
    from optuna.trial import TrialState

    from trainer.tracking.store import Store
    store = Store(tracking[0])
    run_id = tracking[1]
    best = -math.inf
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        best = max(best, t.value)
        store.client.log_metric(run_id, "trial_value", t.value, step=t.number)
        store.client.log_metric(run_id, "best_value", best, step=t.number)
    if best_path:
        store.client.log_artifact(run_id, best_path)
    if finished:
        store.client.set_terminated(run_id, "FINISHED")


# ----------------------------------------------------------------------------- folds and the best preset


def prepare_folds(cfg, k: int, seed: int, out: str) -> list[list[str]]:
    """K fold data roots (train / val of the train classes, the val split's joined in; test linked, never read
    beyond its manifest) under <out>/folds/, written once (a lock file for concurrent workers). Returns the
    data.* overrides of each fold."""
    from filelock import FileLock

    from data_shards import read_manifest
    from data_shards.holdout import class_folds, write_class_splits
    root = cfg.data.root
    sources = [os.path.join(root, cfg.data.train_split)]
    if cfg.data.val_split:
        sources.append(os.path.join(root, cfg.data.val_split))
    if cfg.data.prepare == "digits" and not os.path.exists(os.path.join(sources[0], "manifest.json")):
        from trainer.demo import write_digits_shards
        os.makedirs(root, exist_ok=True)
        with FileLock(os.path.join(root, ".prepare.lock")):
            if not os.path.exists(os.path.join(sources[0], "manifest.json")):
                write_digits_shards(root)
    names = [n for s in sources for n in read_manifest(s).class_names]
    folds = class_folds(names, k, seed)
    base = os.path.join(out, "folds", f"k{k}-seed{seed}")
    os.makedirs(base, exist_ok=True)
    test = os.path.abspath(os.path.join(root, cfg.data.test_split))
    overrides = []
    with FileLock(base + ".lock"):
        for i, val in enumerate(folds):
            fold_root = os.path.join(base, f"fold-{i}")
            if not os.path.exists(os.path.join(fold_root, "val", "manifest.json")):
                train = [n for n in names if n not in set(val)]
                write_class_splits(sources, fold_root, {"train": train, "val": val})
            link = os.path.join(fold_root, "test")
            if not os.path.lexists(link):
                os.symlink(test, link)
            overrides.append([f"data.root={os.path.abspath(fold_root)}", "data.train_split=train",
                              "data.val_split=val", "data.test_split=test", "data.prepare=none"])
    return overrides


def write_best(study, preset: str, overrides: list[str], path: str, metric: str) -> str | None:
    """best.yaml: the preset file with key=value and the best trial's values (atomically). None before any
    trial completed."""
    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    from trainer.config_legacy import translate_override
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    best = max(done, key=lambda t: t.value)
    items = [new for item in [*overrides, *as_overrides(best.params)] for new in translate_override(item)[0]]
    cfg = OmegaConf.merge(load_yaml(resolve_config_path(preset)), OmegaConf.from_dotlist(items))
    head = (f"# Tuned by python -m trainer.sweep: study {study.study_name}, trial {best.number} of {len(done)} "
            f"completed, val {metric} {best.value:.4f}\n# (mean over folds: {best.user_attrs.get('fold_values')})\n"
            f"# from {preset} with: {' '.join([*overrides, *as_overrides(best.params)])}\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + OmegaConf.to_yaml(cfg))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file or preset name, as python -m trainer takes")
    p.add_argument("--space", required=True, help="YAML: config key -> {type, low, high, log | choices}")
    p.add_argument("--trials", type=int, required=True, help="trials of the study (completed, pruned or running)")
    p.add_argument("--storage", required=True, help="RDB URL (sqlite:///s.db, postgresql://...) or a journal file")
    p.add_argument("--study", default="", help="study name (default: the preset's name and the space file's)")
    p.add_argument("--out", default="", help="trial runs, folds, best.yaml (default runs/sweeps/<study>)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    p.add_argument("--startup-trials", type=int, default=10, help="TPE: random trials before it models (Optuna's 10)")
    p.add_argument("--seed", type=int, default=None, help="seed of this worker's sampler (give each worker its own)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--pruner-startup-trials", type=int, default=2, help="median: trials before any is pruned")
    p.add_argument("--pruner-warmup-steps", type=int, default=1, help="evaluations of a trial before it can be pruned")
    p.add_argument("--folds", type=int, default=0, help="K-fold over the train classes (0: the config's val split)")
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--enqueue", default="", help="YAML list of {key: value} trials to run first (e.g. a default)")
    p.add_argument("--trial-timeout-s", type=float, default=0.0, help="a trial running longer fails; 0 = none")
    p.add_argument("--grace-s", type=float, default=600.0,
                   help="a RUNNING trial of a worker on another host without heartbeat this long is marked FAIL")
    p.add_argument("--max-failures", type=int, default=3, help="stop this worker after this many failures in a row")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of every trial")
    args = p.parse_args(argv)
    if args.trials < 1 or args.folds == 1 or args.folds < 0 or args.max_failures < 1:
        p.error("--trials >= 1, --folds 0 or >= 2, --max-failures >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return sweep(args)
    except UserError as e:
        print(f"python -m trainer.sweep: error: {e}", file=sys.stderr)
        return 2


def sweep(args, log=print) -> int:
    import optuna
    from optuna.trial import TrialState
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = read_space(args.space)
    cfg = load_config(args.config, args.overrides)
    for corner in corners(space):  # every key of the space is a config key with a valid value
        try:
            load_config(args.config, [*args.overrides, *as_overrides(corner)])
        except ConfigError as e:
            raise SweepError(f"--space {args.space}: {e}") from None
    if not args.folds and not cfg.data.val_split:
        raise SweepError("a sweep scores trials on validation classes: give data.val_split=val (shards written with "
                         "python -m data_shards write ... --val-fraction 0.2) or --folds K")
    metric = cfg.eval.select_metric
    load_config(args.config, [*args.overrides, *(["data.val_split=val"] if args.folds else []), "eval.test=false"])
    name = args.study or (os.path.splitext(os.path.basename(args.config))[0] + "-"
                          + os.path.splitext(os.path.basename(args.space))[0])
    out = args.out or os.path.join("runs", "sweeps", name)
    os.makedirs(out, exist_ok=True)
    args.study = name
    sampler = make_sampler(args.sampler, args.seed, args.startup_trials)
    pruner = make_pruner(args.pruner, args.pruner_startup_trials, args.pruner_warmup_steps,
                         max(1, (args.folds or 1) * (cfg.train.epochs + 1)))
    try:
        study, created = open_study(args, sampler, pruner, log)
    except Exception as e:  # a storage that cannot be opened: the URL and the cause
        if isinstance(e, UserError):
            raise
        raise SweepError(f"--storage {args.storage}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if created and args.enqueue:
        with open(args.enqueue) as f:
            for params in yaml.safe_load(f) or []:
                study.enqueue_trial(params, skip_if_exists=True)
    tracking = parent_run(study, created, cfg, out, dict(preset=args.config, space=json.dumps(space),
                                                         trials=args.trials, sampler=args.sampler,
                                                         pruner=args.pruner, folds=args.folds, metric=metric,
                                                         overrides=" ".join(args.overrides)))
    folds = prepare_folds(cfg, args.folds, args.fold_seed, out) if args.folds else []
    track = [f"tracking.parent_run_id={tracking[1]}", f"tracking.tracking_uri={tracking[0]}"] if tracking else []
    sw = Sweep(args.config, list(args.overrides), space, name, out, metric, cfg.train.epochs, folds, track,
               args.trial_timeout_s, log)
    best_path = os.path.join(out, "best.yaml")
    failures = 0
    stopping: list = []
    old = signal.signal(signal.SIGTERM, lambda *_: _interrupt_once(stopping))
    try:
        while True:
            fail_stale(study, args.grace_s, log)
            trial = next_trial(study, args.trials, args.storage)
            if trial is None:
                break
            t0 = time.time()
            try:
                value = run_trial(sw, trial)
            except optuna.TrialPruned as e:
                tell(study, trial, state=TrialState.PRUNED)
                log(f"trial {trial.number} {trial.params}: {e}")
                failures = 0
                continue
            except TrialFailed as e:
                trial.set_user_attr("sweep.failed", str(e))
                tell(study, trial, state=TrialState.FAIL)
                log(f"trial {trial.number} {trial.params}: FAILED: {e}")
                failures += 1
                if failures >= args.max_failures:
                    log(f"{failures} trials in a row failed; this worker stops (see the logs in {out}/trials)")
                    return 1
                continue
            except BaseException:
                trial.set_user_attr("sweep.failed", "its worker was stopped")
                tell(study, trial, state=TrialState.FAIL)
                raise
            failures = 0
            tell(study, trial, values=value)
            log(f"trial {trial.number} {trial.params}: val {metric} {value:.4f} ({time.time() - t0:.0f} s)")
            write_best(study, args.config, args.overrides, best_path, metric)
    except KeyboardInterrupt:
        log("stopped: the running trial is marked FAIL; start the sweep again to continue")
        return 130 if not stopping else 143
    finally:
        signal.signal(signal.SIGTERM, old)
    path = write_best(study, args.config, args.overrides, best_path, metric)
    counted = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    log_parent(tracking, study, path, finished=len(counted) >= args.trials)
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    log(f"study {name}: " + ", ".join(f"{v} {k.lower()}" for k, v in states.items() if v))
    if path:
        best = study.best_trial
        log(f"best: trial {best.number}, val {metric} {best.value:.4f}, {best.params} -> {path}")
    return 0


def tell(study, trial, **kw) -> None:
    """study.tell, unless another worker has already marked the trial FAIL (it thought this worker gone)."""
    from optuna.exceptions import UpdateFinishedTrialError
    try:
        study.tell(trial, **kw)
    except (UpdateFinishedTrialError, RuntimeError, ValueError) as e:
        print(f"trial {trial.number}: not recorded ({e})", file=sys.stderr)


def _interrupt_once(stopping: list) -> None:
    """SIGTERM: stop the worker (the running trial is stopped and marked FAIL); a second one while stopping is
    ignored, so the trainer's own stop (SIGTERM, checkpoint) is waited for."""
    stopping.append(1)
    if len(stopping) == 1:
        raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
