"""The environment variable that tells a submitted job's driver its run directory.

Ray 2.60 unpacks a job's working_dir again (a new directory at the same path) when the job's own
tasks and actors start with it, which leaves the driver's current directory deleted under it: the
driver works from this directory instead. A module of its own because the CLI reads it on every
command, and `cluster.ray_jobs` takes 0.17 s to import.
"""
JOB_DIR_ENV = "RETRIEVAL_JOB_DIR"
