"""bench/gpu_check without a GPU: arguments, the wheel set, the runner's limits, the table, and each bench's real
CPU output through the parser that reads its CUDA run."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check as G  # noqa: E402

PY = sys.executable
ENV = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def fake_wheels(folder, pins):
    """Empty files named as the real wheels are (contents are not read by the check)."""
    folder.mkdir(exist_ok=True)
    for name, version in pins.items():
        tag = "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64" if name == "pydantic-core" else "py3-none-any"
        (folder / f"{name.replace('-', '_')}-{version}-{tag}.whl").write_bytes(b"")
    return folder


def run_bench(args, timeout=120) -> G.Outcome:
    return G.run_processes([[PY, *args]], [ENV], timeout)


# ---------------------------------------------------------------- arguments, manifest, wheels

def test_only_takes_known_checks_and_budget_must_be_positive(capsys):
    assert G.parse_args(["--only", "loss,eval"]).only == ["loss", "eval"]
    assert G.parse_args([]).only == G.STEPS
    with pytest.raises(SystemExit):
        G.parse_args(["--only", "loss,nope"])
    assert "unknown check(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        G.parse_args(["--budget-s", "0"])


def test_manifest_carries_every_pin_the_image_lacks_at_its_version():
    pins, req = G.read_manifest(), G.read_requirements()
    for name, version in req.items():
        carried = G.CARRIED_AS.get(name, name)
        assert name in G.ON_IMAGE or pins.get(carried) == version, name
    assert not set(pins) & G.ON_IMAGE
    assert set(G.IMPORTS) <= set(pins)


def test_manifest_lines_are_checked(tmp_path):
    (tmp_path / "m.txt").write_text("# c\nfoo==1.0  # why\n\nBar_baz==2\n")
    assert G.read_manifest(tmp_path / "m.txt") == {"foo": "1.0", "bar-baz": "2"}
    (tmp_path / "m.txt").write_text("foo==1\nfoo==2\n")
    with pytest.raises(ValueError, match="pinned twice"):
        G.read_manifest(tmp_path / "m.txt")
    (tmp_path / "m.txt").write_text("foo>=1\n")
    with pytest.raises(ValueError, match="not name==version"):
        G.read_manifest(tmp_path / "m.txt")


@pytest.mark.parametrize("python, abi, plat, fits", [
    ("py3", "none", "any", True), ("py2.py3", "none", "any", True),
    ("cp312", "cp312", "manylinux2014_x86_64.manylinux_2_17_x86_64", True),
    ("cp310", "abi3", "manylinux_2_27_x86_64.manylinux_2_28_x86_64", True),
    ("cp311", "cp311", "manylinux_2_17_x86_64", False),  # downloaded for this machine's Python, not the device's
    ("cp312", "cp312", "manylinux_2_17_aarch64", False),
    ("cp312", "cp312", "win_amd64", False),
    ("cp313", "abi3", "manylinux_2_17_x86_64", False),
])
def test_wheel_tags_must_fit_cpython_312_on_x86_64(python, abi, plat, fits):
    assert G.fits_device(python, abi, plat) is fits


def test_wheel_check_wants_exactly_the_manifest(tmp_path):
    pins = {"foo": "1.0", "bar-baz": "2.0"}
    whl = fake_wheels(tmp_path / "whl", pins)
    assert G.check_wheels(whl, pins) == ([], sorted(whl.glob("*.whl")))
    (whl / "foo-1.1-py3-none-any.whl").write_bytes(b"")
    (whl / "extra-0.1-py3-none-any.whl").write_bytes(b"")
    (whl / "bar_baz-2.0-py3-none-any.whl").unlink()
    (whl / "bar_baz-2.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"")
    problems, _ = G.check_wheels(whl, pins)
    assert any("two wheels of foo" in p for p in problems)
    assert any("foo-1.1-py3-none-any.whl: version 1.1" in p for p in problems)
    assert any("extra-0.1-py3-none-any.whl: not in" in p for p in problems)
    assert any("not installable on CPython 3.12" in p for p in problems)
    assert G.check_wheels(tmp_path / "nope", pins)[0][0].endswith("run bench/gpu_wheels.sh, and carry .whl")
    (whl / "foo-1.1-py3-none-any.whl").unlink()
    (whl / "extra-0.1-py3-none-any.whl").unlink()
    (whl / "foo-1.0-py3-none-any.whl").unlink()
    assert "no wheel of foo==1.0" in G.check_wheels(whl, pins)[0]


def test_gpu_wheels_sh_asks_pip_for_exactly_the_manifest(tmp_path):
    """A stand-in for python records what the script asks of pip: no index is reached."""
    record = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {record}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "DEST": str(tmp_path / "whl")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_wheels.sh")], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    download, wheel = record.read_text().splitlines()
    pins = G.read_manifest()
    assert download.startswith("-m pip download") and "--python-version 3.12 --implementation cp" in download
    assert "--no-deps --only-binary=:all:" in download and "--platform manylinux_2_28_x86_64" in download
    asked = {G.norm(a.split("==")[0]): a.split("==")[1] for a in download.split() if "==" in a}
    assert asked == {n: v for n, v in pins.items() if n != "deepspeed"}
    assert wheel.startswith("-m pip wheel") and wheel.endswith(f"deepspeed=={pins['deepspeed']}")
    assert "--no-build-isolation" in wheel and "--no-deps" in wheel


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse_are_executable_and_pass_shellcheck(script):
    path = os.path.join(ROOT, "bench", script)
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", path], capture_output=True, timeout=10).returncode == 0
    shellcheck = subprocess.run(["which", "shellcheck"], capture_output=True, text=True).stdout.strip()
    if shellcheck:
        proc = subprocess.run([shellcheck, path], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- the whole script on this machine

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    t = time.perf_counter()
    proc = subprocess.run([os.path.join(ROOT, "bench", "gpu_check.sh"), "--out", str(tmp_path)],
                          env={**os.environ, "PYTHON": PY}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.perf_counter() - t < 30
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not os.listdir(tmp_path)  # nothing ran


def test_dry_run_checks_the_wheels_and_prints_the_plan_and_table(tmp_path, capsys):
    whl = fake_wheels(tmp_path / "whl", G.read_manifest())
    out = tmp_path / "out"
    assert G.main(["--dry-run", "--wheels", str(whl), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| check | result | figure | target |" in text
    assert f"| wheels | PASS | {len(G.read_manifest())} wheels, 0.0 MiB |" in text
    assert "plan: demo 2 ranks, nccl, up to 30 s, 2 process(es)" in text
    assert f"{whl}/*.whl ({len(G.read_manifest())})" in text
    rows = json.loads((out / "results.json").read_text())
    assert [r["check"] for r in rows][:3] == ["wheels", "install wheels", "versions"]
    assert all(r["result"] == "not run (dry run)" for r in rows[1:])
    assert (out / "table.md").read_text().startswith("| check | result |")
    assert G.main(["--dry-run", "--wheels", str(whl), "--out", str(out), "--only", "loss"]) == 0
    assert [r["check"] for r in json.loads((out / "results.json").read_text())] == [
        "wheels", "install wheels", "loss_bench cuda"]
    next(whl.glob("deepspeed-*.whl")).unlink()
    assert G.main(["--dry-run", "--wheels", str(whl), "--out", str(out)]) == 1
    assert "wheels: no wheel of deepspeed==0.19.8" in capsys.readouterr().out


# ---------------------------------------------------------------- the runner

def step(key, code, limit=20, judge=None, **kw):
    return G.Step(key, key, [[PY, "-c", textwrap.dedent(code)]], limit,
                  judge or (lambda o: [G.verdict(key, "t", o, True, "f")]), **kw)


def test_a_failing_or_overrunning_step_is_a_failed_row_and_the_next_runs(tmp_path):
    marker = tmp_path / "grandchild-alive"
    code = f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3); open({str(marker)!r}, 'w')"])
        time.sleep(60)
    """
    steps = [step("slow", code, limit=1.5), step("bad", "import sys; print('boom'); sys.exit(3)"),
             step("good", "print('ok')")]
    with open(tmp_path / "log", "w") as log:
        t = time.perf_counter()
        rows = G.run_plan(steps, [], 60, ENV, log)
        assert time.perf_counter() - t < 15
    assert rows[0].check == "slow" and rows[0].result.startswith("FAILED (timed out after ")
    assert [(r.check, r.result) for r in rows[1:]] == [("bad", "FAILED (exit 3)"), ("good", "PASS")]
    time.sleep(4)
    assert not marker.exists()  # the whole process group was killed, not just the child
    log = (tmp_path / "log").read_text()
    assert "===== bad" in log and "boom" in log


