"""Executors: where a run's array tasks run (this machine, SLURM) and what runs inside one task."""
