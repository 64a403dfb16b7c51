"""The pipeline every channel ends in: normalize, plan check, enrich, durable write."""

from kilde.pipeline.ingest import IngestResult, Outcome, Pipeline
from kilde.pipeline.normalize import Envelope, Rejection

__all__ = ["Envelope", "IngestResult", "Outcome", "Pipeline", "Rejection"]
