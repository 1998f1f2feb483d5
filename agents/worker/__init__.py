"""The worker: the faust app, the batch ingest loop, recovery from the state log, and loop health."""
