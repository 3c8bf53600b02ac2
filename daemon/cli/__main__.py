"""``python -m daemon.cli`` runs the ``editd`` command."""

from daemon.cli import main

main()
