"""The exception family of cso: the CLI turns each into one clear line and a non-zero exit."""

from __future__ import annotations


class CsoError(Exception):
    """Base of every error cso raises on purpose; its message is shown to the user as is."""

    exit_code = 2


class DataError(CsoError):
    """Raised when a data file cannot be read or trained on (names the file, record and field)."""


class ConfigError(CsoError):
    """Raised when options contradict each other or a value is out of its allowed range."""


class TrainingError(CsoError):
    """Raised when a training run cannot go on, e.g. its loss became non-finite."""


class ExportError(CsoError):
    """Raised when an ONNX export breaks the app's contract or fails its parity check."""


class StudyError(CsoError):
    """Raised when a study's storage cannot be used for the requested run."""


class ContractError(CsoError):
    """Raised when the app's feature vectors differ from what the model expects, or when a
    vectors file (the app's, the expected ones, or a model's feature list) cannot be read."""
