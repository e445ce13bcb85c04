"""Run the trial suite against PostgreSQL, or say loudly why it is not run."""

from __future__ import annotations

import os
import sys

from twisted.scripts.trial import run

from tests.utils import POSTGRES_ENV


def main() -> None:
    """Exec trial with the arguments given, if a PostgreSQL URL is set."""
    if not os.environ.get(POSTGRES_ENV):
        banner = "!" * 78
        print(
            f"{banner}\n"
            f"!! {POSTGRES_ENV} is not set: the PostgreSQL suite was NOT run.\n"
            f"!! Set it, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test\n"
            f"{banner}",
            file=sys.stderr,
        )
        sys.exit(0)
    sys.argv = ["trial", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
