"""The one config schema: every knob of a run, as omegaconf structured dataclasses.

    cfg = load_config("trainer/configs/cub200.yaml", ["train.epochs=10", "loss.mode=local"])

Precedence: schema defaults < the YAML file < `key=value` overrides. Unknown keys, wrong types and
invalid values raise `ConfigError` naming the key, before any work starts. Each room reads its section.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, cast

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf._yaml import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

from data_shards.decode import DECODE_CHOICES
from data_shards.sampler import classes_per_batch
from data_shards.transforms import TransformConfig
from data_shards.verify import VERIFY
from loss import LossContext, families, get_family
from loss.family import MODES, in_range, non_negative, one_of, positive
from trainer.config_legacy import as_written, is_legacy, translate_config, translate_loss, translate_override
from trainer.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = "demo"


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message starts with the key."""


# A field's allowed values are written where it is declared (one_of, positive, non_negative, in_range: the
# helpers of loss/family.py, which the loss families' sections use too); validate() reads them from the schema.

def field_rules(cls: Any = None, prefix: str = "") -> dict[str, dict]:
    """{dotted key: metadata} of every schema field that declares allowed values."""
    cls = cls or schema()
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata:
            out[key] = dict(f.metadata)
        kind = hints.get(f.name)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and not issubclass(kind, TransformConfig):
            out.update(field_rules(kind, key + "."))
    return out


@dataclass
class RunConfig:
    name: str = "run"  # run directory: <output_dir>/<name>; checkpoints and config.yaml live there
    output_dir: str = "runs"
    seed: int = 0  # model init, data order (with epoch, rank, world size) and augmentation
    device: str = one_of("auto", "cpu", "cuda")  # auto (cuda if available, else cpu) | cpu | cuda
    # auto: nccl on cuda, gloo on cpu | gloo also carries CUDA tensors (e.g. two ranks sharing one GPU)
    dist_backend: str = one_of("auto", "nccl", "gloo")
    deterministic: bool = False  # torch.use_deterministic_algorithms; cudnn.benchmark off
    # seconds a rank waits in a collective for the others; then the job ends, naming the rank that stopped
    # answering and what it was doing. It must cover the longest stretch one rank works alone while the others
    # wait (rank 0's metrics after an evaluation, a checkpoint write, start-up)
    collective_timeout_s: int = positive(300)


AUTO = "auto"  # data.transform.mean / std / interpolation: from the backbone's pretrained config


@dataclass
class TransformKeys(TransformConfig):
    """data.transform: data_shards' TransformConfig, where mean, std and interpolation may also be `auto` (what the
    backbone's published weights expect; resolved when the config is loaded, so config.yaml holds the values)."""
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic | auto
    mean: Any = field(default_factory=lambda: [0.485, 0.456, 0.406])  # 3 numbers (in channel_order) | auto
    std: Any = field(default_factory=lambda: [0.229, 0.224, 0.225])  # 3 numbers | auto


