"""The worker: the faust app, the batch ingest loop, the state log, recovery and loop health."""