def test_the_budget_caps_every_step(tmp_path):
    steps = [step("a", "import time; time.sleep(30)", limit=20), step("b", "print(1)")]
    with open(tmp_path / "log", "w") as log:
        rows = G.run_plan(steps, [], 4, ENV, log)
    assert rows[0].result.startswith("FAILED (timed out after")
    assert rows[1].result == "FAILED (no time left in the budget)"


def test_gloo_runs_only_after_nccl_refused_two_ranks_on_one_gpu(tmp_path):
    refusal = ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1234, invalid usage, "
               "NCCL version 2.27.3\\nncclInvalidUsage: This usually reflects invalid usage of NCCL library.\\n"
               "Last error:\\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000")
    demo_line = "test Recall@1: 0.9062 before training -> 0.9308 after"
    gloo = step("demo2", f"print({demo_line!r})", judge=G.judge_demo("gloo"), after_refusal_of="demo2")
    for nccl_code, expect in [
        (f"import sys; print({refusal!r}); sys.exit(1)", ["REFUSED (NCCL: two ranks on one device; gloo next)",
                                                          "PASS"]),
        (f"print({demo_line!r})", ["PASS"]),
        ("import sys; print('CUDA error: out of memory'); sys.exit(1)", ["FAILED (exit 1)"]),
        (f"import time; print({refusal!r}, flush=True); time.sleep(30)",  # the other rank hangs: still refused
         ["REFUSED (NCCL: two ranks on one device; gloo next)", "PASS"]),
    ]:
        nccl = step("demo2", nccl_code, limit=3, judge=G.judge_demo_nccl)
        with open(tmp_path / "log", "w") as log:
            rows = G.run_plan([nccl, gloo], [], 60, ENV, log)
        assert [r.result for r in rows] == expect
    assert not any(r.failed for r in G.judge_demo_nccl(G.Outcome([1, 1], refusal.replace("\\n", "\n"), 3.0)))


