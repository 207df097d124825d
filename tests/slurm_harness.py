"""A real single-node Slurm cluster for the test suite (root only).

Install the binaries first with ``scripts/install_slurm.sh`` (Debian 12:
slurm-wlm 22.05.8, munge 0.5.15, MariaDB 10.11).  ``LocalSlurm().start()``
then brings up, all under one fresh temp dir and on fresh 127.0.0.1 ports:

    munged      own key and socket (a system munged, if any, is left alone)
    mariadbd    own datadir, 127.0.0.1:<port>, user slurm/slurm
    slurmdbd    accounting (sacct works; submitit needs it to see dead jobs)
    slurmctld   + slurmd, both with -D as child processes (no systemd, no cgroups)

and exports SLURM_CONF into ``os.environ`` (the fixture does; ``env()`` gives
it for explicit subprocess environments).  ``stop()`` cancels the cluster's
jobs, then SIGTERMs the PIDs it started (slurmctld, slurmd, slurmdbd,
mariadbd, munged), waits, SIGKILLs stragglers, and removes the temp dir
(kept when LOCALSLURM_KEEP=1 or after a failed start).

Usage
-----
    # tests/conftest.py:  from tests.slurm_harness import slurm_cluster  # noqa: F401
    def test_x(slurm_cluster: LocalSlurm, tmp_path):
        job = slurm_cluster.sbatch("-p", "cpu", "-o", str(tmp_path / "o"), "--wrap", "true")
        assert slurm_cluster.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"
        subprocess.run(["squeue"], env=slurm_cluster.full_env())  # or rely on os.environ

The session fixture ``slurm_cluster`` FAILS (pytest.fail, never skip) when
the cluster cannot start (not root, binaries missing, a daemon died), with
the log tails in the message.  A test may also start its own instance
(``LocalSlurm(cpus=64, gpus=8).start()`` ... ``.stop()``), alongside.

Cluster layout (defaults)
-------------------------
* one node, named after ``hostname -s``, NodeAddr 127.0.0.1, declared
  CPUs=4 (the machine may have fewer cores: SlurmdParameters=config_overrides),
  RealMemory=512000 MB (memory is NOT a consumable, SelectTypeParameters=
  CR_CPU, and nothing is enforced: task/none, proctrack/linuxproc; the large
  value only lets --mem of GPU templates pass), Gres=gpu:4 backed by
  gres.conf File= symlinks to /dev/null (AutoDetect=off), so --gres=gpu:N
  schedules and sets CUDA_VISIBLE_DEVICES.
* partition ``cpu``: Default=YES, PriorityTier=1, PreemptMode=REQUEUE,
  GraceTime=60.
* partition ``high``: PriorityTier=10, PreemptMode=OFF (never preempted).
* PreemptType=preempt/partition_prio, PreemptMode=REQUEUE,
  SlurmctldParameters=preempt_send_user_signal, JobRequeue=1, KillWait=10,
  AuthInfo cred_expire=10, SchedulerParameters sched_interval=2,bf_interval=1.
  To preempt: submit on ``high`` asking ``--cpus-per-task`` = all 4 CPUs (or
  all 4 GPUs) while a ``cpu`` job holds some of them.
* accounting: cluster ``grpotest``, account ``default``, user root (and the
  invoking user) added with ``sacctmgr -i``; AccountingStorageEnforce unset.

Facts verified with this harness (Debian 12, 2 cores, no systemd)
-----------------------------------------------------------------
* Startup, bare temp dir -> idle node + working sacct: 4-9 s (typ. 6 s):
  mariadb-install-db 1-3 s, mariadbd up +0.2 s, slurmdbd answering +0.4-1 s,
  sacctmgr add cluster/account/user ~2 s, slurmctld+slurmd to `idle` ~2 s.
  stop() (jobs cancelled, 5 daemons TERMed and reaped) ~1-1.5 s. The phase
  times of a run are in LocalSlurm.timings.
* The Debian 22.05 binaries (clients and daemons) honour SLURM_CONF;
  slurmdbd and slurmd read slurmdbd.conf / gres.conf from the same dir.
* A private munged (--socket) needs AuthInfo=socket=... in slurm.conf AND
  slurmdbd.conf, and AccountingStoragePass=<that socket> in slurm.conf:
  without the latter, connections to slurmdbd (sacctmgr, sacct) use the
  default /run/munge/munge.socket.2 ("Munge encode failed") and fail.
* 22.05 has no PreemptParameters: the option is
  SlurmctldParameters=preempt_send_user_signal.
* cred_expire bounds the requeue delay: `scontrol requeue` of a running job
  whose batch shell exits on SIGTERM -> running again (SLURM_RESTART_COUNT=1)
  after 11.3 s with cred_expire=10, 7.1 s with 5; a value below 5 is ignored
  and the 120 s default applies (measured 120.5 s with cred_expire=2).
  `scontrol requeue` delivers SIGCONT+SIGTERM to the batch shell at once and
  SIGKILL after KillWait; a shell that ignores TERM delays the rerun by
  KillWait (measured 22 s = 10 + 11).
* Preemption (PreemptMode=REQUEUE, GraceTime=60, preempt_send_user_signal):
  the `high` job is submitted; within ~0.5-1 s the `cpu` jobs receive
    - srun step tasks, no --signal:           SIGTERM (+SIGCONT)
    - srun step tasks, --signal=USR2@90 (submitit's default): SIGUSR2 only
    - batch shell, --signal=B:USR1@90:        SIGUSR1 (+SIGCONT)
    - batch shell of a job without srun and without --signal=B:...: NOTHING
      until GraceTime runs out;
  at the end of GraceTime: SIGCONT+SIGTERM to batch shell and tasks, SIGKILL
  KillWait later; such a job ends PREEMPTED and IS requeued (it reran ~11 s
  after the high job, which itself waited 60+10 s).
  A preempted job that EXITS during GraceTime is NOT requeued: exit 0 ends
  COMPLETED, exit 75 ends FAILED. To come back it must requeue itself
  (`scontrol requeue $SLURM_JOB_ID` from the signal handler, then exit):
  that gave sacct REQUEUED, the high job ran ~1 s after the signal, and the
  job reran with SLURM_RESTART_COUNT=1 about cred_expire+2 s later.
* submitit (1.5.4, which polls sacct) raised UncompletedJobError ~15 s after
  submission for a job whose python SIGKILLed itself (sacct FAILED) and for
  an scancel'ed one (CANCELLED).
* Fake GPUs: --gres=gpu:N / --gpus-per-node=N schedule and set
  CUDA_VISIBLE_DEVICES (0,1 for gpu:2); gpu:5 is refused.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

DAEMON_BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENT_BINARIES = ("sbatch", "squeue", "sinfo", "sacct", "sacctmgr", "scontrol", "scancel")
# Extra places to look (root's PATH on some images lacks the sbin dirs).
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# Job states after which a job will not run again (sacct/squeue spelling).
FINAL_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED",
})


class LocalSlurmError(RuntimeError):
    """The local cluster could not be started (message says why and where the logs are)."""


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_PATH:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


class LocalSlurm:
    """One-node Slurm cluster with accounting, started from scratch in a temp dir.

    Parameters are the node's declared resources; see the module docstring for
    the layout. Not reentrant: one start()/stop() per instance.
    """

    def __init__(
        self,
        *,
        cpus: int = 4,
        gpus: int = 4,
        real_memory_mb: int = 512000,
        cred_expire: int = 10,
        grace_time: int = 60,
        kill_wait: int = 10,
        cluster_name: str = "grpotest",
        base_dir: str | os.PathLike | None = None,
    ) -> None:
        self.cpus = cpus
        self.gpus = gpus
        self.real_memory_mb = real_memory_mb
        self.cred_expire = cred_expire
        self.grace_time = grace_time
        self.kill_wait = kill_wait
        self.cluster_name = cluster_name
        self._base_dir = base_dir
        # slurmctld only runs where SlurmctldHost names this host (short hostname)
        self.host_name = socket.gethostname().split(".")[0]
        self.node_name = re.sub(r"[^A-Za-z0-9-]", "-", self.host_name) or "node0"
        self.root: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logfiles: list = []
        self._started = False
        self._stopped = False
        self._start_failed = False
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}  # phase -> seconds since start() began
        self.bin: dict[str, str] = {}
        self._last_err: str | None = None

    # ------------------------------------------------------------------ paths
    def _p(self, *parts: str) -> Path:
        assert self.root is not None, "LocalSlurm not started"
        return self.root.joinpath(*parts)

    @property
    def conf_path(self) -> Path:
        """slurm.conf (slurmdbd.conf and gres.conf sit next to it)."""
        return self._p("etc", "slurm.conf")

    @property
    def slurmdbd_conf_path(self) -> Path:
        return self._p("etc", "slurmdbd.conf")

    @property
    def gres_conf_path(self) -> Path:
        return self._p("etc", "gres.conf")

    @property
    def munge_socket(self) -> Path:
        return self._p("run", "munge.socket")

    @property
    def slurmctld_log(self) -> Path:
        return self._p("log", "slurmctld.log")

    @property
    def slurmd_log(self) -> Path:
        return self._p("log", "slurmd.log")

    @property
    def slurmdbd_log(self) -> Path:
        return self._p("log", "slurmdbd.log")

    @property
    def munged_log(self) -> Path:
        return self._p("log", "munged.stdout")  # munged -F logs to stderr

    @property
    def mariadb_log(self) -> Path:
        return self._p("log", "mariadb.log")

    @property
    def log_paths(self) -> dict[str, Path]:
        return {
            "slurmctld": self.slurmctld_log,
            "slurmd": self.slurmd_log,
            "slurmdbd": self.slurmdbd_log,
            "munged": self.munged_log,
            "mariadb": self.mariadb_log,
        }

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the daemons this instance started (name -> pid)."""
        return {name: p.pid for name, p in self._procs.items()}

    def env(self) -> dict[str, str]:
        """Extra environment for subprocesses that use the Slurm client tools."""
        return {"SLURM_CONF": str(self.conf_path)}

    def full_env(self) -> dict[str, str]:
        """os.environ + env(), with sbin dirs on PATH."""
        e = dict(os.environ)
        e.update(self.env())
        path = e.get("PATH", "")
        for d in _EXTRA_PATH:
            if d not in path.split(":"):
                path = f"{path}:{d}" if path else d
        e["PATH"] = path
        return e

    # ---------------------------------------------------------------- helpers
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; returns the CompletedProcess (text)."""
        cp = subprocess.run(list(cmd), env=self.full_env(), capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed rc={cp.returncode}: {cp.stderr.strip()} {cp.stdout.strip()}")
        return cp

    def sbatch(self, *args: str) -> str:
        """sbatch --parsable ARGS...; returns the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def sacct_state(self, job_id: str) -> str | None:
        """The allocation's state per sacct (e.g. COMPLETED, CANCELLED), None if sacct has no row yet."""
        cp = self.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", str(job_id), check=False)
        for line in cp.stdout.splitlines():
            jid, _, state = line.partition("|")
            if jid == str(job_id):
                return state.split()[0] if state else None  # "CANCELLED by 0" -> CANCELLED
        return None

    def squeue_state(self, job_id: str) -> str | None:
        cp = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
        return cp.stdout.strip() or None if cp.returncode == 0 else None

    def scontrol_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (empty if unknown)."""
        cp = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        out: dict[str, str] = {}
        for tok in cp.stdout.split():
            k, sep, v = tok.partition("=")
            if sep and k not in out:
                out[k] = v
        return out

    def wait_state(self, job_id: str, states, timeout: float = 60, *, source: str = "sacct") -> str:
        """Poll until the job's state (sacct or squeue) is in `states`; returns it, raises TimeoutError."""
        want = {states} if isinstance(states, str) else set(states)
        get = self.sacct_state if source == "sacct" else self.squeue_state
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = get(job_id)
            if last in want:
                return last
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id}: state {last!r} after {timeout}s, wanted {sorted(want)}\n"
                           f"slurmctld log tail:\n{_tail(self.slurmctld_log, 15)}")

    def cancel_all(self, wait: float = 0) -> None:
        cp = self.run("squeue", "-h", "-o", "%i", check=False)
        ids = cp.stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                return
            time.sleep(0.3)

    # ---------------------------------------------------------------- startup
    def _check_prereqs(self) -> None:
        if os.geteuid() != 0:
            raise LocalSlurmError(
                "LocalSlurm needs root (slurmd launches jobs as their users); run the tests as root")
        missing = []
        for b in DAEMON_BINARIES + CLIENT_BINARIES + ("mariadb-admin",):
            path = _which(b)
            if path is None:
                missing.append(b)
            else:
                self.bin[b] = path
        if missing:
            raise LocalSlurmError(
                f"Slurm/munge/MariaDB binaries missing: {', '.join(missing)}; "
                "install them with scripts/install_slurm.sh (as root)")

    def _write_configs(self, ports: dict[str, int]) -> None:
        r = self.root
        assert r is not None
        for d in ("etc", "run", "log", "state", "spool", "db", "db/tmp", "dev", "munge"):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        # jobs/clients of other users need slurm.conf, gres files and the munge socket
        for d in (r, r / "etc", r / "run", r / "dev"):
            os.chmod(d, 0o755)
        # fake GPUs: device files slurm can stat
        for i in range(self.gpus):
            os.symlink("/dev/null", r / "dev" / f"fakegpu{i}")
        # munge key (munged insists on 0400/0600 and owner == its euid)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        user = "root"
        auth_info = f"socket={self.munge_socket}"
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        slurm_conf = f"""\
# written by tests/slurm_harness.py
ClusterName={self.cluster_name}
SlurmctldHost={self.host_name}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo={auth_info},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={self.slurmctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=600
InactiveLimit=0
ReturnToService=2
SlurmdTimeout=60
SlurmctldTimeout=60
MessageTimeout=10
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={self.node_name} NodeAddr=127.0.0.1 NodeHostname={self.host_name} CPUs={self.cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.real_memory_mb}{gres} State=UNKNOWN
PartitionName=cpu Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_time}
PartitionName=high Nodes={self.node_name} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
        self.conf_path.write_text(slurm_conf)
        (r / "etc" / "plugstack.conf").write_text("")
        gres_lines = ["AutoDetect=off"]
        if self.gpus:
            gres_lines.append(
                f"NodeName={self.node_name} Name=gpu File={r}/dev/fakegpu[0-{self.gpus - 1}]")
        self.gres_conf_path.write_text("\n".join(gres_lines) + "\n")
        dbd = f"""\
