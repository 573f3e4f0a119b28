"""The documentation's configuration reference is generated from the schema at every site build
(trainer/config_reference.py, docs/_hooks/config_reference.py): every key, with its default, allowed values and
comment, and nothing that is not a key."""
from omegaconf import OmegaConf

from trainer.config import CHOICES, Config
from trainer.config_reference import markdown, schema_keys


def leaf_keys(node, prefix=""):
    out = {}
    for k in node:
        v = node._get_node(k)
        if OmegaConf.is_dict(v) and not k.endswith("kwargs"):
            out.update(leaf_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_every_key_of_the_schema_is_in_the_reference_once_with_its_default():
    schema = leaf_keys(OmegaConf.structured(Config))
    keys = {k.key: k for k in schema_keys()}
    assert set(keys) == set(schema) and len(keys) == len(schema_keys())
    page = markdown()
    for key, k in keys.items():
        assert page.count(f"| `{key}` |") == 1, key
        node = schema[key]
        if node._is_missing():
            assert k.default == "(required)", key
        else:
            value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node._value()
            want = str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) \
                else str(value)
            assert k.default == want, (key, k.default, want)


def test_allowed_values_and_comments_come_from_the_code():
    keys = {k.key: k for k in schema_keys()}
    for key, choices in CHOICES.items():
        assert keys[key].allowed == " | ".join(choices), key
    assert keys["loss.proxygml.r"].allowed == "> 0, <= 1" and keys["data.num_workers"].allowed == ">= 0"
    assert keys["loss.proxygml.lam"].comment == "weight of the proxy loss L_P"
    assert keys["data.persistent_workers"].comment.endswith("new ones each epoch and evaluation")  # continued
    assert keys["run.dist_backend"].comment.startswith("auto: nccl on cuda")  # the line above the field
    assert keys["data.transform.resize_size"].allowed == "`resize_size >= image_size`"
    assert "'bilinear'" in keys["data.transform.interpolation"].allowed
    assert keys["data.root"].default == "(required)"
    assert "&lt;root&gt;/train" in markdown()  # no raw angle brackets: they would be HTML tags