def test_failure_tails_are_short_lines():
    text = "start\n" + "\r".join(f"epoch 0: {i}%" + "#" * 500 for i in range(100)) + "\nTraceback\nValueError: x\n"
    lines = G.tail(text, n=3).splitlines()
    assert [ln.strip()[:12] for ln in lines] == ["epoch 0: 99%", "Traceback", "ValueError: "]
    assert max(len(ln) for ln in lines) <= 304


def test_table_escapes_pipes_and_names_every_column():
    table = G.format_table([G.Row("a", "PASS", "x | y", "< 1 s")])
    assert table.splitlines() == ["| check | result | figure | target |", "| --- | --- | --- | --- |",
                                  "| a | PASS | x / y | < 1 s |"]


# ---------------------------------------------------------------- each bench's real output, parsed

def test_loss_bench_output_is_parsed():
    """Two runs one after another, as the loss step makes them (fp32, then bf16 autocast)."""
    cmd = [PY, "bench/loss_bench.py", "--only", "CUB M=32", "--reps", "1", "--cpu-batch", "8", "--threads", "1"]
    o = G.run_processes([cmd, cmd + ["--amp", "bf16"]], [ENV, ENV], 120, together=False)
    assert o.ok and o.output.count("----- process") == 2, o.output[-2000:]
    row = G.judge_loss(o, case="CUB M=32", target_ms=1e6)[0]
    fp32, bf16 = row.figure.split("; ")
    assert row.result == "PASS" and fp32.startswith("fp32 ") and " ms" in fp32 and "(dense " in fp32, row
    assert bf16.startswith("bf16 autocast ") and bf16.endswith((" ms", " ms*")), row
    assert G.judge_loss(o, case="CUB M=32", target_ms=1e-3)[0].result == "FAILED (target missed)"
    assert G.judge_loss(o)[0].result == "FAILED (no figure in its output)"  # SOP lam=0.3 was not run


def test_sequential_processes_share_one_limit():
    sleep = [PY, "-c", "import time; time.sleep(30)"]
    t = time.perf_counter()
    o = G.run_processes([[PY, "-c", "print(1)"], sleep, [PY, "-c", "print(3)"]], [{}, {}, {}], 3, together=False)
    assert o.timed_out and time.perf_counter() - t < 10 and o.output.count("----- process") == 2


def test_the_plan_fits_in_eight_minutes():
    args = G.parse_args([])
    steps = G.plan(args, G.read_manifest(), G.read_requirements())
    assert sum(s.limit_s for s in steps) <= args.budget_s <= 8 * 60 - 10
    assert [s.key for s in steps if not s.after_refusal_of] == G.STEPS


def test_throughput_output_is_parsed():
    o = run_bench(["bench/throughput.py", "--device", "cpu", "--backbone", "small_cnn", "--image-size", "32",
                   "--resize-size", "36", "--batch-size", "8", "--workers", "1", "--steps", "2", "--warmup", "1",
                   "--amp", "none", "--source-height", "48", "--source-width", "64", "--classes", "4", "--dim", "16"])
    assert o.ok, o.output[-2000:]
    row = G.judge_throughput(o, workers=1, share=0.0)[0]
    assert row.result == "PASS" and row.figure.startswith("gpu ") and "of ceiling" in row.figure, row
    assert G.judge_throughput(o, workers=1, share=1e6)[0].result == "FAILED (target missed)"
    assert G.judge_throughput(o, workers=4)[0].result == "FAILED (no figure in its output)"


