"""Weights load exactly or not at all: every correct file form is accepted (and every backbone tensor then equals
the file's), every mismatched one is refused in one line naming the file, the count matched, the unmatched keys
on each side and the fix; no network (an unreachable source is one line within seconds)."""
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from trainer.config import load_config
from trainer.model import build_model
from trainer.weights import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RESNET = "{layers: [1, 1, 1, 1]}"


def resnet_cfg(path, *more):
    return load_config("demo", ["model.backbone=resnet18", f"model.backbone_kwargs={TINY_RESNET}",
                                "model.pretrained=true", f"model.weights_file={path}", *more]).model


def source_resnet(layers=(1, 1, 1, 1), seed=1):
    """A resnet with a classifier (as published files have) and non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = timm.create_model("resnet18", pretrained=False, layers=list(layers))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def assert_all_from(model, sd, prefix=""):
    got = model.backbone.net.state_dict()
    assert got, "no tensors"
    for k, v in got.items():
        if k.endswith("num_batches_tracked") and prefix + k not in sd:
            continue
        torch.testing.assert_close(v, sd[prefix + k], rtol=0, atol=0, msg=k)


def save(path, obj):
    torch.save(obj, path)
    return str(path)


def forms(tmp_path, sd):
    """name -> (file, prefix inside the dict where the weights are)."""
    no_fc = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    st = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    st_no_ext = tmp_path / "resnet_safetensors.bin"
    save_file(no_fc, str(st_no_ext))
    embedder_ckpt = {"model": {**{"backbone.net." + k: v for k, v in no_fc.items()},
                               "embedding.weight": torch.zeros(8, 512), "embedding.bias": torch.zeros(8)},
                     "criterion": {"proxies": torch.zeros(4, 8)}, "epoch": 3, "config": {"model": {"dim": 8}}}
    return {
        "state dict with classifier": save(tmp_path / "a.pth", sd),
        "state dict without classifier": save(tmp_path / "b.pth", no_fc),
        "safetensors": str(st),
        "safetensors, other extension": str(st_no_ext),
        "checkpoint dict {'state_dict': ...}": save(tmp_path / "c.pth", {"state_dict": sd, "epoch": 90, "arch": "r"}),
        "DDP prefix 'module.' under 'model'": save(tmp_path / "d.pth", {"model": {"module." + k: v
                                                                                  for k, v in sd.items()}}),
        "our trainer checkpoint (backbone.net.)": save(tmp_path / "e.pth", embedder_ckpt),
        "half precision": save(tmp_path / "f.pth", {k: v.half() if v.is_floating_point() else v
                                                    for k, v in sd.items()}),
    }


def test_every_correct_file_form_is_accepted_and_fills_every_tensor(tmp_path):
    sd = source_resnet()
    for name, path in forms(tmp_path, sd).items():
        model = build_model(resnet_cfg(path))
        assert model.loaded is not None and "all" in model.loaded.describe(), name
        ref = sd if name != "half precision" else {k: v.half().to(v.dtype) for k, v in sd.items()}
        assert_all_from(model, ref)
        assert model.loaded.matched == len([k for k in model.backbone.net.state_dict()
                                            if not k.endswith("num_batches_tracked")]), name


def refuse(path, *more, match=None):
    with pytest.raises(WeightsError) as e:
        build_model(resnet_cfg(path, *more))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.weights_file: "), msg
    if match:
        assert all(m in msg for m in match), msg
    return msg


def test_every_mismatched_file_is_refused_in_one_line(tmp_path):
    sd = source_resnet()
    n = len([k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")])
    # another architecture: resnet34's layout (more blocks) holds every resnet18-tiny key plus more
    deeper = save(tmp_path / "deeper.pth", source_resnet(layers=(2, 1, 1, 1)))
    refuse(deeper, match=[deeper, f"{n} of {n} tensors matched", "in the file only: layer1.1.", "Fix:",
                          "python -m trainer.weights fetch resnet18"])
    # another architecture entirely (a ViT's keys)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=1, num_heads=2)
    vit_file = save(tmp_path / "vit.pth", vit.state_dict())
    refuse(vit_file, match=[f"0 of {n} tensors matched", "missing from the file: conv1.weight", "cls_token"])
    # other shapes: the same names, another input (a grey-image model)
    grey = timm.create_model("resnet18", pretrained=False, layers=[1, 1, 1, 1], in_chans=1)
    refuse(save(tmp_path / "grey.pth", grey.state_dict()), match=[f"{n - 1} of {n} tensors matched", "shapes "
                                                                   "differ (file vs model): conv1.weight (64, 1, 7, 7) "
                                                                   "vs (64, 3, 7, 7)"])
    # a tensor missing
    partial = {k: v for k, v in sd.items() if k != "layer4.0.conv2.weight"}
    refuse(save(tmp_path / "partial.pth", partial), match=[f"{n - 1} of {n} tensors matched",
                                                           "missing from the file: layer4.0.conv2.weight"])
    # a file whose loading would run code
    refuse(save(tmp_path / "code.pth", {"state_dict": sd, "obj": Exploit()}), match=["loads without running code"])
    # no weights inside, and no file at all
    refuse(save(tmp_path / "empty.pth", {"epoch": 1, "optimizer": {"lr": 1}}), match=["holds no state dict"])
    refuse(str(tmp_path / "absent.pth"), match=["no file"])
    # model.pretrained=false does not make a given file ignored: it is loaded exactly, or refused
    refuse(deeper, "model.pretrained=false", match=["in the file only: layer1.1."])


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_vit_file_at_224_loads_into_a_vit_at_160(tmp_path):
    """timm's own adaptation of a file of the same architecture (the position embedding resampled) is applied."""
    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    src = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    path = save(tmp_path / "vit224.pth", src.state_dict())
    cfg = load_config("demo", ["model.backbone=vit_small_patch16_224", "model.pretrained=true",
                               f"model.weights_file={path}", "data.transform.image_size=160",
                               "data.transform.resize_size=160", "model.pooling=token",
                               "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2, img_size: 160}"]).model
    model = build_model(cfg)
    net = model.backbone.net
    assert net.pos_embed.shape == (1, 1 + 10 * 10, 32) and "unused (head.weight, head.bias)" in model.loaded.describe()
    torch.testing.assert_close(net.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(net.pos_embed[:, 0], src.pos_embed[:, 0])  # the class token's position, unchanged


def test_bninception_file_of_the_papers_form_loads(tmp_path):
    """The published file's form: flat names, the 1000-class last_linear, no num_batches_tracked (older torch)."""
    from trainer.bninception import BNInception
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v.float()) for k, v in BNInception().state_dict().items()
          if not k.endswith("num_batches_tracked")}
    sd["last_linear.weight"], sd["last_linear.bias"] = torch.randn(1000, 1024), torch.randn(1000)
    path = save(tmp_path / "bn_inception.pth", sd)
    model = build_model(load_config("cub200", ["data.root=x", f"model.weights_file={path}"]).model)
    for k, v in model.backbone.net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    assert "unused (last_linear.weight, last_linear.bias)" in model.loaded.describe()
    del sd["inception_5b_pool_proj_bn.running_var"]
    with pytest.raises(WeightsError, match="missing from the file: inception_5b_pool_proj_bn.running_var"):
        build_model(load_config("cub200", ["data.root=x", f"model.weights_file={save(tmp_path / 'x.pth', sd)}"]).model)


