"""The serving layer in Redis: the per-user writer and its Lua scripts, the snapshot store, CSV presentation."""
