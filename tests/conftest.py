"""Shared fixtures; under CI=true a skipped test fails the run (CI must run every test it selects)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SLURM_SCRIPTS = Path(__file__).parent / "slurm"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd", "mariadbd")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM (munge, MariaDB + slurmdbd, slurmctld, slurmd) for the session; stopped by PID."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"a local SLURM needs root and Debian's slurm/munge/mariadb packages (missing: {missing}); "
                    ".ci/run installs them")
    # one local SLURM per machine (fixed ports): a second test session waits here for the first to finish
    lock = open(Path(tempfile.gettempdir()) / "brainmt-slurm-tests.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    # munged wants every directory above its socket to be searchable by all: pytest's tmp dirs are 0700
    directory = Path(tempfile.mkdtemp(prefix="brainmt-slurm-"))
    directory.chmod(0o755)
    env = {**os.environ, "SLURM_LOCAL_DIR": str(directory)}
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], env=env, capture_output=True, text=True,
                             timeout=300)
    if started.returncode != 0:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], env=env, capture_output=True, timeout=120)
        raise RuntimeError(f"could not start SLURM:\n{started.stdout}\n{started.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "etc" / "slurm.conf")
    try:
        yield directory
    finally:
        stopped = subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], env=env, capture_output=True, text=True,
                                 timeout=180)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(directory, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture
def slurm(slurm_cluster):
    """The session's SLURM for one test; the jobs a test leaves behind (a failed one) are cancelled after it, so
    that they do not hold the node's CPUs while the next tests wait."""
    yield slurm_cluster
    left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout.split()
    if left:
        subprocess.run(["scancel", *left], capture_output=True, timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], capture_output=True, text=True,
                                                             timeout=60).stdout.strip():
            time.sleep(1)


def _in_use(path: Path) -> bool:
    """Whether a running process has its working directory or an open file under ``path`` (Linux /proc)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            links = [proc / "cwd", *(proc / "fd").iterdir()]
        except OSError:                     # gone, or not ours to read
            continue
        for link in links:
            try:
                if Path(os.readlink(link)).is_relative_to(path):
                    return True
            except OSError:
                continue
    return False


@pytest.fixture(scope="session", autouse=True)
def ray_session_dirs():
    """Remove, after the session, the Ray session folders its sweeps left in the temp dir (an interrupted sweep keeps
    its logs by design, and a resumed one of the local executor runs under another job id): those this session made
    and no process still uses."""
    from brainmt.tune.ray_cluster import temp_dir

    roots = {Path(temp_dir("x")).parent, Path("/tmp")}
    before = {p for root in roots for p in root.glob("brainmt-ray-*")}
    yield
    for path in {p for root in roots for p in root.glob("brainmt-ray-*")} - before:
        if not _in_use(path):
            shutil.rmtree(path, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Turn skips into a failure when CI=true."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) were skipped; in CI a skip is a failure", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Shards of 20 synthetic subjects (20x24x20 voxels, 24 frames, chunks of 4), shared read-only by tests."""
    from brainmt.data.shards import ShardOptions, shard_dataset
    from brainmt.data.synthetic import write_synthetic_bids

    root = tmp_path_factory.mktemp("small-shards")
    write_synthetic_bids(root / "raw", 20, 24, (20, 24, 20), seed=1)
    shard_dataset(root / "raw", root / "raw" / "participants.tsv", root / "shards",
                  options=ShardOptions(min_frames=16, chunk_frames=4), progress=False)
    return root / "shards"
