"""Tools around the worker: the demo, the traffic simulator and the backfill driver."""
