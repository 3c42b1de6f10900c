"""``python -m omnict_node`` = ``omnict-node`` (used to start child processes with the same interpreter)."""

from omnict_node.cli import main

main()
