"""A Storage SCP in a process of its own: a destination that a test can crash by its pid.

    python -m tests.scp_process PORT EVENTS [HOLD_UID]

Serves C-STORE (any storage class, any transfer syntax) on 127.0.0.1:PORT, called AE
title STORESCP, and appends one line per event to the file EVENTS, written before the
answer goes out: `association` for each association request, `stored UID` for each
instance it keeps. On the instance HOLD_UID it writes `stored UID`, then `holding UID`,
and does not answer: the test kills the process there (SIGKILL, by pid), which is "the
destination crashed after storing it", and may start it again on the same port. Started
with `tests.fixtures_dcmtk.die_with_parent`, it dies with the test.
"""

from __future__ import annotations

import os
import sys
import threading

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt


def main(argv: list[str]) -> None:
    port, events_path = int(argv[0]), argv[1]
    hold = argv[2] if len(argv) > 2 else None
    events = open(events_path, "a", buffering=1, encoding="ascii")  # noqa: SIM115 (process-long)
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            events.write(line + "\n")

    def on_requested(event: evt.Event) -> None:
        write("association")

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        write(f"stored {uid}")
        if uid == hold:
            write(f"holding {uid}")
            threading.Event().wait()  # until killed
        return 0x0000

    ae = AE(ae_title="STORESCP")
    ae.maximum_pdu_size = 16382
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, list(ALL_TRANSFER_SYNTAXES))
    handlers = [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)]
    write(f"listening {os.getpid()}")
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main(sys.argv[1:])