@pytest.mark.slow  # runs eval_bench on the CPU (16 s); the loss and throughput outputs are parsed by default
def test_eval_bench_output_is_parsed():
    o = run_bench(["bench/eval_bench.py", "--only-sop", "--size", "tiny", "--forward-backbone", "small_cnn",
                   "--forward-batches", "1", "--forward-batch", "8", "--forward-image-size", "32"])
    assert o.ok, o.output[-2000:]
    step_row, whole_row = G.judge_eval(o)
    assert step_row.figure.endswith(" GiB") and " s, peak " in step_row.figure, step_row
    assert "img/s" in whole_row.figure, whole_row
    seconds = float(step_row.figure.split(" s,")[0])
    assert step_row.result == ("PASS" if seconds < 1 else "FAILED (target missed)")


def test_pytest_summary_is_parsed_and_a_skip_fails(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_a():
            pass

        @pytest.mark.gpu
        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_b():
            pass

        def test_not_gpu():
            pass
    """))

    def run() -> G.Outcome:
        return G.run_processes([[PY, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
                                 str(tmp_path)]], [{}], 60, cwd=tmp_path)

    row = G.judge_pytest(run())[0]
    assert (row.result, row.figure) == ("FAILED (target missed)", "1 passed, 1 skipped")
    (tmp_path / "test_x.py").write_text((tmp_path / "test_x.py").read_text().replace("skipif(True", "skipif(False"))
    row = G.judge_pytest(run())[0]
    assert (row.result, row.figure) == ("PASS", "2 passed")


def test_versions_snippet_reports_carried_versions_and_import_errors():
    pins = {"pytest": "0.0.1"}
    o = G.run_processes([[PY, "-c", G.VERSIONS_SNIPPET, json.dumps(["pytest", "no-such-dist"]),
                          json.dumps(["json", "no_such_module"])]], [ENV], 60)
    assert o.ok, o.output
    row = G.judge_versions(pins, {"torch": "0"})(o)[0]
    assert row.result == "FAILED (target missed)"
    assert "pytest " in row.figure and "!= 0.0.1" in row.figure and "no_such_module: ModuleNotFoundError" in row.figure


def test_demo_line_is_parsed():
    line = "test Recall@1: 0.9062 before training -> 0.9308 after"
    assert G.judge_demo("d")(G.Outcome([0], line, 40.0))[0].figure == "R@1 0.9062 -> 0.9308 in 40 s"
    assert G.judge_demo("d")(G.Outcome([0], line.replace("0.9308", "0.9000"), 40.0))[0].failed
    assert G.judge_demo("d")(G.Outcome([0], "", 40.0))[0].result == "FAILED (no figure in its output)"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_launch_trains_the_demo_on_the_cpu(tmp_path):
    """The demo2 step's own launcher (two processes, LOCAL_RANK 0 for both, gloo), with the CUDA parts swapped
    for the CPU ones; its real output goes through the demo parser (~40 s on 2 cores)."""
    args = G.parse_args(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    gloo = next(s for s in G.plan(args, G.read_manifest(), G.read_requirements()) if s.after_refusal_of)
    swap = {"run.device=cuda": "run.device=cpu", "data.decode=gpu": "data.decode=cpu",
            "train.compile=true": "train.compile=false", "train.amp=bf16": "train.amp=auto"}
    argv = [[swap.get(a, a) for a in cmd] for cmd in gloo.argv]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    o = G.run_processes(argv, [{**env, **G.step_env(args), **e} for e in gloo.env], 240)
    assert o.ok, o.output[-3000:]
    assert gloo.judge(o)[0].result == "PASS", o.output[-2000:]


def test_main_runs_the_plan_after_the_checks_and_writes_log_table_and_results(tmp_path, monkeypatch, capsys):
    """main() past the CUDA check (stood in for): wheels, then the steps; a failed row makes the exit 1."""
    monkeypatch.setattr(G, "cuda_line", lambda: (True, "a stand-in device"))
    monkeypatch.setattr(G, "plan", lambda args, pins, req: [step("install", "print('installed')"),
                                                            step("loss", "import sys; print('slow'); sys.exit(4)")])
    whl, out = fake_wheels(tmp_path / "whl", G.read_manifest()), tmp_path / "out"
    assert G.main(["--wheels", str(whl), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.rstrip().endswith("gpu_check: 3 of 4 rows passed; FAILED: loss")
    assert [r["check"] for r in json.loads((out / "results.json").read_text())] == [
        "CUDA device", "wheels", "install", "loss"]
    assert "| loss | FAILED (exit 4) |" in (out / "table.md").read_text()
    assert "installed" in (out / "gpu_check.log").read_text()
    assert G.main(["--wheels", str(whl), "--out", str(out), "--only", "pytest"]) == 0  # install runs always
    next(whl.glob("webdataset-*.whl")).unlink()
    assert G.main(["--wheels", str(whl), "--out", str(out)]) == 1
    rows = json.loads((out / "results.json").read_text())
    assert [r["result"] for r in rows[2:]] == ["FAILED (not run: the wheels are wrong)"] * 2
