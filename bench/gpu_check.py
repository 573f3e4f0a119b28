"""The GPU acceptance run: install the carried wheels, run every CUDA check, print one table, fail if one fails.

    bench/gpu_check.sh                       # on a lent GPU machine (H100/H200), < 8 min
    bench/gpu_check.sh --only pytest,loss    # some checks again (the wheels are always checked and installed)
    python bench/gpu_check.py --dry-run      # anywhere: the wheel check, the plan and an unfilled table

Steps, each a row or two of the table (check | result | figure | target), each with its own time limit inside
one budget (--budget-s, default 470 s): a step that fails, or runs past its limit, is a FAILED row and the
next step runs. Before anything, a machine without CUDA stops the run with one line (exit 2).
  wheels      .whl/ holds exactly bench/gpu_wheels.txt, one wheel each, all installable on CPython 3.12 x86-64
  install     pip install --no-index --no-deps --target SITE .whl/*.whl; later steps get PYTHONPATH=SITE:repo
  versions    the carried packages import at their manifest versions; the image's versions of our other pins
  pytest      pytest -m gpu: every CUDA test passes, none skipped
  loss        bench/loss_bench.py --device cuda (all cases but C=100k lam=0.3, whose dense run is ~40 s),
              then SOP lam=0.3 with TF32 and with bf16 autocast: ProxyGML SOP lam=0.3 forward+backward
              under 3 ms in the best of them
  throughput  bench/throughput.py, ResNet-50 batch 256 bf16, 4 loader workers: device decode >= 90% of the
              synthetic-tensor ceiling (cpu decode shown beside it)
  eval        bench/eval_bench.py --device cuda, SOP size: metric step under 1 s; whole evaluation (60,502
              ResNet-50 forward passes + metric step) under 10 s
  demo1       the demo, 1 epoch, decode=gpu, bf16, torch.compile, one process
  demo2       the same with two processes on the one GPU over NCCL; if NCCL refuses two ranks on one device
              (REFUSED, not a failure), again over gloo
Exit status: 0 if every row passed, 1 if any failed, 2 without CUDA or on bad arguments. Each step's output
goes to OUT/gpu_check.log (OUT: --out, default $OUT, else runs/gpu_check), the table to OUT/table.md and the
rows to OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "bench" / "gpu_wheels.txt"
# requirements.txt pins that the GPU image already holds (the device docs' package list of its 'cuda' image,
# read 2026-11-17); its versions may differ from our pins and are reported, not replaced
ON_IMAGE = {"torch", "torchvision", "timm", "tqdm", "scikit-learn", "scipy", "pillow", "matplotlib", "numpy",
            "pandas", "pyarrow", "pytest", "pytest-timeout", "filelock",  # filelock: a dependency of torch
            "safetensors", "huggingface-hub"}  # dependencies of timm
CARRIED_AS = {"mlflow": "mlflow-skinny"}  # a pin carried as another distribution of the same version
IMPORTS = {"deepspeed": "deepspeed", "webdataset": "webdataset", "omegaconf": "omegaconf", "faiss-cpu": "faiss",
           "pytorch-metric-learning": "pytorch_metric_learning", "mlflow-skinny": "mlflow",
           "sqlalchemy": "sqlalchemy", "alembic": "alembic", "boto3": "boto3", "optuna": "optuna"}
PROJECT_IMPORTS = ["loss", "data_shards.gpu_transforms", "trainer.loop", "trainer.tracking",
                   "trainer.deepspeed_engine", "trainer.evaluation.metrics"]
STEPS = ["install", "versions", "pytest", "loss", "throughput", "eval", "demo1", "demo2"]
# loss_bench's cases but C=100k lam=0.3, whose dense run (a 100k x 100k x 100k product, ~40 s in fp32) would
# take most of the step's time before it runs out of memory; with --slow-s 1 a dense run slower than 1 s (SOP
# N=4: ~3 s) is timed once
LOSS_CASES = "CUB M=32,CUB M=256,SOP lam=0,SOP lam=0.3,SOP N=4 lam=0.3,C=100k lam=0,C=1M lam=0"
NCCL_REFUSAL = re.compile(r"Duplicate GPU detected|ncclInvalidUsage")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------- the wheels

def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """{normalised name: version} of the `name==version` lines (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path.name}: {line!r} is not name==version")
        if norm(name) in pins:
            raise ValueError(f"{path.name}: {name.strip()} is pinned twice")
        pins[norm(name)] = version.strip()
    return pins


