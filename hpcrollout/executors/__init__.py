"""Executors: where a run's array tasks run (this machine, SLURM) and what runs inside one task.

- ``base.py``: the ``Executor`` interface (active_tasks, reserve, submit, wait) and ``get_executor``;
- ``local.py``: tasks as processes on this machine (task locks and records);
- ``slurm.py``: a submitit job array (sbatch options, the dry run's script, squeue and sacct);
- ``slurm_task.py``: the checkpointable callable each SLURM array task runs;
- ``jobs.py``: the jobs registry, RUN_DIR/jobs.json;
- ``engine_group.py``: ``executor.engines_per_task`` engine processes inside one task.

A new executor (LSF, PBS, Kubernetes jobs) is one more module with one ``Executor`` subclass, named in
``get_executor``. Every path these modules use is named by rundir.py.
"""