AuthType=auth/munge
AuthInfo={auth_info}
DbdHost={self.host_name}
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser={user}
PidFile={r}/run/slurmdbd.pid
LogFile={self.slurmdbd_log}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""
        self.slurmdbd_conf_path.write_text(dbd)
        os.chmod(self.slurmdbd_conf_path, 0o600)
        (r / "db" / "init.sql").write_text(
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';\n"
            "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';\n"
            "GRANT ALL PRIVILEGES ON *.* TO 'slurm'@'127.0.0.1';\n"
            "GRANT ALL PRIVILEGES ON *.* TO 'slurm'@'localhost';\n")

    def _daemon_env(self) -> dict[str, str]:
        e = {k: v for k, v in self.full_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        e.update(self.env())
        e["LOCALSLURM_ROOT"] = str(self.root)  # tag: lets stop() find slurmstepd's we caused
        return e

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self._p("log", f"{name}.stdout"), "ab")
        self._logfiles.append(out)
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=self._daemon_env(), cwd=str(self.root), start_new_session=True)
        self._procs[name] = p
        return p

    def _mariadb_opts(self, port: int) -> list[str]:
        r = self.root
        return [
            # a private tmpdir: concurrent installs sharing /tmp failed on each other's temp tables
            f"--datadir={r}/db/data", f"--tmpdir={r}/db/tmp", "--user=root", "--skip-name-resolve",
            "--innodb-log-file-size=8M", "--innodb-buffer-pool-size=64M",
            "--innodb-doublewrite=0", "--innodb-flush-log-at-trx-commit=0",
        ]

    def _wait(self, what: str, cond, timeout: float, watch: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name in watch:
                p = self._procs.get(name)
                if p is not None and p.poll() is not None:
                    raise LocalSlurmError(f"{name} exited (rc={p.returncode}) while waiting for {what}")
            self._last_err = None
            if cond():
                return
            if time.monotonic() > deadline:
                raise LocalSlurmError(f"timed out after {timeout}s waiting for {what}"
                                      f" (last error: {self._last_err or 'none'})")
            time.sleep(0.2)

    def _ok(self, *cmd: str) -> bool:
        try:
            cp = subprocess.run(list(cmd), env=self.full_env(), capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            self._last_err = f"{' '.join(cmd)}: timed out"
            return False
        if cp.returncode != 0:
            self._last_err = f"{' '.join(cmd)}: rc={cp.returncode} {cp.stderr.strip()[-500:]}"
        return cp.returncode == 0

    def start(self, timeout: float = 120) -> "LocalSlurm":
        """Start everything; returns when the node is idle and sacct answers."""
        assert not self._started, "LocalSlurm.start() called twice"
        self._started = True
        t0 = time.monotonic()
        try:
            self._check_prereqs()
            self.root = Path(tempfile.mkdtemp(prefix="localslurm-", dir=self._base_dir))
            ports = dict(zip(("mariadb", "slurmdbd", "slurmctld", "slurmd"), _free_ports(4)))
            self.ports = ports
            self._write_configs(ports)
            atexit.register(self.stop)
            b = self.bin
            r = self.root
            self._spawn("munged", [
                b["munged"], "-F", "--force", f"--socket={self.munge_socket}",
                f"--key-file={r}/munge/munge.key", f"--pid-file={r}/run/munged.pid",
                f"--seed-file={r}/munge/munged.seed", "--num-threads=4"])
            for attempt in (1, 2):
                install = subprocess.run(
                    [b["mariadb-install-db"], "--no-defaults", "--skip-test-db",
                     "--auth-root-authentication-method=normal", *self._mariadb_opts(ports["mariadb"])],
                    capture_output=True, text=True, cwd=str(r), env=self._daemon_env(), timeout=120)
                if install.returncode == 0:
                    break
                shutil.rmtree(r / "db" / "data", ignore_errors=True)
            self.timings["mariadb-install-db"] = time.monotonic() - t0
            if install.returncode != 0:
                raise LocalSlurmError(f"mariadb-install-db failed twice: {install.stdout[-2000:]}{install.stderr[-2000:]}")
            sock = f"{r}/run/mysqld.sock"
            self._spawn("mariadbd", [
                b["mariadbd"], "--no-defaults", *self._mariadb_opts(ports["mariadb"]),
                f"--socket={sock}", f"--port={ports['mariadb']}", "--bind-address=127.0.0.1",
                f"--pid-file={r}/run/mariadbd.pid", f"--log-error={self.mariadb_log}",
                f"--init-file={r}/db/init.sql",
                "--skip-log-bin", "--innodb-lock-wait-timeout=900", "--max-connections=200"])
            self._wait("munged socket", lambda: self.munge_socket.exists(), 30, ("munged",))
            self._wait("mariadbd", lambda: self._ok(b["mariadb-admin"], "--no-defaults", f"--socket={sock}",
                                                    "-uslurm", "-pslurm", "ping"), 60, ("mariadbd",))
            self.timings["mariadbd ready"] = time.monotonic() - t0
            self._spawn("slurmdbd", [b["slurmdbd"], "-D"])
            self._wait("slurmdbd", lambda: self._ok(b["sacctmgr"], "-n", "list", "cluster"), 60, ("slurmdbd",))
            self.timings["slurmdbd ready"] = time.monotonic() - t0
            self.run("sacctmgr", "-i", "add", "cluster", self.cluster_name)
            self.run("sacctmgr", "-i", "add", "account", "default", "Description=tests", "Organization=tests")
            users = {"root", getpass.getuser()}
            self.run("sacctmgr", "-i", "add", "user", ",".join(sorted(users)), "Account=default")
            self.timings["accounts added"] = time.monotonic() - t0
            self._spawn("slurmctld", [b["slurmctld"], "-D", "-f", str(self.conf_path)])
            self._spawn("slurmd", [b["slurmd"], "-D", "-f", str(self.conf_path), "-N", self.node_name])

            def node_idle() -> bool:
                cp = subprocess.run([b["sinfo"], "-h", "-N", "-o", "%T"], env=self.full_env(),
                                    capture_output=True, text=True, timeout=15)
                return cp.returncode == 0 and cp.stdout.split() != [] and all(
                    s.rstrip("*") == "idle" for s in cp.stdout.split())
            self._wait("node idle in sinfo", node_idle, max(10.0, timeout - (time.monotonic() - t0)),
                       ("slurmctld", "slurmd", "slurmdbd"))
            self.timings["node idle"] = time.monotonic() - t0
            self._wait("sacct", lambda: self._ok(b["sacct"], "-n", "-X", "-a"), 30, ("slurmdbd",))
        except Exception as e:
            self._start_failed = True
            msg = f"LocalSlurm failed to start: {e}"
            if self.root is not None:
                msg += f"\n(state kept in {self.root})"
                for name, path in self.log_paths.items():
                    if path.exists():
                        msg += f"\n--- {name} log tail ({path}):\n{_tail(path)}"
            self.stop()
            if isinstance(e, LocalSlurmError):
                raise LocalSlurmError(msg) from e
            raise LocalSlurmError(msg) from e
        self.startup_seconds = time.monotonic() - t0
        return self

    # --------------------------------------------------------------- shutdown
    def _tagged_pids(self) -> list[int]:
        """PIDs this cluster caused that outlived the daemons: slurmstepd's (they carry the
        LOCALSLURM_ROOT tag of slurmd's environment) and job processes (SLURM_JOB_ID set and
        SLURM_CONF = our slurm.conf)."""
        if self.root is None:
            return []
        tag = f"LOCALSLURM_ROOT={self.root}".encode()
        conf = f"SLURM_CONF={self.conf_path}".encode()
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if tag in env or (conf in env and any(e.startswith(b"SLURM_JOB_ID=") for e in env)):
                found.append(int(d))
        return found

    def stop(self, timeout: float = 30) -> None:
        """Cancel jobs, then stop the daemons this instance started (by PID, in order) and wait."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                self.cancel_all(wait=self.kill_wait + 5)
        for name in ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "munged"):
            p = self._procs.get(name)
            if p is None or p.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)
        # slurmstepd's (daemonised by slurmd, so not our children) that outlived the cancel
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self._tagged_pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            if left:
                time.sleep(1)
        for f in self._logfiles:
            with contextlib.suppress(Exception):
                f.close()
        if (self.root is not None and not self._start_failed
                and os.environ.get("LOCALSLURM_KEEP") != "1"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """A started LocalSlurm for the whole session; SLURM_CONF is set in os.environ meanwhile.

    FAILS (never skips) when the cluster cannot start: run the tests as root
    after scripts/install_slurm.sh.
    """
    cluster = LocalSlurm()
    error = None
    try:
        cluster.start()
    except LocalSlurmError as e:
        error = str(e)
    if error is not None:
        pytest.fail(error, pytrace=False)
    saved = {k: os.environ.get(k) for k in cluster.env()}
    os.environ.update(cluster.env())
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cluster.stop()
