"""Where a process runs: torchrun, a SLURM task, or a single process."""

from __future__ import annotations

from brainmt.distributed import detect, expand_hostlist


def test_single_process():
    env = detect({})
    assert env.launcher == "single" and env.world_size == 1 and env.is_main and not env.distributed


def test_torchrun_wins_inside_slurm():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400",
                  "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == \
        ("torchrun", 3, 1, 8, "n1", 29400)


def test_slurm_task_layout_and_port_from_job_id():
    base = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_RESTART_COUNT": "2"}
    env = detect(base)
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("slurm", 5, 1, 8)
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 123456 % 6000 and env.restart_count == 2
    assert detect({**base, "SLURM_PROCID": "0"}).master_port == env.master_port     # every task agrees


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a[1-2]-ib,b[08-10]") == ["a1-ib", "a2-ib", "b08", "b09", "b10"]
    assert expand_hostlist("node5") == ["node5"]


def test_submitit_local_tasks_form_one_job_and_win_over_an_enclosing_slurm_allocation():
    base = {"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
            "SUBMITIT_LOCAL_JOB_ID": "4321"}
    env = detect({**base, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.master_addr) == ("submitit-local", 1, 1, 2, "127.0.0.1")
    assert env.master_port == 20000 + 4321 % 6000 == detect({**base, "SUBMITIT_LOCAL_GLOBALID": "0"}).master_port
    assert not detect({**base, "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0"}).distributed
