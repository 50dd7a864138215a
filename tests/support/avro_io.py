"""Producer-side Avro for tests and the demo: encodes events the way upstream services would.

Deliberately independent of `service.avro.codec` (it parses the shipped `.avsc` files with fastavro
itself), so a codec bug cannot hide behind an encoder that shares it.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro

SCHEMA_FILES = {"inference": "inference.avsc", "row_update": "row_update.avsc", "log_update": "log_update.avsc"}
SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


class AvroEncoder:
    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.raw: dict[str, dict[str, Any]] = {
            kind: json.loads((schemas_dir / name).read_text()) for kind, name in SCHEMA_FILES.items()
        }
        self._parsed = {kind: fastavro.parse_schema(schema) for kind, schema in self.raw.items()}

    def plain(self, kind: str, datum: dict[str, Any]) -> bytes:
        """Plain Avro binary, written with the shipped schema."""
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._parsed[kind], datum)
        return out.getvalue()

    def confluent(self, schema_id: int, schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
        """Confluent wire format: magic byte 0, the 4-byte schema id, then Avro written with `schema`."""
        out = io.BytesIO()
        out.write(struct.pack(">bI", 0, schema_id))
        fastavro.schemaless_writer(out, fastavro.parse_schema(schema), datum)
        return out.getvalue()


def inference(
    pipeline_id: str, row: dict[str, Any], *, inference_id: str | None = None, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"inference_pipeline_id": pipeline_id, "row": row, "inference_id": inference_id, "config": config}


def row_update(
    pipeline_id: str, inference_id: str, row: dict[str, Any], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"inference_pipeline_id": pipeline_id, "inference_id": inference_id, "row": row, "config": config}


def log_update(
    reference_id: str, *, output: str | None = None, error: str | None = None, duration: float | None = None
) -> dict[str, Any]:
    return {"reference_id": reference_id, "output": output, "error": error, "duration": duration}
