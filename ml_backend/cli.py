"""The ``adclick`` command: ``adclick worker`` runs queued trainings (``ml_backend.worker``);
every other command is ``python -m adclick_core`` (training, evaluation, benchmarks)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:
        from .worker import main as worker_main

        return worker_main(argv[1:])
    from adclick_core.cli import main as core_main

    return core_main(argv)


if __name__ == "__main__":
    sys.exit(main())
