"""The loss section's old flat spelling (`loss.name`, `loss.r`, `loss.kwargs`, ...) still loads from YAML files,
`key=value` overrides and checkpoint configs, into exactly the config today's spelling gives
(trainer/config_legacy.py); errors name the keys as written."""
import copy
from pathlib import Path

import pytest

from trainer.config import ConfigError, from_dict, load_config, to_dict
from trainer.config_legacy import translate_config
from trainer.resume import check_resume

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"
OLD_DEMO_LOSS = "loss:\n  proxies_per_class: 4\n  r: 0.25\n  lam: 0.3\n"


def old_spelling(config: dict) -> dict:
    """A config dict as checkpoints wrote it before loss families (the inverse of the translation, by hand)."""
    old = copy.deepcopy(config)
    loss = old["loss"]
    new_pml, new_proxygml = loss.pop("pml"), loss.pop("proxygml")
    family = loss.pop("family")
    loss["name"] = "proxygml" if family == "proxygml" else new_pml["name"]
    loss.update({k: v for k, v in new_pml.items() if k != "name"})
    loss.update(new_proxygml)
    return old


def test_an_old_yaml_file_loads_as_the_new_one(tmp_path):
    preset = (CONFIGS / "demo.yaml").read_text()
    start = preset.index("loss:\n")
    end = preset.index("optim:\n")
    old = tmp_path / "old.yaml"
    old.write_text(preset[:start] + OLD_DEMO_LOSS + preset[end:])
    assert "family" not in old.read_text() and "proxygml:" not in old.read_text()
    assert to_dict(load_config(str(old), ["data.root=x"])) == to_dict(load_config("demo", ["data.root=x"]))
    pml = tmp_path / "pml.yaml"
    pml.write_text("data:\n  root: x\nloss:\n  name: MultiSimilarityLoss\n  miner: MultiSimilarityMiner\n"
                   "  kwargs: {alpha: 2}\n  scale: 1.0\n")
    cfg = load_config(str(pml))
    assert (cfg.loss.family, cfg.loss.pml.name, cfg.loss.pml.miner, dict(cfg.loss.pml.kwargs)) == \
        ("pml", "MultiSimilarityLoss", "MultiSimilarityMiner", {"alpha": 2})


@pytest.mark.parametrize("old, new", [
    (["loss.r=0.5", "loss.scale=4", "loss.proxies_per_class=2", "loss.pos_mask=false"],
     ["loss.proxygml.r=0.5", "loss.proxygml.scale=4", "loss.proxygml.proxies_per_class=2",
      "loss.proxygml.pos_mask=false"]),
    (["loss.name=ProxyAnchorLoss", "loss.kwargs.margin=0.2", "loss.mode=local"],
     ["loss.family=pml", "loss.pml.name=ProxyAnchorLoss", "loss.pml.kwargs.margin=0.2", "loss.mode=local"]),
    (["loss.name=MultiSimilarityLoss", "loss.miner=MultiSimilarityMiner", "loss.miner_kwargs.epsilon=0.2"],
     ["loss.family=pml", "loss.pml.name=MultiSimilarityLoss", "loss.pml.miner=MultiSimilarityMiner",
      "loss.pml.miner_kwargs.epsilon=0.2"]),
    (["loss.name=proxygml", "loss.lam=0"], ["loss.family=proxygml", "loss.proxygml.lam=0"]),
])
def test_old_overrides_give_the_new_config(old, new):
    assert to_dict(load_config("demo", ["data.root=x", *old])) == to_dict(load_config("demo", ["data.root=x", *new]))


@pytest.mark.parametrize("overrides", [["loss.family=pml", "loss.pml.name=TripletMarginLoss",
                                        "loss.pml.kwargs.margin=0.1"], ["loss.mode=local"]])
def test_an_old_checkpoint_config_loads_and_resumes_unchanged(overrides):
    cfg = load_config("demo", ["data.root=x", *overrides])
    saved = old_spelling(to_dict(cfg))
    assert "family" not in saved["loss"] and "name" in saved["loss"]
    assert translate_config(saved) != saved
    assert to_dict(from_dict(saved)) == to_dict(cfg)
    assert check_resume(saved, cfg, "step-4.pt", at_epoch_start=True) == []


def test_a_resume_from_an_old_checkpoint_still_refuses_a_fixed_change():
    saved = old_spelling(to_dict(load_config("demo", ["data.root=x"])))
    now = load_config("demo", ["data.root=x", "loss.proxygml.proxies_per_class=2"])
    with pytest.raises(ConfigError, match=r"^loss.proxygml.proxies_per_class: the checkpoint step-4.pt was written "
                                          r"with loss.proxygml.proxies_per_class=4, now 2: the saved proxy table"):
        check_resume(saved, now, "step-4.pt", at_epoch_start=True)
    other = load_config("demo", ["data.root=x", "loss.family=pml", "loss.pml.name=ProxyAnchorLoss"])
    with pytest.raises(ConfigError, match="^loss.family: .* now 'pml': the saved criterion is another loss"):
        check_resume(saved, other, "step-4.pt", at_epoch_start=True)


def test_errors_name_the_key_as_written():
    with pytest.raises(ConfigError, match=r"^loss.r: must be in \(0, 1\], got 3.0 \(loss.r is loss.proxygml.r now\)$"):
        load_config("demo", ["data.root=x", "loss.r=3"])
    with pytest.raises(ConfigError, match=r"^loss.proxygml.r: must be in \(0, 1\], got 3.0$"):
        load_config("demo", ["data.root=x", "loss.proxygml.r=3"])


def test_a_key_of_another_family_on_the_command_line_is_refused_a_preset_section_is_not():
    with pytest.raises(ConfigError, match="^loss.pml.miner: a setting of loss.family=pml, and this run's "
                                          "loss.family is 'proxygml'"):
        load_config("demo", ["data.root=x", "loss.pml.miner=MultiSimilarityMiner"])
    with pytest.raises(ConfigError, match="^loss.proxygml.scale: a setting of loss.family=proxygml"):
        load_config("demo", ["data.root=x", "loss.family=pml", "loss.pml.name=ProxyAnchorLoss",
                             "loss.proxygml.scale=4"])
    cfg = load_config("cub200-tuned", ["data.root=x", "loss.family=pml", "loss.pml.name=ProxyAnchorLoss"])
    assert cfg.loss.proxygml.scale == 9.4  # the preset's ProxyGML section rides along, unused


def test_a_mode_the_family_does_not_offer_is_refused():
    with pytest.raises(ConfigError, match="^loss.mode: 'sharded' is not a mode of loss.family='pml'; it takes "
                                          "'gather', 'local'$"):
        load_config("demo", ["data.root=x", "loss.family=pml", "loss.pml.name=ProxyAnchorLoss", "loss.mode=sharded"])
