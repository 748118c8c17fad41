"""triage-node: a DICOM node that triages head CT for intracranial hemorrhage."""

__version__ = "0.1.0"
