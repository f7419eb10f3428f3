"""Launchers and faults, end to end on loopback through the scripts in launch/: multi-node
torchrun, SLURM, the deepspeed launcher, restarts after a killed rank, collective timeouts,
sweeps and the dry run.

    pytest tests/test_launch.py -m slow       # ~ 3 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.train_launch import (FAST, REPO, assert_losses_close, assert_weights_close, clean_env, final_weights,
                                launch, metrics, tail, train_ok)

LAUNCH = REPO / "launch"


def free_port() -> int:
    """A loopback port for a launcher's rendezvous (launchers take a port, not a store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
SP2 = FAST + ["parallel.sp_size=2", "trainer.seed=3"]

# Imported by every Python process whose PYTHONPATH holds its folder: in a rank > 0 process,
# record each write (open for writing, mkdir, rename, remove) under AUDIT_UNDER.
AUDIT = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_LOG"):
    _root, _log, _busy = os.path.realpath(os.environ["AUDIT_UNDER"]), os.environ["AUDIT_LOG"], [False]
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    def _hook(event, args):
        if _busy[0] or event not in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir"):
            return
        if event == "open" and not (args[2] or 0) & _W:
            return
        if not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event != "open" and args[-1] is not None:  # relative to a dir fd (e.g. shutil.rmtree of a tempdir)
            return
        _busy[0] = True
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
            if path == _root or path.startswith(_root + os.sep):
                with open(_log, "a") as f:
                    f.write(f"{os.environ['RANK']} {event} {path}\\n")
        finally:
            _busy[0] = False
    sys.addaudithook(_hook)
