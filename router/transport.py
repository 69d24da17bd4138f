"""How a file leaves the box: one call for every kind of destination.

`router.route` calls `send_files` and knows nothing else of the wire. Behind it, a *link*
carries a run of files to one destination; there are two kinds:

- `router.send.CStoreSender`: C-STORE over DIMSE associations (`Endpoint`);
- `router.stow.StowSender`: STOW-RS requests to a DICOMweb service (`WebEndpoint`).

A link is built as `factory(on_result, label=...)` and has one method, `run(files)`, with
one contract for both kinds:

- every file that got an answer is reported through `on_result`, the moment the answer is
  known, as a `StoreResult` (stored, refused with its status and reason, or sent without
  an answer: status None), its `association` the id of the association or request that
  carried it (`label` + a number);
- a file never attempted is not reported, so the caller retries exactly what is missing;
- `SendError` when the destination cannot be reached or keeps failing, `transient` if a
  later attempt may do better.

Spreading one job's files over several links at once (associations in processes,
requests in threads) is `router.parallel`'s concern; how many, `lanes_for`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from router import parallel
from router.model import AnyEndpoint, DicomFile, Timeouts, WebEndpoint
from router.parallel import LinkFactory, OnResult
from router.send import CStoreSender
from router.stow import StowSender


def link_factory(endpoint: AnyEndpoint, timeouts: Timeouts) -> LinkFactory:
    """What builds a link to `endpoint` (picklable, for a sending process)."""
    if isinstance(endpoint, WebEndpoint):
        return partial(StowSender, endpoint, timeouts)
    return partial(CStoreSender, endpoint, timeouts)


def lanes_for(endpoint: AnyEndpoint, files: Sequence[DicomFile]) -> int:
    """How many links `files` are spread over at once (small jobs: one)."""
    return parallel.associations_for(endpoint, files)


def send_files(
    endpoint: AnyEndpoint,
    files: Sequence[DicomFile],
    timeouts: Timeouts,
    on_result: OnResult,
) -> None:
    """Store `files` at `endpoint` under the contract above; `on_result` is called in this
    thread, one answer at a time, whatever the number of lanes.

    With several lanes, each share goes on to its end whatever happens to the others, and
    the errors are raised together once all are done (`router.parallel`).
    """
    if not files:
        return
    factory = link_factory(endpoint, timeouts)
    count = lanes_for(endpoint, files)
    if count == 1:
        factory(on_result, label="").run(files)
    elif isinstance(endpoint, WebEndpoint):
        parallel.in_threads(factory, endpoint.key, files, on_result, count)
    else:
        parallel.in_processes(factory, endpoint.key, files, on_result, count)
