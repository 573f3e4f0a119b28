"""launch/ and the Dockerfile without starting a training job: lint, syntax, argument errors, consistency."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "local_cluster.sh", "build_image.sh"]


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", read("Dockerfile"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -r requirements-dev.txt)")
    r = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = os.path.join(LAUNCH, script)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dockerfile_base_cuda_matches_the_pinned_torch():
    """The base image's CUDA is the CUDA of the torch that requirements.txt installs (the one in this env)."""
    pin = re.search(r"^torch==(\S+)", read("requirements.txt"), re.M).group(1)
    assert torch.__version__.split("+")[0] == pin, "the environment's torch is not requirements.txt's"
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-", read("Dockerfile"), re.M)
    assert base, "Dockerfile: ARG CUDA_IMAGE=nvidia/cuda:<major>.<minor>.<patch>-... expected"
    assert torch.version.cuda is not None, "requirements.txt's torch should be a CUDA build"
    assert ".".join(base.groups()) == ".".join(torch.version.cuda.split(".")[:2])


def test_dockerfile_installs_requirements_like_ci():
    runs = [args for ins, args in dockerfile_instructions() if ins == "RUN"]
    assert any(re.search(r"pip install .*-r requirements\.txt", r) for r in runs)
    assert any("--no-deps" in r and "-e ." in r for r in runs), "the project itself, as .ci/run installs it"
    ci = read(".ci/run")
    assert "-r requirements.txt" in ci and "--no-deps" in ci  # the same two steps CI takes


def test_dockerfile_runs_as_non_root_with_a_torchrun_entrypoint():
    ins = dockerfile_instructions()
    user = [args for name, args in ins if name == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = [args for name, args in ins if name == "ENTRYPOINT"][-1]
    script = re.search(r'"/opt/proxygml/(launch/[^"]+)"', entry).group(1)
    assert "launch.torchrun" in read(script)


def test_dockerignore_lets_through_everything_the_dockerfile_copies():
    rules = [line.strip() for line in read(".dockerignore").splitlines() if line.strip() and line[0] != "#"]

    def ignored(path: str) -> bool:  # docker's rule: the last matching pattern wins
        verdict = False
        for rule in rules:
            neg, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*"):
                verdict = not neg
        return verdict

    copies = [args.split()[:-1] for name, args in dockerfile_instructions() if name == "COPY"]
    sources = [src for srcs in copies for src in srcs if not src.startswith("--")]
    assert sources
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: no such path"
        assert not ignored(src), f".dockerignore hides {src}"
    for junk in (".git/config", "runs/x/checkpoints/step-000000001.pt", "mlflow.db", ".venv/bin/python",
                 "trainer/__pycache__/loop.cpython-311.pyc"):
        assert ignored(junk), f".dockerignore sends {junk} to the build"


def run_script(*args, env=None, timeout=30):
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    ([], "--endpoint HOST:PORT is required"),
    (["--endpoint", "node1"], "give HOST:PORT"),
    (["--endpoint", "node1:29500", "--nnodes", "two"], "--nnodes: give N or MIN:MAX"),
    (["--endpoint", "node1:29500", "--nnodes", "2", "--max-restarts", "-1"], "--max-restarts"),
    (["--endpoint", "node1:29500", "--nnodes", "2", "--config", "demo"], "unknown option --config"),
])
def test_multi_node_rejects_bad_arguments_by_name(args, message):
    r = run_script(os.path.join(LAUNCH, "multi_node.sh"), *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_multi_node_help_lists_its_options():
    r = run_script(os.path.join(LAUNCH, "multi_node.sh"), "--help")
    assert r.returncode == 0
    for option in ("--endpoint", "--nnodes", "--max-restarts", "--nproc-per-node", "--join-timeout"):
        assert option in r.stdout


def test_slurm_script_forwards_preemption_and_requeues():
    text = read("launch/slurm.sbatch")
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--ntasks-per-node=1" in directives  # one torchrun per node
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)  # to the batch shell
    assert "--requeue" in directives
    assert re.search(r"trap .*USR1", text) and "scontrol requeue" in text
    # the warning goes to the step's processes, never as SIGTERM to srun (srun would kill the step at once)
    assert "scancel --signal=TERM" in text and not re.search(r"kill -(TERM|15) \"?\$srun_pid", text)
    assert "scontrol show hostnames" in text  # the rendezvous endpoint is the first node


def test_slurm_script_outside_slurm_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch")], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode != 0 and "run this script with sbatch" in r.stderr


def test_pip_sources_lends_local_paths_under_run_and_leaves_urls(tmp_path):
    """build_image.sh's pip sources: local folders become mounts under /run/pip-build, URLs pass unchanged."""
    wheels = tmp_path / "wheels"
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    wheels.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(wheels),
               PIP_EXTRA_INDEX_URL=f"file://{index} https://mirror.example/simple")
    r = subprocess.run(["python3", os.path.join(LAUNCH, "pip_sources.py")], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert ["mount", str(wheels), "/run/pip-build/0"] in lines
    assert ["mount", str(tmp_path / "mirror"), "/run/pip-build/1"] in lines  # the index's parent: ../files
    assert ["arg", "PIP_FIND_LINKS", "/run/pip-build/0"] in lines
    assert ["arg", "PIP_EXTRA_INDEX_URL", "file:///run/pip-build/1/simple https://mirror.example/simple"] in lines
    assert not any(str(tmp_path) in line[2] for line in lines if line[0] == "arg")
