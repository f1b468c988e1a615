"""ClientApps for the process engine's tests, importable by name in a worker process (and light to import).

:data:`app` answers ``query`` messages by what their ``config`` record asks:

* ``meet`` (a folder) and ``of`` (a count): write ``<meet>/<partition id>``, then wait until ``of`` sites have
  written theirs (they handle their messages at the same time), else raise after :data:`MEET_TIMEOUT`;
* ``hold`` (a folder): write ``<hold>/<partition id>``, then sleep until the process is killed;
* ``fail``: raise :class:`RuntimeError` with that text;
* anything else: reply with the node's partition id and the process id that handled it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

MEET_TIMEOUT = 30.0
HOLD_SECONDS = 600.0

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    config = message.content.config_records["config"]
    pid = int(context.node_config["partition-id"])
    if "fail" in config:
        raise RuntimeError(str(config["fail"]))
    if "meet" in config:
        _meet(Path(str(config["meet"])), pid, int(str(config["of"])))
    if "hold" in config:
        (Path(str(config["hold"])) / str(pid)).touch()
        time.sleep(HOLD_SECONDS)
    return Message(RecordDict({"info": ConfigRecord({"partition-id": pid, "pid": os.getpid()})}), reply_to=message)


def _meet(folder: Path, pid: int, count: int) -> None:
    """Wait until ``count`` sites are in ``folder`` (this one included)."""
    (folder / str(pid)).touch()
    deadline = time.monotonic() + MEET_TIMEOUT
    while len(list(folder.iterdir())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(folder.iterdir()))} of {count} sites met")
        time.sleep(0.01)
