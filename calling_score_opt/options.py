"""Command-line options several commands share: a study, its storage and its artifact folder.

One definition each, so ``cso grid``, ``search``, ``trials``, ``best``, ``export``,
``report``, ``dashboard``, ``studies`` and ``registry register`` read them the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

#: A storage URL from the environment: it keeps a PostgreSQL password off the command line
#: (and out of shell history); libpq's PGPASSWORD and ~/.pgpass keep it out of the URL too.
STORAGE_ENV = "CSO_STORAGE"

Study = Annotated[str, typer.Option(help="Optuna study name.")]
Storage = Annotated[
    str | None,
    typer.Option(
        envvar=STORAGE_ENV,
        show_envvar=False,
        help=f"Optuna storage URL, else ${STORAGE_ENV}. (default: sqlite:///studies/<study>.db)",
    ),
]
Artifacts = Annotated[
    Path | None,
    typer.Option(
        help="Folder of the study's artifacts: weights, learning curves, ensembles. "
        "(default: beside the SQLite file)"
    ),
]
