"""The SLURM array task's old import path, kept for runs submitted before it moved to executors/slurm_task.py.

submitit pickles the ``SlurmTask`` of a run into its job folder when the run is submitted, under the module
path of that day; SLURM's own requeue (a preemption, a timeout) unpickles it again with whatever hpcrollout is
installed by then. This module lets a run submitted by an hpcrollout older than the executors/ layer be
requeued by a newer one: the object's state (``run_dir``, ``_requeued``) is the same in both.
"""

from hpcrollout.executors.slurm_task import SlurmTask, read_task_record

__all__ = ["SlurmTask", "read_task_record"]
