"""History that survives restarts: a store interface, the embedded DuckDB store, the rollup that feeds it.

``Rollup`` (a consumer stage's helper) turns parsed packet batches into per-second, per-minute and
alert rows and hands them to a ``Store`` in batches every STORE_FLUSH_S; ``history`` answers range
questions with the summary's JSON shape; ``export`` writes CSV, Parquet and header-only pcaps.
SQL and schema live only in this package.
"""

from store.base import SCHEMA_VERSION, Store, StoreBatch, StoreStatus, TimeRange

__all__ = ["SCHEMA_VERSION", "Store", "StoreBatch", "StoreStatus", "TimeRange", "open_store"]


def open_store(path: str | None = None, **kw) -> Store:
    """The embedded store at `path` (default: STORE, else the per-user data folder), opened."""
    from store.embedded import EmbeddedStore

    s = EmbeddedStore(path, **kw)
    s.open()
    return s
