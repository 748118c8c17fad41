"""The one exception tree of triage-node.

Errors from pynetdicom, pydicom, SQLAlchemy and the OS are translated where they enter our
code (``raise X(...) from exc``), so callers only ever catch these::

    TriageNodeError
    ├── ConfigError              a config file, key or value is wrong (names the key)
    ├── StoreError               persistent state could not be read or written
    │   ├── SpoolError           the spool (image files) failed: disk full, permissions
    │   └── DatabaseError        the database is unreachable or refused the write
    ├── DicomError               DICOM data or protocol problems
    │   ├── InvalidDatasetError  a dataset we cannot parse or that breaks a rule we rely on
    │   └── AssociationError     a peer refused, aborted or never answered
    │       ├── RetryableAssociationError   worth trying again later (peer down, timeout)
    │       └── PermanentAssociationError   will not succeed by retrying (rejected, bad AE)
    ├── ArtifactError            a model artifact is missing, corrupt or incompatible
    └── NodeStateError           an operation is not possible in the current state
"""

from __future__ import annotations


class TriageNodeError(Exception):
    """Base class of every error raised by triage-node."""


class ConfigError(TriageNodeError, ValueError):
    """A configuration file, key or value is invalid."""


class StoreError(TriageNodeError):
    """Persistent state could not be read or written."""


class SpoolError(StoreError):
    """An image file could not be written to or read from the spool."""


class DatabaseError(StoreError):
    """The database is unreachable or refused an operation."""


class DicomError(TriageNodeError):
    """A DICOM data or protocol problem."""


class InvalidDatasetError(DicomError, ValueError):
    """A dataset cannot be parsed, or breaks a rule the node relies on."""


class AssociationError(DicomError):
    """A DICOM peer refused, aborted, or never answered."""


class RetryableAssociationError(AssociationError):
    """An association failure that may succeed later (peer down, timeout, busy)."""


class PermanentAssociationError(AssociationError):
    """An association failure that retrying will not fix (rejected, unknown AE)."""


class ArtifactError(TriageNodeError):
    """A model artifact is missing, corrupt (checksum) or incompatible with this version."""


class NodeStateError(TriageNodeError):
    """An operation is not possible in the node's current state."""
