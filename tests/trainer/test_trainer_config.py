"""The config schema: presets load, CLI overrides merge, bad keys/types/values fail naming the key."""
import subprocess
import sys

import pytest

from trainer.config import ConfigError, check_world_size, from_dict, load_config, to_dict


@pytest.mark.parametrize("preset", ["cub200", "cars196", "sop", "omniglot", "folder", "demo"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.train.epochs > 0 and cfg.data.root


def test_paper_recipes():
    cub, cars, sop = (load_config(p) for p in ("cub200", "cars196", "sop"))
    for c in (cub, cars, sop):
        assert (c.train.batch_size, c.train.epochs, c.model.dim, c.loss.proxygml.r) == (32, 50, 512, 0.05)
        assert (c.optim.name, c.optim.eps, c.optim.weight_decay, c.optim.lr) == ("adam", 0.01, 1e-4, 1e-4)
        assert list(c.optim.lr_milestones) == [20, 40] and c.optim.lr_gamma == 0.1 and c.train.warmup_epochs == 1
    assert [c.loss.proxygml.proxies_per_class for c in (cub, cars, sop)] == [12, 12, 1]
    assert [c.loss.proxygml.lam for c in (cub, cars, sop)] == [0.3, 0.3, 0.0]
    assert [c.optim.proxy_lr for c in (cub, cars, sop)] == [0.03, 0.03, 0.3]
    assert [c.model.freeze_bn for c in (cub, cars, sop)] == [True, True, False]


def test_overrides_and_roundtrip():
    cfg = load_config("cub200", ["train.epochs=3", "loss.mode=local", "optim.lr_milestones=[1,2]"])
    assert cfg.train.epochs == 3 and cfg.loss.mode == "local" and list(cfg.optim.lr_milestones) == [1, 2]
    assert from_dict(to_dict(cfg)) == cfg
    assert load_config(None, ["data.root=x"]).loss.mode == "gather"


@pytest.mark.parametrize("overrides, key", [
    (["train.nope=1"], "train.nope"),
    (["nosection.x=1"], "nosection"),
    (["train.epochs=ten"], "train.epochs"),
    (["loss.mode=allreduce"], "loss.mode"),
    (["loss.r=0"], "loss.r"),
    (["train.batch_size=0"], "train.batch_size"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr_milestones=[40,20]"], "optim.lr_milestones"),
    (["data.transform.hflip=3"], "data.transform"),
    (["model.backbone=no_such_net"], "model.backbone"),
    (["train.warmup_epochs=50"], "train.warmup_epochs"),
    (["engine.name=horovod"], "engine.name"),
    (["run.dist_backend=mpi"], "run.dist_backend"),
    (["train.epochs"], "train.epochs"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        load_config("cub200", overrides)


def test_dist_backend_auto_follows_the_device_and_gloo_may_carry_cuda():
    import torch

    from trainer.distributed import pick_backend
    assert pick_backend("auto", torch.device("cpu")) == "gloo"
    assert pick_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert pick_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(RuntimeError, match="^run.dist_backend: 'nccl' needs a CUDA device"):
        pick_backend("nccl", torch.device("cpu"))


def test_missing_root_and_unknown_preset():
    with pytest.raises(ConfigError, match="^data.root: required"):
        load_config(None)
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_config("no_such_preset")


def test_global_batch_splits_over_ranks():
    cfg = load_config("cub200")
    assert check_world_size(cfg, 4) == 8
    with pytest.raises(ConfigError, match="^train.batch_size"):
        check_world_size(cfg, 3)


def test_cli_fails_before_work(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "demo", f"run.output_dir={tmp_path}",
                        "train.epochs=oops"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "train.epochs" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "true", "false", "y", "n", "Off", "NO"])
def test_yaml_boolean_words_stay_words_in_string_fields(word, tmp_path):
    """YAML 1.1 reads these words as booleans; a string field keeps the word, on the command line and in files."""
    cfg = load_config("demo", [f"run.name={word}", f"tracking.experiment={word}"])
    assert (cfg.run.name, cfg.tracking.experiment) == (word, word)
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: x\nrun:\n  name: {word}\n")
    assert load_config(str(path)).run.name == word


def test_documented_amp_off_is_accepted_and_bool_fields_still_read_words(tmp_path):
    assert load_config("demo", ["train.amp=off"]).train.amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: x\ntrain:\n  amp: off\nmodel:\n  pretrained: no\neval:\n  nmi: off\n"
                    "loss:\n  name: TripletMarginLoss\n  kwargs: {smooth_loss: yes}\n")
    cfg = load_config(str(path))
    assert cfg.train.amp == "off" and cfg.model.pretrained is False and cfg.eval.nmi is False
    assert cfg.loss.pml.kwargs == {"smooth_loss": True}  # a free dict: the word is a boolean there
    with pytest.raises(ConfigError, match="^train.amp: 'yes' is not one of"):
        load_config("demo", ["train.amp=yes"])  # a word, but not a legal value: refused as the word


def test_tracking_is_on_by_default():
    assert load_config("demo").tracking.enabled is True
