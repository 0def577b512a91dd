"""An extraction worker that hangs on clips named ``hang*``, as a decoder stuck on a hostile file would.

``WorkerPool`` spawns its workers with ``extract.workers._child``; a test points that name at
``child`` below. The spawned process imports this module by name (the tests folder is on the
path it inherits), so the hang happens in the worker, where a real one would.
"""
import time
from pathlib import Path

from extract import run, workers


def child(conn, *config) -> None:
    real = run.clip_row

    def clip_row(item, *args):
        if Path(item.path).name.startswith("hang"):
            time.sleep(60)    # far past any limit a test sets; a pool that failed to stop it gets an `ok` row
        return real(item, *args)

    run.clip_row = clip_row     # _child imports it from extract.run after this
    workers._child(conn, *config)