@dataclass
class DataConfig:
    root: str = MISSING  # shards written by `python -m data_shards write`: <root>/train, <root>/test
    train_split: str = "train"
    test_split: str = "test"
    # "" = none (the test split is evaluated during training, as always) | e.g. "val": classes held out of the
    # train classes (data_shards write --val-classes/--val-fraction); evaluated during training, the best
    # checkpoint by eval.select_metric kept, the test split evaluated once at the end on it (trainer/selection.py)
    val_split: str = ""
    num_workers: int = non_negative(2)  # loader processes per rank
    # cpu: the loader workers decode + augment | gpu: they only read bytes; decode + augment run batched on the
    # CUDA device (data_shards/device_loader.py, gpu_transforms.py)
    decode: str = one_of("cpu", among=DECODE_CHOICES)
    prepare: str = one_of("none", "digits")  # digits: write the demo's shards first if <root> has none
    # shard checks against the manifest: quick (size + first sample at every shard open) | sha256 (also every
    # shard's hash, once per process at start-up) | off
    verify: str = one_of("quick", among=VERIFY)
    persistent_workers: bool = True  # true: the train and the evaluation loaders' workers (num_workers each)
    #                                  live for the whole run | false: new ones each epoch and evaluation
    draft_decode: bool = False  # true: JPEGs decoded at 1/2-1/8 size where the train crop allows | false
    # shuffle: a seeded shuffle buffer per reader | m_per_class: every per-rank batch holds data.m_per_class
    # samples of each of its batch/m classes (data_shards/stream.py)
    sampler: str = one_of("shuffle", "m_per_class")
    m_per_class: int = positive(4)  # samples per class in a batch; the per-rank batch must be a multiple of it
    sampler_window: int = positive(16)  # m_per_class: batches formed from one window of raw samples per reader
    transform: TransformKeys = field(default_factory=TransformKeys)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # a timm model name (with its .tag if wanted) | bninception (ours) | small_cnn
    # load the published ImageNet weights (a local cache, or a download when the source answers) unless
    # weights_file is set; either way every backbone tensor must come from them (trainer/weights.py)
    pretrained: bool = True
    # a weights file for offline machines: `python -m trainer.weights fetch NAME --out FILE` writes one; loaded
    # whenever it is given (also with pretrained=false), and it must fit the backbone in full
    weights_file: str = ""
    # avg | max | avgmax | catavgmax | token (a ViT's class token) go to timm's global_pool (the feature is timm's
    # forward_head(pre_logits=True)); gem: generalized mean over the feature map (ours)
    pooling: str = one_of("avg", "max", "avgmax", "catavgmax", "token", "gem")
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # to timm.create_model: img_size,
    #                                  dynamic_img_size, drop_path_rate, ...
    dim: int = positive(512)  # embedding size
    normalize: bool = True  # L2-normalise the embedding
    freeze_bn: bool = False  # BatchNorm in eval mode: running statistics stay the pretrained ones
    freeze_bn_affine: bool = True  # with freeze_bn, the BN weights and biases are frozen too (true: ours) or still
    #                                learn (false: the authors' released code)
    sync_bn: bool = False  # under DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    # the embedding layer: kaiming_normal (fan_out, zero bias: ours) | torch_default (nn.Linear's own init: the
    # authors' released code)
    embedding_init: str = one_of("kaiming_normal", "torch_default")
    small_cnn_width: int = positive(64)  # channels of the small_cnn backbone (demo, Omniglot)


@dataclass
class LossKeys:
    """loss: the family and the mode; then one section per registered loss family (loss/family.py), of which only
    `loss.<family>` is used (the schema adds them: schema())."""
    # proxygml | pml (a pytorch-metric-learning loss: loss.pml.name) | any family registered in loss/__init__.py
    family: str = "proxygml"
    # gather: all ranks' embeddings meet all proxies | local: each rank's own | sharded: proxies split by class
    # (ProxyGML); the family says which modes it takes
    mode: str = one_of("gather", among=MODES)


@dataclass
class OptimConfig:
    name: str = one_of("adam", "adamw", "sgd")  # adam | adamw | sgd
    lr: float = non_negative(1e-4)  # backbone learning rate
    head_lr: float = non_negative(1e-4)  # embedding layer
    proxy_lr: float = non_negative(0.03)  # ProxyGML proxies
    weight_decay: float = non_negative(1e-4)
    eps: float = non_negative(0.01)  # Adam epsilon (the authors use 0.01)
    momentum: float = non_negative(0.9)  # sgd only
    lr_milestones: list[int] = field(default_factory=lambda: [20, 40])  # epochs where all lrs x lr_gamma
    lr_gamma: float = in_range(0.1, 0, 1)
    # layer-wise lr decay (timm's layer grouping): the backbone's layer i of n learns at lr x layer_decay^(n - i),
    # biases and norms without weight decay; 1 = off (one backbone group)
    layer_decay: float = in_range(1.0, 0, 1)


@dataclass
class TrainConfig:
    epochs: int = positive(50)
    batch_size: int = positive(32)  # GLOBAL batch: each of the world_size ranks takes batch_size / world_size
    warmup_epochs: int = non_negative(1)  # first epochs train only the embedding head and the proxies
    amp: str = one_of("auto", "bf16", "off")  # auto: bf16 autocast on GPU, fp32 on CPU | bf16 | off
    compile: bool = False  # torch.compile the embedder's training forward (evaluation runs eagerly)
    grad_clip: float = non_negative(0.0)  # max grad norm; 0 = off
    log_every_steps: int = positive(10)  # progress-bar update cadence (loss, img/s)
    max_steps: int = non_negative(0)  # stop (with a checkpoint) after this many optimizer steps in total; 0 = no limit


