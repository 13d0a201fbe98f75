"""OpenTelemetry GenAI: export sessions as spans, and turn GenAI spans into sessions.

* `export_session`, `OtelExportSink` (`phi_session.otel.export`): sessions -> spans;
* `SpanIngestor`, `IngestSpanProcessor`, `ingest_otlp` (`phi_session.otel.ingest`):
  spans -> events -> a recorder;
* `phi_session.otel.endpoint`: a local OTLP/HTTP receiver (``phi-session serve --otlp``).

Needs ``pip install 'phi-session[otel]'`` (``[otlp]`` for protobuf payloads and the
endpoint); importing `phi_session` itself imports none of it.
"""

from __future__ import annotations

from typing import Any

from ._sdk import require_sdk

__all__ = ["IngestSpanProcessor", "OtelExportSink", "SpanIngestor", "export_session", "ingest_otlp"]

_HOMES = {
    "export_session": "export",
    "OtelExportSink": "export",
    "SpanIngestor": "ingest",
    "IngestSpanProcessor": "ingest",
    "ingest_otlp": "ingest",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_sdk()
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{home}"), name)
