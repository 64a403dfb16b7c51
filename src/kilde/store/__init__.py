"""The embedded store: one DuckDB file under the data directory, with one writer."""

from kilde.store.database import Store
from kilde.store.writer import WriteBatch, Writer, WriteResult

__all__ = ["Store", "WriteBatch", "WriteResult", "Writer"]