@dataclass
class EvalConfig:
    every_epochs: int = non_negative(1)  # evaluate the test split every E epochs and after the last; 0 = at the end
    at_start: bool = False  # also evaluate before training (the demo prints before/after)
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # Recall@K values reported
    nmi: bool = True  # k-means NMI (faiss) on the test embeddings
    map_r: bool = True  # MAP@R and R-precision
    batch_size: int = positive(128)  # PER RANK (it only bounds memory; results do not depend on it)
    # with data.val_split: the val metric that picks the best checkpoint: map_at_r | r_precision | nmi |
    # recall_at_K (K in recall_ks); higher is better
    select_metric: str = "map_at_r"
    test: bool = True  # with data.val_split: evaluate the test split once at the end, on the best checkpoint |
    #                    false: never (hyperparameter search: the test classes stay untouched)


@dataclass
class CheckpointConfig:
    every_epochs: int = non_negative(1)  # save at the end of every E epochs (and always at the end of training)
    every_steps: int = non_negative(0)  # also save every S optimizer steps; 0 = off
    keep_last: int = positive(3)  # older checkpoints are deleted
    resume: bool = True  # continue from the latest checkpoint of the run directory, if there is one
    dir: str = ""  # default <run_dir>/checkpoints
    # dcp: step-N/ folders, every rank writes its own shards | torch: one step-N.pt written by rank 0
    format: str = one_of("dcp", "torch")
    async_save: bool = False  # dcp: write in a background thread while training goes on (the last save waits)


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow tracking on rank 0 (tests and benches that want none say enabled=false)
    # where the run is logged: registered tracking backends (trainer/tracking/backend.py), each its own queue
    backends: list[str] = field(default_factory=lambda: ["mlflow"])
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run.output_dir>/mlflow.db
    experiment: str = "proxygml"
    run_name: str = ""  # "" = run.name
    log_every_steps: int = non_negative(10)  # cadence of the training metrics sent to MLflow; 0 = off
    retrieval_grid_queries: int = non_negative(8)  # query rows in the logged retrieval picture; 0 = no picture
    parent_run_id: str = ""  # a nested run under this MLflow run (python -m trainer.sweep sets it per trial)


@dataclass
class EngineConfig:
    name: str = one_of("ddp", "deepspeed")  # ddp (plain DDP, also on 1 process) | deepspeed
    find_unused_parameters: bool = False  # DDP option
    deepspeed_config: str = ""  # JSON file for engine=deepspeed


@dataclass
class ConfigBase:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossKeys = field(default_factory=LossKeys)  # with the families' sections: schema()
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


_SCHEMAS: dict[tuple, type] = {}


def schema() -> type:
    """The config schema: ConfigBase whose `loss` holds LossKeys and a section `loss.<name>` for every registered
    loss family (loss/family.py), in registration order. Made once per set of registered families; `Config` and
    `LossConfig` (module attributes) are the schema of the families registered now."""
    registered = families()
    key = tuple((name, family.section) for name, family in registered.items())
    if key not in _SCHEMAS:
        loss = dataclasses.make_dataclass(
            "LossConfig", [(name, section, field(default_factory=section)) for name, section in key],
            bases=(LossKeys,))
        config = dataclasses.make_dataclass("Config", [("loss", loss, field(default_factory=loss))],
                                            bases=(ConfigBase,))
        loss.__module__ = config.__module__ = __name__
        _SCHEMAS[key] = config
    return _SCHEMAS[key]


def __getattr__(name: str) -> Any:  # PEP 562: the schema of the families registered now
    if name == "Config":
        return schema()
    if name == "LossConfig":
        return typing.get_type_hints(schema())["loss"]
    if name == "FIELD_RULES":  # {dotted key: allowed values}, e.g. "loss.mode": {"choices": (...)}
        return field_rules()
    if name == "CHOICES":
        return {k: r["choices"] for k, r in field_rules().items() if "choices" in r}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_config_path(name: str) -> str:
    """A file path, or the name of a preset in trainer/configs (`cub200` or `cub200.yaml`)."""
    if os.path.isfile(name):
        return name
    preset = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if os.path.isfile(preset):
        return preset
    presets = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"--config: no file {name!r} and no preset of that name (presets: {', '.join(presets)})")