def read_requirements(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    return read_manifest(path)


def parse_wheel(filename: str) -> tuple[str, str, str, str, str]:
    """(normalised name, version, python tag, abi tag, platform tag) of a wheel file name (PEP 427)."""
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    return norm(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def fits_device(python: str, abi: str, platform: str) -> bool:
    """Installable on the GPU machine: CPython 3.12 on manylinux x86-64."""
    plats = platform.split(".")
    if not all(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in plats):
        return False
    for tag in python.split("."):
        if tag in ("py3", "cp312") and abi in ("none", "cp312", "abi3"):
            return True
        m = re.fullmatch(r"cp3(\d+)", tag)
        if m and abi == "abi3" and int(m.group(1)) <= 12:
            return True
    return False


def check_wheels(wheel_dir: Path, pins: dict[str, str]) -> tuple[list[str], list[Path]]:
    """(problems, wheel files): the folder must hold exactly one fitting wheel per pin, at its version."""
    if not wheel_dir.is_dir():
        return [f"{wheel_dir} does not exist: run bench/gpu_wheels.sh, and carry .whl"], []
    files = sorted(wheel_dir.glob("*.whl"))
    problems, seen = [], {}
    for f in files:
        try:
            name, version, python, abi, plat = parse_wheel(f.name)
        except ValueError as e:
            problems.append(str(e))
            continue
        if name in seen:
            problems.append(f"two wheels of {name}: {seen[name]} and {f.name}")
        seen[name] = f.name
        if name not in pins:
            problems.append(f"{f.name}: not in {MANIFEST.name}")
        elif version != pins[name]:
            problems.append(f"{f.name}: version {version}, {MANIFEST.name} pins {pins[name]}")
        if not fits_device(python, abi, plat):
            problems.append(f"{f.name}: not installable on CPython 3.12 x86-64 ({python}-{abi}-{plat})")
    problems += [f"no wheel of {name}=={version}" for name, version in pins.items() if name not in seen]
    return problems, files


# ---------------------------------------------------------------- running steps

@dataclass
class Outcome:
    """What the processes of one step did: exit codes, their output (processes one after another), wall time."""
    returncodes: list[int]
    output: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def why(self) -> str:
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        bad = [rc for rc in self.returncodes if rc != 0]
        return f"exit {bad[0]}" if bad else ""


@dataclass
class Row:
    check: str
    result: str  # PASS | FAILED (why) | REFUSED (why) | not run (why)
    figure: str
    target: str

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAILED")


@dataclass
class Step:
    key: str  # --only name
    title: str  # what the dry run's plan and table call it
    argv: list[list[str]]  # processes started together
    limit_s: float
    judge: Callable[[Outcome], list[Row]]
    env: list[dict] = field(default_factory=list)  # per process, on top of the common environment
    after_refusal_of: str = ""  # run only if that step's NCCL run was refused
    together: bool = True  # its processes start at once (False: one after another)


def run_processes(argv: list[list[str]], envs: list[dict], limit_s: float, cwd: Path = ROOT,
                  together: bool = True) -> Outcome:
    """Start every command at once (each in its own process group), wait up to limit_s, then kill the groups.
    together=False: one after another, all within limit_s (a command's output is then timed alone)."""
    if not together:
        outcomes, t0 = [], time.perf_counter()
        for i, cmd in enumerate(argv):
            left = limit_s - (time.perf_counter() - t0)
            outcomes.append(run_processes([cmd], envs[i:i + 1], left, cwd) if left > 0.5 else
                            Outcome([124], "not started: no time left\n", 0.0, True))
            if outcomes[-1].timed_out:
                break
        return Outcome([rc for o in outcomes for rc in o.returncodes],
                       "".join(f"----- process {i}\n{o.output}" for i, o in enumerate(outcomes)),
                       time.perf_counter() - t0, any(o.timed_out for o in outcomes))
    t0 = time.perf_counter()
    procs, out, timed_out = [], [], False
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in argv]
        for i, (cmd, log) in enumerate(zip(argv, logs)):
            env = {**os.environ, **(envs[i] if i < len(envs) else {})}
            try:
                procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            except OSError as e:
                log.write(f"cannot start {cmd[0]}: {e}\n")
                procs.append(None)
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, limit_s - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p is not None and p.poll() is None:
                    kill_group(p)
        for i, log in enumerate(logs):
            log.seek(0)
            text = log.read()
            out.append(text if len(logs) == 1 else f"----- process {i}\n{text}")
    codes = [127 if p is None else p.returncode for p in procs]
    return Outcome(codes, "".join(out), time.perf_counter() - t0, timed_out)


def kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failed_row(check: str, target: str, outcome: Outcome, figure: str = "") -> Row:
    return Row(check, f"FAILED ({outcome.why() or 'target missed'})", figure, target)


def verdict(check: str, target: str, outcome: Outcome, met: bool | None, figure: str) -> Row:
    """PASS only if the processes succeeded and the parsed figure met its target (None: nothing parsed)."""
    if not outcome.ok:
        return failed_row(check, target, outcome, figure)
    if met is None:
        return Row(check, "FAILED (no figure in its output)", figure, target)
    return Row(check, "PASS" if met else "FAILED (target missed)", figure, target)


# ---------------------------------------------------------------- judging each bench's output

def table_rows(output: str) -> list[list[str]]:
    """The cells of every markdown table row in the output (header and separator rows included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in output.splitlines()
            if line.strip().startswith("|") and line.strip().endswith("|")]


def judge_pytest(outcome: Outcome) -> list[Row]:
    target = "all CUDA tests pass, none skipped"
    counts: dict[str, int] = {}
    for line in outcome.output.splitlines():
        if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b.* in [\d.]+s", line):
            counts = {re.sub(r"s$", "", k) if k == "errors" else k: int(n)
                      for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                             line)}
    figure = ", ".join([f"{counts.get('passed', 0)} passed"] +
                       [f"{n} {k}" for k, n in counts.items() if k not in ("passed", "deselected")])
    met = None if not counts else (counts.get("passed", 0) > 0 and not any(
        counts.get(k, 0) for k in ("failed", "error", "skipped", "xfailed", "xpassed")))
    return [verdict("pytest -m gpu", target, outcome, met, figure)]


def ms(cell: str) -> float | None:
    m = re.fullmatch(r"([\d,.]+) ms\*?", cell)
    return float(m.group(1).replace(",", "")) if m else None


def judge_loss(outcome: Outcome, case: str = "SOP lam=0.3", target_ms: float = 3.0) -> list[Row]:
    """loss_bench's tables, one per run (fp32, then e.g. --tf32, --amp bf16), each titled by its precision:
    | case | C | N | M | lam | dense time | ours time | speed-up | ... |. The target is met by the fastest
    precision (pytest -m gpu holds their accuracy tests)."""
    target = f"{case}: ours < {target_ms:g} ms fwd+bwd, best precision"
    figures, best = [], None
    for part in re.split(r"^----- process \d+$", outcome.output, flags=re.M):
        title = re.search(r"^# ProxyGML fwd\+bwd, .*?, torch \S+, (.*?), dim ", part, flags=re.M)
        row = next((r for r in table_rows(part) if r[0] == case and len(r) >= 8), None)
        if title is None or row is None:
            continue
        ours = ms(row[6])
        best = ours if best is None or (ours is not None and ours < best) else best
        figures.append(f"{title.group(1)} {row[6]}" + (f" (dense {row[5]}, {row[7]})" if not figures else ""))
    met = None if best is None else best < target_ms
    return [verdict("loss_bench cuda", target, outcome, met, "; ".join(figures))]


def judge_throughput(outcome: Outcome, workers: int = 4, share: float = 0.90) -> list[Row]:
    """throughput.py's table: | workers | ceiling img/s | cpu img/s | / ceiling | device img/s | / ceiling |"""
    target = f"gpu decode >= {share:.0%} of the ceiling at {workers} workers"
    row = next((r for r in table_rows(outcome.output) if r[0] == str(workers) and len(r) == 6), None)
    if row is None:
        return [verdict("throughput resnet50 bf16", target, outcome, None, "")]
    ceiling, cpu, cpu_share, dev, dev_share = row[1:]
    figure = f"gpu {dev_share} ({dev} img/s), cpu {cpu_share} ({cpu} img/s) of ceiling {ceiling} img/s"
    return [verdict("throughput resnet50 bf16", target, outcome, float(dev_share) >= share, figure)]


def judge_eval(outcome: Outcome) -> list[Row]:
    out = outcome.output
    step = re.search(r"metric step on (\w+): ([\d.]+) s, peak (.*?) GiB", out)
    whole = re.search(r"whole evaluation estimate: ([\d.]+) s = ([\d,]+) (\S+) forward passes at ([\d,]+) img/s",
                      out)
    rows = [verdict("eval metric step, SOP size", "< 1 s on 60,502 x 512", outcome,
                    None if not step else float(step.group(2)) < 1.0,
                    f"{float(step.group(2)):.3f} s, peak {step.group(3)} GiB" if step else "")]
    rows.append(verdict("eval whole, SOP size (estimate)", "< 10 s incl. 60k ResNet-50 forwards", outcome,
                        None if not whole else float(whole.group(1)) < 10.0,
                        f"{float(whole.group(1)):.2f} s (forward at {whole.group(4)} img/s)" if whole else ""))
    return rows


def judge_demo(check: str) -> Callable[[Outcome], list[Row]]:
    target = "1 epoch completes; test R@1 rises"

    def judge(outcome: Outcome) -> list[Row]:
        m = re.search(r"test Recall@1: ([\d.]+) before training -> ([\d.]+) after", outcome.output)
        figure = f"R@1 {m.group(1)} -> {m.group(2)} in {outcome.seconds:.0f} s" if m else ""
        return [verdict(check, target, outcome, None if not m else float(m.group(2)) > float(m.group(1)), figure)]
    return judge


def judge_demo_nccl(outcome: Outcome) -> list[Row]:
    check = "demo 2 ranks on 1 GPU, nccl"
    if not outcome.ok and NCCL_REFUSAL.search(outcome.output):  # a rank may hang after the other's refusal
        line = next(ln for ln in outcome.output.splitlines() if NCCL_REFUSAL.search(ln)).strip()
        return [Row(check, "REFUSED (NCCL: two ranks on one device; gloo next)", line[-80:], "refusal is allowed")]
    return judge_demo(check)(outcome)


def judge_versions(pins: dict[str, str], requirements: dict[str, str]) -> Callable[[Outcome], list[Row]]:
    def judge(outcome: Outcome) -> list[Row]:
        line = next((ln for ln in reversed(outcome.output.splitlines()) if ln.startswith("{")), "")
        if not line:
            return [verdict("versions", "carried = manifest; imports work", outcome, None, "")]
        got = json.loads(line)
        wrong = [f"{n} {got['versions'].get(n)} != {v}" for n, v in pins.items() if got["versions"].get(n) != v]
        broken = [f"{m}: {e}" for m, e in got["import_errors"].items()]
        image = [f"{n} {got['versions'].get(n) or 'missing'} (pin {requirements[n]})" for n in sorted(ON_IMAGE)
                 if n in requirements and got["versions"].get(n) != requirements[n]]
        problems = wrong + broken + ([] if got["bf16"] else ["torch reports no bf16 support"])
        figure = "; ".join(problems) or f"{len(pins)} carried ok; image: {', '.join(image) or 'our pins'}"
        met = not wrong and not broken and got["bf16"]
        return [verdict("versions", "carried = manifest; imports work; bf16", outcome, met, figure)]
    return judge


VERSIONS_SNIPPET = """
import importlib, importlib.metadata as md, json, sys
names, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
errors = {}
for m in modules:
    try:
        importlib.import_module(m)
    except Exception as e:
        errors[m] = f"{type(e).__name__}: {e}"[:200]
import torch
print(json.dumps({"versions": versions, "import_errors": errors, "bf16": torch.cuda.is_bf16_supported()}))
"""


def judge_install(outcome: Outcome) -> list[Row]:
    return [Row("install wheels", "PASS" if outcome.ok else f"FAILED ({outcome.why()})",
                f"{outcome.seconds:.0f} s", "pip install --no-index --no-deps")]


# ---------------------------------------------------------------- the plan

def plan(args, pins: dict[str, str], requirements: dict[str, str]) -> list[Step]:
    py, work = sys.executable, Path(args.work)
    demo = [py, "-m", "trainer", "--config", "demo", "run.device=cuda", "data.decode=gpu", "train.amp=bf16",
            "train.compile=true", "train.epochs=1", "checkpoint.resume=false", f"run.output_dir={work}",
            f"data.root={work / 'digits-shards'}"]

    def two_ranks(backend: str) -> tuple[list[list[str]], list[dict]]:
        port = str(free_port())
        argv = [demo + [f"run.name=two-{backend}", f"run.dist_backend={backend}"] for _ in range(2)]
        envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port, "NCCL_DEBUG": "WARN"} for r in range(2)]
        return argv, envs

    wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
    names = sorted(set(pins) | ON_IMAGE)
    modules = sorted(IMPORTS[n] for n in pins if n in IMPORTS) + PROJECT_IMPORTS
    nccl, gloo = two_ranks("nccl"), two_ranks("gloo")
    install = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", args.site, *wheels]
    versions = [py, "-c", VERSIONS_SNIPPET, json.dumps(names), json.dumps(modules)]
    pytest = [py, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "tests"]
    loss = [py, "bench/loss_bench.py", "--device", "cuda", "--reps", "5", "--slow-s", "1", "--only", LOSS_CASES]
    sop = [py, "bench/loss_bench.py", "--device", "cuda", "--reps", "5", "--only", "SOP lam=0.3"]
    throughput = [py, "bench/throughput.py", "--backbone", "resnet50", "--batch-size", "256", "--amp", "bf16",
                  "--workers", "4", "--steps", "20", "--warmup", "5", "--device", "cuda"]
    evaluation = [py, "bench/eval_bench.py", "--only-sop", "--device", "cuda", "--forward-backbone", "resnet50"]
    return [
        Step("install", "install wheels", [install], 35, judge_install),
        Step("versions", "versions", [versions], 30, judge_versions(pins, requirements)),
        Step("pytest", "pytest -m gpu", [pytest], 60, judge_pytest),
        Step("loss", "loss_bench cuda", [loss, sop + ["--tf32"], sop + ["--amp", "bf16"]], 70, judge_loss,
             together=False),
        Step("throughput", "throughput resnet50 bf16", [throughput], 75, judge_throughput),
        Step("eval", "eval SOP size", [evaluation], 50, judge_eval),
        Step("demo1", "demo 1 GPU", [demo + ["run.name=one-gpu"]], 65,
             judge_demo("demo 1 GPU, decode=gpu bf16 compile")),
        Step("demo2", "demo 2 ranks, nccl", nccl[0], 30, judge_demo_nccl, env=nccl[1]),
        Step("demo2", "demo 2 ranks, gloo (if NCCL refused)", gloo[0], 50,
             judge_demo("demo 2 ranks on 1 GPU, gloo"), env=gloo[1], after_refusal_of="demo2"),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_env(args) -> dict:
    path = os.pathsep.join(p for p in (args.site, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- the table and the run

def format_table(rows: list[Row]) -> str:
    lines = ["| check | result | figure | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.result} | {r.figure.replace('|', '/')} | {r.target} |" for r in rows]
    return "\n".join(lines)


def show(cmd: list[str]) -> str:
    """A command for the log: a script given inline as '<script>', a run of wheel files as DIR/*.whl (N)."""
    parts, wheels = [], [a for a in cmd if a.endswith(".whl")]
    for a in cmd:
        if a.endswith(".whl"):
            if a == wheels[0]:
                parts.append(f"{os.path.dirname(a)}/*.whl ({len(wheels)})")
        else:
            parts.append("'<script>'" if "\n" in a else a)
    return " ".join(parts)


def tail(text: str, n: int = 15, width: int = 300) -> str:
    """The last n lines (progress bars' carriage returns split lines too), each cut to `width` characters."""
    lines = [ln for ln in re.split(r"[\r\n]+", text.rstrip()) if ln.strip()]
    return "\n".join("    " + ln[:width] for ln in lines[-n:])


def run_plan(steps: list[Step], rows: list[Row], budget_s: float, common_env: dict, log,
             runner=run_processes) -> list[Row]:
    """Run the steps in order within the budget; append their rows to `rows` and return them."""
    deadline = time.perf_counter() + budget_s
    refused: set[str] = set()
    for step in steps:
        if step.after_refusal_of and step.after_refusal_of not in refused:
            continue
        left = deadline - time.perf_counter()
        if left < 3:
            rows.append(Row(step.title, "FAILED (no time left in the budget)", "", f"within {budget_s:.0f} s"))
            continue
        limit = min(step.limit_s, left)
        envs = [{**common_env, **e} for e in (step.env or [{}] * len(step.argv))]
        print(f"[gpu_check] {step.title}: up to {limit:.0f} s: {show(step.argv[0])}", flush=True)
        outcome = runner(step.argv, envs, limit, together=step.together)
        log.write(f"\n===== {step.key} ({outcome.seconds:.1f} s, exit {outcome.returncodes}"
                  f"{', timed out' if outcome.timed_out else ''})\n{outcome.output}\n")
        log.flush()
        new = step.judge(outcome)
        rows += new
        for r in new:
            print(f"[gpu_check] {r.check}: {r.result} {r.figure} ({outcome.seconds:.0f} s)", flush=True)
            if r.result.startswith("REFUSED"):
                refused.add(step.key)
        if any(r.failed for r in new):
            print(tail(outcome.output), flush=True)
    return rows


def cuda_line() -> tuple[bool, str]:
    """(usable, one line): the CUDA device torch sees, or why there is none."""
    try:
        import torch
    except ImportError as e:
        return False, f"gpu_check: torch does not import ({e}); this run needs a CUDA machine"
    if not torch.cuda.is_available():
        return False, f"gpu_check: no CUDA device (torch {torch.__version__} sees none); this run needs a GPU machine"
    p = torch.cuda.get_device_properties(0)
    return True, (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}, torch {torch.__version__}, "
                  f"{torch.cuda.device_count()} device(s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Checks for --only: " + ", ".join(STEPS))
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="the carried wheel folder (default .whl)")
    p.add_argument("--site", default="/tmp/gpu_check_site", help="where the wheels are installed (--target)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                   help="log, table and results folder (default $OUT, else runs/gpu_check)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "gpu_check_work"),
                   help="the demo runs' output folder (shards, checkpoints)")
    p.add_argument("--only", default="", help="comma-separated checks (default: all)")
    p.add_argument("--budget-s", type=float, default=470.0,
                   help="the whole run's time budget in seconds, from its start")
    p.add_argument("--dry-run", action="store_true",
                   help="no CUDA needed: check the wheels, print the plan and the table unfilled")
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s] or list(STEPS)
    unknown = [s for s in args.only if s not in STEPS]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if not args.dry_run:
        usable, line = cuda_line()
        if not usable:
            print(line, flush=True)
            return 2
        rows = [Row("CUDA device", "PASS", line, "a CUDA device")]
    else:
        rows = []
    pins, requirements = read_manifest(), read_requirements()
    problems, files = check_wheels(Path(args.wheels), pins)
    size = sum(f.stat().st_size for f in files) / 2**20
    rows.append(Row("wheels", "PASS" if not problems else f"FAILED ({len(problems)} problems)",
                    "; ".join(problems[:3]) or f"{len(files)} wheels, {size:.1f} MiB",
                    f"exactly {MANIFEST.name}, cp312 x86-64"))
    for p in problems:
        print(f"[gpu_check] wheels: {p}", flush=True)
    steps = [s for s in plan(args, pins, requirements) if s.key in args.only or s.key == "install"]
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        for s in steps:
            print(f"[gpu_check] plan: {s.title}, up to {s.limit_s:.0f} s, {len(s.argv)} process(es): "
                  f"{show(s.argv[0])}")
        rows += [Row(s.title, "not run (dry run)", "", "") for s in steps]
    elif problems:
        rows += [Row(s.title, "FAILED (not run: the wheels are wrong)", "", "") for s in steps
                 if not s.after_refusal_of]
    else:
        with open(os.path.join(args.out, "gpu_check.log"), "w") as log:
            run_plan(steps, rows, args.budget_s - (time.perf_counter() - started), step_env(args), log)
    table = format_table(rows)
    print("\n" + table, flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    failed = [r.check for r in rows if r.failed]
    if args.dry_run:
        print(f"gpu_check: dry run; the wheels {'FAILED' if problems else 'PASS'}, nothing else ran")
    else:
        print(f"gpu_check: {len(rows) - len(failed)} of {len(rows)} rows passed" +
              (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
