"""The capturing process's heap and the cyclic garbage collector.

A full pass of the collector walks every tracked object while holding the GIL, and the capture thread waits
for all of it: in the page's process (Streamlit, pandas, Plotly, pyarrow imported and a page drawn) that is
~100,000 objects and ~40 ms of CPU on the reference machine, a stall the capture ring must absorb each time.
Nearly all of them are modules, functions and classes that live as long as the process, so they are moved to
the collector's permanent generation (gc.freeze, O(1)) once: full passes then walk only what came later.

The price: frozen objects are still freed by reference counting, but a reference cycle among them is never
freed until release_gc(). Frozen at the first full draw, that is what was alive then besides the imports:
the engine (which lives as long as the process anyway) and the sessions open then, as they were (Streamlit's
script runner and session state refer to each other, so when such a tab closes, what its state held at that
moment stays: for the first viewer at its first draw, a few widgets' values and settings). Once per process,
never repeated; cycles among later objects are collected as before.
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
    """Give every frozen object back to the collector (its reference cycles can then be freed); the next full
    draw settles the heap again."""
    global _settled
    with _lock:
        gc.unfreeze()
        _settled = False


def settle_once() -> bool:
    """Freeze what is alive after the page's first full draw, once per process; True the time it does.

    By then the page has imported what the live view draws with (Plotly builds its validators at the first
    figure), so what is frozen is almost all import-time objects; what other views import later (history,
    fleet) stays the collector's, as before. See the module's note for what else is frozen."""
    global _settled
    with _lock:
        if _settled:
            return False
        _settled = True
    gc.collect()  # what is garbage now is freed, not frozen
    keep_out_of_gc()
    log.debug("%d objects left out of the collector's full passes", gc.get_freeze_count())
    return True
