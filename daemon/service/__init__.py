"""The service: the daemon process, its worker and jobs, checkpoints, replay and serving."""
