"""The capturing process's heap and the cyclic garbage collector.

A full pass of the collector walks every tracked object while holding the GIL, and the capture thread waits
for all of it: in the page's process (Streamlit, pandas, Plotly, pyarrow imported and a page drawn) that is
~100,000 objects and ~40 ms of CPU on the reference machine, a stall the capture ring must absorb each time.
Nearly all of them are modules, functions and classes that live as long as the process, so they are moved to
the collector's permanent generation (gc.freeze, O(1)) once: full passes then walk only what came later.
Frozen objects are still freed by reference counting; a reference cycle among them is not, until
release_gc() hands them back.
"""

from __future__ import annotations

import gc
import logging
import threading

log = logging.getLogger(__name__)
_lock = threading.Lock()
_settled = False


def keep_out_of_gc() -> None:
    """Leave everything alive now out of the cyclic garbage collector's full passes (gc.freeze)."""
    gc.freeze()


def release_gc() -> None:
    """Give every frozen object back to the collector (its reference cycles can then be freed)."""
    gc.unfreeze()


def settle_once() -> bool:
    """Freeze what is alive after the page's first full draw, once per process; True the time it does.

    By then the page has imported what it draws with (Plotly builds its validators at the first figure), so
    what is frozen is almost all import-time objects. The page's own objects alive at that moment are frozen
    with them: one draw's worth, once, whose reference cycles (if any) wait for release_gc()."""
    global _settled
    with _lock:
        if _settled:
            return False
        _settled = True
    gc.collect()  # what is garbage now is freed, not frozen
    keep_out_of_gc()
    log.debug("%d objects left out of the collector's full passes", gc.get_freeze_count())
    return True
