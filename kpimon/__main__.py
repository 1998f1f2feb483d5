"""``python -m kpimon``: the ``kpimon`` command."""

from kpimon.agents.cli import main

main()
