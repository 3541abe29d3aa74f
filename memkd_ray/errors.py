"""Errors that the CLI reports as bad usage or bad input (exit code 2, one-line reason)."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad configuration, bad arguments or bad data; the message names the key or file."""


class ConfigError(UserInputError):
    """A configuration file or override that cannot be used."""


class DataError(UserInputError):
    """A benchmark tree, image or mask that cannot be used."""


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than this package decodes (a likely
    decompression bomb)."""


class CheckpointError(UserInputError):
    """A checkpoint that is missing, malformed or fails its integrity check."""


class VerificationError(RuntimeError):
    """Something this tool produced failed its own check (exit 1, one-line reason), e.g. an
    ONNX export that ONNX Runtime does not reproduce."""