'''


def _audit_env(tmp_path: Path, watch: Path) -> dict:
    d = tmp_path / "audit"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(AUDIT)
    return {"PYTHONPATH": f"{REPO}:{d}", "AUDIT_UNDER": str(watch), "AUDIT_LOG": str(tmp_path / "audit.log")}


def _writes_by_ranks_above_0(tmp_path: Path, run_dir: Path) -> list[str]:
    """Audited writes of ranks > 0 inside run_dir (making run_dir itself is not writing a file)."""
    log = tmp_path / "audit.log"
    lines = log.read_text().splitlines() if log.exists() else []
    root = run_dir.resolve()
    return [ln for ln in lines if root in Path(ln.split()[2]).parents]


def start(cmd, cwd: Path, env=None, **kw) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a started process; on timeout kill its whole session and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args[:3]} still running after {timeout}s\n{out[-3000:]}") from None


def only_run_dir(cwd: Path) -> Path:
    dirs = list((cwd / "outputs").iterdir())
    assert len(dirs) == 1, f"expected one run dir, found {dirs}"
    return dirs[0]


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == str(rank) and "recipes.train" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"no process of rank {rank} under {proc.pid}")


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_nodes_match_single_node_and_share_one_run_dir(tmp_path):
    """Two torchrun agents (nodes) started 2 s apart, c10d rendezvous on 127.0.0.1, one rank each,
    sp=2 spanning both: one run dir (outputs/$RUN_ID), rank 1 writes nothing in it, same losses."""
    over = SP2 + ["trainer.max_steps=4"]
    rc, out = finish(start([LAUNCH / "torchrun_single_node.sh", *over], tmp_path / "single",
                           {"NPROC_PER_NODE": "2"}), 240)
    assert rc == 0, out[-3000:]
    ref = metrics(only_run_dir(tmp_path / "single"))

    cwd, port = tmp_path / "multi", free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES="2", NPROC_PER_NODE="1", RUN_ID="twonodes",
               **_audit_env(tmp_path, cwd / "outputs"))
    nodes = []
    for node in (0, 1):
        nodes.append(start([LAUNCH / "torchrun_multi_node.sh", *over], cwd, dict(env, NODE_RANK=str(node))))
        time.sleep(2)
    results = [finish(p, 240) for p in nodes]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    run_dir = only_run_dir(cwd)
    assert run_dir.name == "twonodes"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert _writes_by_ranks_above_0(tmp_path, run_dir) == []
    got = metrics(run_dir)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert_losses_close(ref, got, [1, 2, 3, 4])


# torchrun as releases before --signals-to-handle and --shutdown-timeout present it: --help
# lists neither, either flag is refused at argument parsing (as argparse does), and everything
# else runs the real torchrun -- whose default signal set (TERM, INT, HUP, QUIT) is those
# releases' fixed one: an unhandled SIGUSR1 ends the agent.
OLD_TORCHRUN = f"""#!/usr/bin/env bash
if [[ " $* " == *" --help "* ]]; then
  {sys.executable} -m torch.distributed.run --help | grep -v -e signals.to.handle -e shutdown.timeout
  exit 0
fi
for a in "$@"; do
  case "$a" in --signals-to-handle*|--signals_to_handle*|--shutdown-timeout*|--shutdown_timeout*)
    echo "torchrun: error: unrecognized arguments: $a" >&2; exit 2 ;;
  esac
done
exec {sys.executable} -m torch.distributed.run "$@"
"""


def old_torchrun(tmp_path: Path) -> str:
    stub = tmp_path / "old_torchrun"
    stub.write_text(OLD_TORCHRUN)
    stub.chmod(0o755)
    return str(stub)


def _recording_torchrun(tmp_path: Path, help_text: str) -> str:
    """A torchrun that prints help_text for --help and otherwise records its arguments."""
    stub = tmp_path / "torchrun_stub"
    stub.write_text(f"#!/usr/bin/env bash\nif [[ \"$1\" == --help ]]; then echo '{help_text}'; exit 0; fi\n"
                    f"printf '%s\\n' \"$@\" > {tmp_path / 'argv'}\n")
    stub.chmod(0o755)
    return str(stub)


@pytest.mark.parametrize("flags", [(), ("--signals-to-handle",), ("--signals-to-handle", "--shutdown-timeout")])
@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_launch_scripts_pass_only_the_signal_flags_torchrun_has(tmp_path, script, flags):
    """The scripts ask torchrun (--help) which signal flags it has and pass only those: an older
    torchrun refuses unknown flags, so passing them failed every launch at argument parsing."""
    stub = _recording_torchrun(tmp_path, "usage: torchrun [-h] " + " ".join(f"[{f} X]" for f in flags))
    env = dict(TORCHRUN=stub, NPROC_PER_NODE="2", SHUTDOWN_TIMEOUT="77", MASTER_ADDR="127.0.0.1", RUN_ID="r")
    rc, out = finish(start([LAUNCH / script, "trainer.max_steps=1"], tmp_path, env), 60)
    assert rc == 0, out
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[-3:] == ["-m", "recipes.train", "trainer.max_steps=1"], argv
    signal_args = [a for a in argv if a.startswith(("--signals", "--shutdown"))]
    expected = {"--signals-to-handle": "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                "--shutdown-timeout": "--shutdown-timeout=77"}
    assert signal_args == [expected[f] for f in flags], argv
    assert ("SIGUSR1 reaches the ranks as SIGTERM" in out) == ("--signals-to-handle" not in flags), out
    assert ("fixed 30 s to save, not SHUTDOWN_TIMEOUT=77" in out) == ("--shutdown-timeout" not in flags), out


@pytest.mark.slow
def test_usr1_through_a_torchrun_without_signal_flags_saves_a_checkpoint(tmp_path):
    """A torchrun without --signals-to-handle would die of SIGUSR1 and orphan its ranks: the
    script stays its parent and turns SIGUSR1 into SIGTERM, which torchrun forwards and on which
    the ranks save the step in flight (within torchrun's fixed 30 s)."""
    cmd = [LAUNCH / "torchrun_single_node.sh", *SP2, "trainer.max_steps=200", "trainer.save_every=0",
           f"hydra.run.dir={tmp_path / 'run'}"]
    job = start(cmd, tmp_path, {"NPROC_PER_NODE": "2", "TORCHRUN": old_torchrun(tmp_path)})
    logged = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: logged.exists() and logged.read_text().strip(), job, 180, "the first logged step")
    os.kill(job.pid, signal.SIGUSR1)
    rc, out = finish(job, 120)
    assert rc != 0, out[-3000:]  # torchrun, told to stop, exits 1
    assert "SIGUSR1 reaches the ranks as SIGTERM" in out, out[-3000:]
    assert "SIGTERM received: saving a checkpoint at step" in out, out[-3000:]
    assert "forcefully exiting" not in out, out[-3000:]
    saved = list((tmp_path / "run" / "checkpoints").glob("step_*/manifest.json"))
    assert len(saved) == 1, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun", "old torchrun"])
def test_slurm_tasks_started_apart_share_one_run_dir_and_requeue_on_usr1(tmp_path, launcher):
    """launch/slurm.sbatch under a stand-in srun that starts its 2 tasks 3 s apart -- the ranks
    themselves (LAUNCHER=srun) or one torchrun agent per "node" with a c10d rendezvous: all use
    outputs/slurm-$SLURM_JOB_ID, and only rank 0 writes there. Then SLURM's time-limit signal
    (USR1 to the batch script, --signal=B:USR1@N): the script forwards it through srun (the
    stand-in forwards like srun does) to the ranks or the agents, which forward it to theirs; the
    ranks save the step in flight and the script runs `scontrol requeue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n# stand-in: SLURM_NTASKS copies of the command, 3 s apart; forwards signals to them\n"
        'while [[ "$1" == -* ]]; do shift; done\npids=()\n'
        'for s in USR1 TERM; do trap "kill -s $s \\${pids[*]} 2>/dev/null" $s; done\n'
        'for ((i=0; i<SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); sleep 3; done\n'
        'rc=0; for p in "${pids[@]}"; do\n'
        '  while true; do wait "$p" && r=0 || r=$?; kill -0 "$p" 2>/dev/null || break; done\n'
        '  [[ $r == 0 ]] || rc=$r\ndone; exit $rc\n')
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\nif [[ "$1" == requeue ]]; then echo "$@" >> {tmp_path / "requeued"}; '
        'else echo localhost; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cwd = tmp_path / "job"
    old = launcher == "old torchrun"  # no --signals-to-handle: USR1 reaches the agents as TERM
    env = dict(LAUNCHER="torchrun" if old else launcher, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_NNODES="2", NPROC_PER_NODE="1", SLURM_SUBMIT_DIR=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PATH=f"{bin_dir}:{os.environ['PATH']}", **_audit_env(tmp_path, cwd))
    env["AUDIT_UNDER"] = str(cwd)  # writes of ranks > 0 anywhere under the job's folder are recorded
    if old:
        env["TORCHRUN"] = old_torchrun(tmp_path)
    job = start(["bash", LAUNCH / "slurm.sbatch", *SP2, "trainer.max_steps=40"], cwd, env)
    logged = cwd / "outputs" / "slurm-4242" / "metrics.jsonl"
    wait_for(lambda: logged.exists() and logged.read_text().strip(), job, 180, "the first logged step")
    os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    rc, out = finish(job, 240)
    # the ranks end well (0), torchrun, told to stop itself, exits 1; the script exits with the
    # marker's 128+SIGUSR1 (or 128+SIGTERM where torchrun cannot forward USR1)
    assert rc == (143 if old else 138), out[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"], out[-3000:]
    run_dir = only_run_dir(cwd)
    assert run_dir.name == "slurm-4242"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "stopped.json"]
    saved = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(saved) == 1 and sorted(metrics(run_dir)) == list(range(1, saved[0] + 1)) and saved[0] < 40, \
        (saved, out[-3000:])
    got = "SIGTERM" if old else "SIGUSR1"
    assert f"{got} received: saving a checkpoint at step {saved[0]}" in out, out[-3000:]
    # the marker the script requeues on: stopped by the signal at the saved step, not finished
    marker = json.loads((run_dir / "stopped.json").read_text())
    assert (marker["stopped_by"], marker["step"], marker["finished"]) == (got, saved[0], False), marker
    # rank 1 writes its own checkpoint shards (through torch.save's C++ writer: not audited)
    writes = [w for w in _writes_by_ranks_above_0(tmp_path, run_dir) if "/checkpoints/" not in w.split()[2]]
    assert writes == [], writes
    # the audit itself does see a Python write from a rank > 0
    probe = run_dir / "probe.txt"
    subprocess.run([sys.executable, "-c", f"open({str(probe)!r}, 'w')"], env=clean_env(dict(env, RANK="1")),
                   check=True, timeout=60)
    assert f"1 open {probe.resolve()}" in (tmp_path / "audit.log").read_text()


@pytest.mark.slow
def test_ranks_started_apart_without_a_run_dir_agree_on_rank_0s(tmp_path):
    """Ranks started directly, 3 s apart, nobody passes hydra.run.dir: each resolves its own start
    time, and rank 1 then takes rank 0's dir and drops its own (empty) one."""
    cwd = tmp_path / "job"
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", **_audit_env(tmp_path, cwd))
    cmd = [sys.executable, "-m", "recipes.train", *SP2, "trainer.max_steps=2"]
    ranks = []
    for r in (0, 1):
        ranks.append(start(cmd, cwd, dict(base, RANK=str(r), LOCAL_RANK=str(r))))
        time.sleep(3)
    for rc, out in [finish(p, 240) for p in ranks]:
        assert rc == 0, out[-3000:]
    run_dir = only_run_dir(cwd)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert _writes_by_ranks_above_0(tmp_path, run_dir) == []
    assert sorted(metrics(run_dir)) == [1, 2]


def test_run_id_ignores_torchruns_placeholder(monkeypatch):
    from recipes.distributed import run_id as _run_id

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert _run_id() == "job-7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id (accelerate launch)
    assert _run_id() != "none"


@pytest.mark.slow
def test_deepspeed_launcher_with_hostfile_saves_and_stops_on_usr1(tmp_path):
    """The DeepSpeed launcher with a hostfile, then SIGUSR1 to the script: the script passes it
    to the ranks, not to the launcher (which has no handler for it, and on SIGTERM gives each
    rank a hard-coded 30 s); the ranks save at one step and end well, so the launcher ends
    without killing anyone, and the script exits 128+SIGUSR1 from stopped.json."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = dict(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               DS_ARGS="--no_ssh_check")
    job = start([LAUNCH / "deepspeed_hostfile.sh", *SP2, "trainer.max_steps=300"], tmp_path / "ds", env)
    wait_for(lambda: any(p.stat().st_size for p in (tmp_path / "ds").glob("outputs/*/metrics.jsonl")), job, 180,
             "the first logged step")
    os.kill(job.pid, signal.SIGUSR1)
    rc, out = finish(job, 120)
    assert rc == 138, out[-3000:]
    assert "passed to 2 rank(s) on this machine" in out, out[-3000:]
    assert "--local_rank=1" in out  # the launcher's argument reached the recipe, which accepted it
    assert "Killing subprocess" not in out, out[-3000:]  # the launcher killed no rank
    run_dir = only_run_dir(tmp_path / "ds")
    assert run_dir.name.startswith("ds-")
    marker = json.loads((run_dir / "stopped.json").read_text())
    assert (marker["stopped_by"], marker["exit_status"]) == ("SIGUSR1", 138), marker
    assert sorted(metrics(run_dir)) == list(range(1, marker["step"] + 1)) and marker["step"] < 300
    assert (run_dir / "checkpoints" / f"step_{marker['step']:08d}" / "manifest.json").exists()


def _recipe_ranks(proc: subprocess.Popen) -> list:
    """The recipe's rank processes under a launcher process."""
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "recipes.train" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_a_signal_to_one_node_stops_every_node_without_a_restart(tmp_path):
    """Two torchrun agents (nodes) with MAX_RESTARTS=1; only node 1's gets SIGUSR1. The ranks
    agree on it in the step's all-reduce and save at one step; node 0's rank then ends well, so
    its agent, which got no signal, restarts nothing. (That agent then waits in torchrun's exit
    barrier for node 1's agent, which ended on the signal without reaching it, up to torch's
    exit_barrier_timeout of 300 s, and exits 0: not waited for here.)"""
    cwd, port = tmp_path / "multi", free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES="2", NPROC_PER_NODE="1", RUN_ID="sig",
               MAX_RESTARTS="1", SHUTDOWN_TIMEOUT="60", LOGLEVEL="INFO")  # LOGLEVEL: torchrun's agent log
    over = SP2 + ["trainer.max_steps=300"]
    nodes = [start([LAUNCH / "torchrun_multi_node.sh", *over], cwd, dict(env, NODE_RANK=str(n))) for n in (0, 1)]
    run_dir = cwd / "outputs" / "sig"
    logged = run_dir / "metrics.jsonl"
    try:
        wait_for(lambda: logged.exists() and logged.read_text().strip(), nodes[0], 180, "the first logged step")
        os.kill(nodes[1].pid, signal.SIGUSR1)
        rc1, out1 = finish(nodes[1], 120)
        wait_for(lambda: not _recipe_ranks(nodes[0]), nodes[0], 60, "node 0's rank to end")
        time.sleep(8)  # a restart would start a new rank within the agent's monitor interval
        assert not _recipe_ranks(nodes[0]), "node 0's agent restarted its rank"
    finally:
        os.killpg(nodes[0].pid, signal.SIGKILL)
    out0, _ = nodes[0].communicate()
    assert "SIGUSR1 received: saving a checkpoint" in out0, out0[-3000:]
    # torchrun's agent log: its worker group ended well, no restart
    assert "worker group successfully finished" in out0 and "will restart worker group" not in out0, out0[-3000:]
    assert rc1 != 0, out1[-3000:]  # torchrun, told to stop itself, exits 1
    marker = json.loads((run_dir / "stopped.json").read_text())
    assert (marker["stopped_by"], marker["exit_status"]) == ("SIGUSR1", 138), marker
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == [f"step_{marker['step']:08d}"], \
        out0[-2000:]


ELASTIC = SP2 + ["data.seq_len=128", "trainer.max_steps=30", "trainer.save_every=5"]


@pytest.mark.slow
def test_killed_rank_restarts_and_resumes_like_an_uninterrupted_run(tmp_path):
    train_ok(tmp_path / "straight", 2, ELASTIC)
    cwd = tmp_path / "elastic"
    proc = start([LAUNCH / "torchrun_single_node.sh", *ELASTIC], cwd, {"NPROC_PER_NODE": "2", "MAX_RESTARTS": "1"})
    ckpt = lambda: list(cwd.glob("outputs/*/checkpoints/step_00000010/meta.json"))  # noqa: E731
    wait_for(ckpt, proc, 180, "the step-10 checkpoint")
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    rc, out = finish(proc, 240)
    assert rc == 0, out[-3000:]
    run_dir = only_run_dir(cwd)  # the restart found the same dir: outputs/$TORCHELASTIC_RUN_ID
    assert out.count("resumed from") == 1 and "fresh start" in out, out[-3000:]
    resumed_at = int(out.split("resumed from")[1].split(" at step ")[1].split()[0])
    assert 10 <= resumed_at < 30, "the kill should land between the step-10 checkpoint and the end"
    ref, got = metrics(tmp_path / "straight"), metrics(run_dir)
    assert sorted(got) == list(range(1, 31))
    assert_losses_close(ref, got, range(1, 31))
    assert_weights_close(final_weights(tmp_path / "straight"), final_weights(run_dir))


@pytest.mark.slow
def test_killed_rank_without_restarts_fails_the_torchrun_job(tmp_path):
    cwd = tmp_path / "job"
    proc = start([LAUNCH / "torchrun_single_node.sh", *ELASTIC, "parallel.collective_timeout_s=20"], cwd,
                 {"NPROC_PER_NODE": "2"})
    wait_for(lambda: list(cwd.glob("outputs/*/metrics.jsonl")), proc, 180, "the first logged step")
    t0 = time.time()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    rc, out = finish(proc, 60)
    assert rc != 0 and time.time() - t0 < 20, out[-3000:]
    assert "SIGKILL" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_dead_or_hung_peer_ends_rank_0_within_the_collective_timeout(tmp_path, sig):
    """Ranks started directly (as srun or any non-elastic launcher does): nothing kills rank 0 for
    us, so the recipe itself must notice -- at once for a dead peer (closed connection), after
    parallel.collective_timeout_s for a hung one (SIGSTOP keeps its sockets open)."""
    timeout_s = 8
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "recipes.train", *ELASTIC, f"parallel.collective_timeout_s={timeout_s}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    ranks = [start(cmd, REPO, dict(base, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), ranks[0], 180, "the first logged step")
        t0 = time.time()
        os.kill(ranks[1].pid, sig)
        rc, out = finish(ranks[0], timeout_s + 30)
        elapsed = time.time() - t0
    finally:
        for p in ranks:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert rc != 0, out[-3000:]
    assert "rank 0 of 2: a collective failed -- another rank died or did not answer within " \
           f"parallel.collective_timeout_s={timeout_s}s" in out, out[-3000:]
    if sig == signal.SIGKILL:
        assert elapsed < timeout_s and ("Connection closed by peer" in out or "Connection reset by peer" in out), \
            (elapsed, out[-2000:])
    else:
        assert timeout_s - 1 <= elapsed < timeout_s + 20 and "Timed out" in out, (elapsed, out[-2000:])
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_sweep_runs_one_distributed_job_per_point(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, LAUNCH / "sweep.py", "--nproc-per-node", "2", "--sweep-dir", sweep_dir, "--",
           *SP2, "trainer.max_steps=2", "trainer.seed=1,2"]
    rc, out = finish(start(cmd, tmp_path), 240)
    assert rc == 0, out[-3000:]
    records = [json.loads(ln) for ln in (sweep_dir / "sweep.jsonl").read_text().splitlines()]
    assert [(r["job"], r["returncode"]) for r in records] == [(0, 0), (1, 0)]
    assert [r["overrides"][-1] for r in records] == ["trainer.seed=1", "trainer.seed=2"]
    runs = [metrics(sweep_dir / str(n)) for n in (0, 1)]
    assert all(sorted(m) == [1, 2] for m in runs)
    assert runs[0][1]["loss"] != runs[1][1]["loss"], "the two seeds should give different batches"
    assert "seed: 2" in (sweep_dir / "1" / "config.yaml").read_text()


@pytest.mark.slow
def test_dry_run_prints_estimate_and_trains_nothing(tmp_path):
    over = ["trainer.dry_run=true", "trainer.dry_run_world_size=16", "model=llama3_8b", "data.seq_len=131072",
            "data.global_batch_size=2", "parallel.sp_size=8", "trainer.dtype=bf16", "deepspeed.zero_stage=3"]
    proc = launch(tmp_path, 1, over, timeout=60)
    assert proc.returncode == 0, tail(proc)
    out = proc.stdout
    assert "world 16 = dp 2 x sp 8" in out and "16384 tokens per rank" in out, out
    assert "8030.26M parameters" in out, out
    for part in ("parameters", "gradients", "optimizer", "activations", "total (device)", "by ZeRO stage"):
        assert part in out, out
    assert list(tmp_path.iterdir()) == []  # no config, metrics or checkpoints

    bad = launch(tmp_path, 1, ["trainer.dry_run=true", "trainer.dry_run_world_size=4", "parallel.sp_size=3"],
                 timeout=60)
    assert bad.returncode != 0 and "does not divide the world size 4" in bad.stderr, tail(bad)