def load_config(path: str | None = None, overrides: list[str] | tuple = (),
                aliases: dict[str, str] | None = None) -> DictConfig:
    """Schema defaults, merged with the YAML file and the `key=value` overrides; validated. The loss section's
    old flat spelling (`loss.name`, `loss.r`, ...) is translated (trainer/config_legacy.py); an error about a key
    so written names it as written. `aliases`, when given, is filled with {today's key: the old one written}, for
    errors found later (e.g. a resume's checks: `config_legacy.as_written`)."""
    aliases = {} if aliases is None else aliases
    try:
        return _load_config(path, overrides, aliases)
    except ConfigError as e:
        raise ConfigError(as_written(str(e), aliases)) from None


def _load_config(path: str | None, overrides: list[str] | tuple, aliases: dict[str, str]) -> DictConfig:
    cfg = OmegaConf.structured(schema())
    given: list[str] = []  # the keys the overrides set (today's spelling)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, load_yaml(resolve_config_path(path), aliases))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"{item}: overrides are key=value (e.g. train.epochs=10)")
            items, moved = translate_override(item)
            aliases.update(moved)
            for one in items:
                given.append(one.split("=", 1)[0].strip())
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([quote_bool_word(one)]))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except yaml.YAMLError as e:  # a file that is not YAML: where, in one line
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (TypeError, ValueError) as e:  # e.g. a YAML list where a mapping of sections is expected
        raise ConfigError(f"--config {path}: not a mapping of config sections ({e})") from None
    resolve_auto(cfg)
    validate(cfg)
    check_other_families(cfg, given)
    return cfg


def check_other_families(cfg: DictConfig, given: list[str]) -> None:
    """A key of another loss family's section given on the command line does nothing: refuse it. (Sections of
    other families that a file carries, e.g. a preset's `loss.proxygml` under `loss.family=pml`, are left alone.)"""
    active = cfg.loss.family
    for key in given:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "loss" and parts[1] in families() and parts[1] != active:
            key = ".".join(parts[:3])
            raise ConfigError(f"{key}: a setting of loss.family={parts[1]}, and this run's loss.family is "
                              f"{active!r}; set loss.family={parts[1]} or leave it out")


def resolve_auto(cfg: DictConfig) -> None:
    """Put the backbone's own mean, std and interpolation where data.transform says `auto` (trainer.model)."""
    t = cfg.data.transform
    keys = [k for k in ("mean", "std", "interpolation") if isinstance(t[k], str) and t[k] == AUTO]
    if not keys:
        return
    from trainer.backbones import backbone_defaults, check_backbone
    try:
        check_backbone(cfg.model.backbone)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    defaults = backbone_defaults(cfg.model.backbone)
    for k in keys:
        t[k] = defaults[k]


# ----------------------------------------------------------------------------- YAML 1.1 boolean words
# YAML 1.1 (PyYAML, so omegaconf) reads yes/no/on/off/y/n/true/false as booleans: `train.amp=off` would reach
# a string field as False (then "False"). Where the schema wants a string, the word itself is kept; elsewhere
# (bool fields, free dicts such as loss.kwargs) it stays a boolean.


class _BoolWord(str):
    """A YAML boolean word as written (`off`), remembering its boolean value."""

    value: bool


class _WordLoader(get_yaml_loader()):  # type: ignore[misc]  # omegaconf's loader class, made at run time
    """omegaconf's YAML loader, except that booleans come back as _BoolWord."""


def _construct_bool_word(loader, node) -> _BoolWord:
    word = _BoolWord(loader.construct_scalar(node))
    word.value = yaml.SafeLoader.bool_values[word.lower()]
    return word


_WordLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool_word)


