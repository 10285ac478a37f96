"""An access_audit plugin that writes committed events to S3.

Each committed transaction becomes one NDJSON object,
``{prefix}/YYYY/MM/DD/HH/{transaction_id}.ndjson`` (optionally gzip). Use
:class:`S3Sink` with explicit arguments, or install the distribution and set
``ACCESS_AUDIT_S3_BUCKET``: its ``s3`` entry point
(:data:`access_audit_s3.plugin.plugin`) is then loaded by every
``AuditEmitter(load_entrypoints=True)``.
"""

from ._sink import DEFAULT_PREFIX as DEFAULT_PREFIX
from ._sink import S3Client as S3Client
from ._sink import S3Sink as S3Sink
from ._sink import object_key as object_key
from .plugin import EnvironmentS3Sink as EnvironmentS3Sink

__all__ = ["DEFAULT_PREFIX", "EnvironmentS3Sink", "S3Client", "S3Sink", "object_key"]
