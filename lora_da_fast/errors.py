"""Exceptions. ``LoraDAError`` subclasses are user-facing: the CLI prints their message on one line
and exits with status 2 (bad input) without a traceback."""


class LoraDAError(Exception):
    """Base class of the errors this library raises on purpose."""


class ConfigError(LoraDAError, ValueError):
    """An invalid configuration value."""


class DataError(LoraDAError, ValueError):
    """Calibration data that cannot be used."""


class TargetError(LoraDAError, ValueError):
    """Target modules that do not exist or cannot be adapted."""


class NumericalError(LoraDAError, RuntimeError):
    """Non-finite statistics, a failed factorisation, or statistics that are all zero."""


class DistributedError(LoraDAError, RuntimeError):
    """Another rank failed (or vanished) during a distributed step; its own log has the details."""