def _schema_type(cls: Any, key: str) -> Any:
    """The annotated type of dotted `key` in the dataclass schema `cls` (None when not a schema field)."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def _unword(node: Any, kind: Any) -> Any:
    """`node` with every _BoolWord made a plain string where `kind` (a schema type) is str, a bool elsewhere."""
    if isinstance(node, _BoolWord):
        return str(node) if kind is str else node.value
    if isinstance(node, dict):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        return {k: _unword(v, hints.get(k)) for k, v in node.items()}
    if isinstance(node, list):
        args = typing.get_args(kind) if typing.get_origin(kind) is list else ()
        return [_unword(v, args[0] if args else None) for v in node]
    return node


def load_yaml(path: str, aliases: dict[str, str] | None = None) -> DictConfig:
    """A config file as omegaconf reads it, except that YAML boolean words stay words in string fields; a loss
    section in the old flat spelling is translated (the keys that moved are added to `aliases`)."""
    with open(path) as f:
        data = yaml.load(f, Loader=_WordLoader)
    if isinstance(data, dict) and is_legacy(data.get("loss")):
        data["loss"], moved = translate_loss(data["loss"])
        if aliases is not None:
            aliases.update(moved)
    return OmegaConf.create(_unword(data if data is not None else {}, schema()))


def quote_bool_word(item: str) -> str:
    """`key=value` with `value` quoted when it is a YAML boolean word and `key` a string field of the schema,
    so that `train.amp=off` sets the word `off` rather than False."""
    key, value = item.split("=", 1)
    try:
        parsed = yaml.load(value, Loader=_WordLoader)
    except yaml.YAMLError:
        return item
    if isinstance(parsed, _BoolWord) and _schema_type(schema(), key.strip()) is str:
        return f"{key}='{parsed}'"
    return item


def from_dict(d: dict) -> DictConfig:
    """A validated config from a plain dict (e.g. the `config` of a checkpoint, in today's or the old spelling)."""
    try:
        cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema()), OmegaConf.create(translate_config(d))))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    validate(cfg)
    return cfg


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    return f"{key}: {msg}" if key else msg


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key with a missing or invalid value."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required, give it in the YAML file or as {missing[0]}=...")
    check_finite(cfg)
    if not cfg.run.name or cfg.run.name in (".", "..") or "/" in cfg.run.name or os.sep in cfg.run.name:
        raise ConfigError(f"run.name: {cfg.run.name!r} must be a plain folder name (no '/', not '.' or '..'): "
                          f"the run directory is <run.output_dir>/<run.name>")
    get = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    for key, rule in field_rules().items():
        value = get(key)
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in rule['choices'])}")
        if "high" in rule and not rule["low"] < value <= rule["high"]:
            raise ConfigError(f"{key}: must be in ({rule['low']}, {rule['high']}], got {value}")
        if "low" in rule and rule["low_open"] and not value > rule["low"]:
            raise ConfigError(f"{key}: must be > {rule['low']}, got {value}")
        if "low" in rule and not rule["low_open"] and not value >= rule["low"]:
            raise ConfigError(f"{key}: must be >= {rule['low']}, got {value}")
    if any(m <= 0 for m in cfg.optim.lr_milestones) or list(cfg.optim.lr_milestones) != sorted(
            cfg.optim.lr_milestones):
        raise ConfigError(f"optim.lr_milestones: must be increasing positive epochs, got "
                          f"{list(cfg.optim.lr_milestones)}")
    if not cfg.eval.recall_ks or any(k <= 0 for k in cfg.eval.recall_ks):
        raise ConfigError(f"eval.recall_ks: must be positive integers, got {list(cfg.eval.recall_ks)}")
    if cfg.data.sampler == "m_per_class" and classes_per_batch(cfg.train.batch_size, cfg.data.m_per_class) is None:
        raise ConfigError(f"data.m_per_class: {cfg.data.m_per_class} does not divide train.batch_size="
                          f"{cfg.train.batch_size} (every batch holds batch/m classes of m samples each)")
    if cfg.train.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs: {cfg.train.warmup_epochs} leaves no epoch for the backbone "
                          f"(train.epochs={cfg.train.epochs})")
    check_loss(cfg)
    check_val_split(cfg)
    check_tracking(cfg)
    if cfg.engine.name == "deepspeed" and not cfg.engine.deepspeed_config:
        raise ConfigError("engine.deepspeed_config: required with engine.name=deepspeed")
    try:
        TransformConfig(**cast(dict, OmegaConf.to_container(cfg.data.transform)))
    except ValueError as e:
        raise ConfigError(f"data.transform: {e}") from None
    from trainer.backbones import OWN_BACKBONES, check_model  # each room checks its own part (the model: timm's)
    try:
        check_model(cfg.model, cfg.data.transform.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optim.layer_decay < 1 and cfg.model.backbone in OWN_BACKBONES:
        raise ConfigError(f"optim.layer_decay: needs a timm backbone (timm groups its layers), not "
                          f"{cfg.model.backbone!r}; give 1 (off)")


def check_val_split(cfg: DictConfig) -> None:
    """data.val_split, eval.select_metric and eval.test together (trainer/selection.py)."""
    d, e = cfg.data, cfg.eval
    if not d.val_split:
        if not e.test:
            raise ConfigError("eval.test: false needs a val split (data.val_split=val); without one the test split "
                              "is what the run evaluates")
        return
    if d.val_split in (d.train_split, d.test_split):
        raise ConfigError(f"data.val_split: {d.val_split!r} is also data.train_split or data.test_split; the val "
                          f"split is its own (python -m data_shards write ... --val-fraction 0.2 writes <root>/val)")
    m = e.select_metric
    ks = list(e.recall_ks)
    allowed = {"map_at_r": e.map_r, "r_precision": e.map_r, "nmi": e.nmi, **{f"recall_at_{k}": True for k in ks}}
    if not allowed.get(m, False):
        why = " (turned off: eval.map_r / eval.nmi)" if m in allowed else ""
        raise ConfigError(f"eval.select_metric: {m!r} is not a metric this run evaluates{why}; choose one of "
                          f"{', '.join(k for k, on in allowed.items() if on)}")


def check_finite(cfg: DictConfig) -> None:
    """Every float anywhere in the config (loss kwargs included) must be a finite number: inf and nan pass
    every `<`/`>` check (`nan < 0` is False) and then train silently or fail deep inside torch."""
    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")
            walk(v, key)
    walk(OmegaConf.to_container(cfg, resolve=True), "")


def check_tracking(cfg: DictConfig) -> None:
    """tracking.backends: registered backend names (trainer/tracking/backend.py), each once, at least one."""
    from trainer.tracking.backend import backends  # the registry (the package registers its backends first)
    names, registered = list(cfg.tracking.backends), backends()
    known = ", ".join(registered) or "none"
    for name in names:
        if name not in registered:
            raise ConfigError(f"tracking.backends: {name!r} is not a registered tracking backend (registered: {known})")
    if len(set(names)) != len(names):
        raise ConfigError(f"tracking.backends: {names} names a backend twice")
    if not names and cfg.tracking.enabled:
        raise ConfigError(f"tracking.backends: empty; give at least one of {known}, or tracking.enabled=false")


def check_loss(cfg: DictConfig) -> None:
    """loss.family is registered, loss.mode is one of its modes, and its section passes its own checks
    (loss/family.py; the pytorch-metric-learning family trains two toy steps: milliseconds)."""
    try:
        family = get_family(cfg.loss.family)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.loss.mode not in family.modes:
        raise ConfigError(f"loss.mode: {cfg.loss.mode!r} is not a mode of loss.family={family.name!r}; it takes "
                          f"{', '.join(repr(m) for m in family.modes)}")
    context = LossContext(dim=cfg.model.dim, sampler=cfg.data.sampler, m_per_class=cfg.data.m_per_class)
    try:
        family.validate(cfg.loss[family.name], cfg.loss.mode, context)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def amp_dtype(amp: str, device) -> Any:
    """What `train.amp` means on `device` (a torch.device): bfloat16 autocast (bf16, or auto on a GPU) or None
    (full float32). The one rule: the build step (loop, DeepSpeed engine) and the evaluation CLI take it from here."""
    import torch
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_world_size(cfg: DictConfig, world_size: int) -> int:
    """The per-rank batch; the global train.batch_size must split evenly over the ranks."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size: the global batch {cfg.train.batch_size} does not split "
                          f"evenly over {world_size} ranks")
    per_rank = cfg.train.batch_size // world_size
    if cfg.data.sampler == "m_per_class" and classes_per_batch(per_rank, cfg.data.m_per_class) is None:
        raise ConfigError(f"data.m_per_class: {cfg.data.m_per_class} does not divide the per-rank batch {per_rank} "
                          f"(train.batch_size={cfg.train.batch_size} over {world_size} ranks)")
    return cfg.train.batch_size // world_size


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML to print or write, credentials redacted (trainer/redact.py)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict to save or log (a checkpoint, MLflow), credentials redacted: a
    resumed run takes them again from its command line or the environment."""
    from trainer.redact import redact_tree
    return redact_tree(OmegaConf.to_container(cfg, resolve=True))