def offline_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME"))}
    env["PYTHONPATH"] = ROOT
    return env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["bninception", "resnet18"])
def test_unreachable_source_is_one_line_within_seconds(tmp_path, name):
    """No network and no cache: one line naming the key and the fetch command, exit 2, in seconds (HF_HUB_OFFLINE
    makes it certain here: the check does not even try the network; without it, a short reachability check)."""
    env = {**offline_env(), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "trainer", "--config", "demo", f"model.backbone={name}",
                        "model.pretrained=true", "data.transform.image_size=64", "data.transform.resize_size=64",
                        f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=100, cwd=ROOT,
                       env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.pretrained: the weights of " + name), p.stderr
    assert f"python -m trainer.weights fetch {name} --out" in lines[0] and "model.weights_file=" in lines[0]
    assert time.monotonic() - start < 60
    assert not os.path.exists(tmp_path / "digits-shards"), "refused before any data work"


def test_fetch_and_check_commands(tmp_path, monkeypatch, capsys):
    from trainer.weights import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["fetch", "resnet18", "--out", str(tmp_path / "r.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fetch resnet18: its weights come from huggingface.co" in err
    assert not os.path.exists(tmp_path / "r.pth")
    sd = source_resnet(layers=(2, 2, 2, 2))
    good = save(tmp_path / "good.pth", {"state_dict": sd})
    assert main(["check", "resnet18", good]) == 0
    n = len([k for k in sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")])
    assert f"all {n} backbone tensors matched" in capsys.readouterr().out
    assert main(["check", "resnet34", good]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FILE: " + good + " does not fit resnet34" in err


@pytest.mark.timeout(60)
def test_reachable_is_bounded_and_tells_why():
    """A real HTTP server on 127.0.0.1 answers; a closed port and a server that never answers are told in words,
    the latter within the timeout (plus a second)."""
    import http.server
    import socket
    import threading

    from trainer.weights import reachable

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404 if self.path == "/missing" else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # connects, never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        assert reachable(f"http://127.0.0.1:{server.server_port}/file.pth") is None
        assert reachable(f"http://127.0.0.1:{server.server_port}/missing") == "HTTP 404 Not Found"
        assert "refused" in reachable(f"http://127.0.0.1:{closed_port}/x", timeout=2).lower()
        start = time.monotonic()
        why = reachable(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=1)
        assert why and ("timed out" in why.lower() or "no answer" in why)
        assert time.monotonic() - start < 2.5
    finally:
        server.shutdown()
        silent.close()


def test_a_weights_file_is_never_ignored_also_with_pretrained_false(tmp_path):
    """The demo's small_cnn with model.pretrained=false: a given file is loaded in full, a file that does not fit
    is refused, and a pickle that would run code is refused naming what it holds, without torch's advice to load
    it with weights_only=False."""
    donor = build_model(load_config("demo", ["data.root=x"]).model)
    sd = {k: v.clone() for k, v in donor.backbone.state_dict().items()}
    good = tmp_path / "small.pth"
    torch.save(sd, good)
    model = build_model(load_config("demo", ["data.root=x", f"model.weights_file={good}"]).model)
    assert model.loaded is not None
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    wide = tmp_path / "wide.pth"
    torch.save(build_model(load_config("demo", ["data.root=x", "model.small_cnn_width=8"]).model)
               .backbone.state_dict(), wide)
    with pytest.raises(WeightsError, match="does not fit small_cnn"):
        build_model(load_config("demo", ["data.root=x", f"model.weights_file={wide}"]).model)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": Payload()}, evil)
    with pytest.raises(WeightsError) as e:
        build_model(load_config("demo", ["data.root=x", f"model.weights_file={evil}"]).model)
    assert "system" in str(e.value) and "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()
