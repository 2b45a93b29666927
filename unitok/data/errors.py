"""Errors raised by ``unitok.data`` with messages that tell the user what to do."""

from __future__ import annotations

DEBIAN_DATA_PACKAGES = "dataset-fashion-mnist visp-images-data"
INSTALL_HINT = f"install it with: sudo apt-get install -y {DEBIAN_DATA_PACKAGES} (or run `make install`)"


class DataNotFoundError(FileNotFoundError):
    """A data source is missing on this machine; the message names the install command."""
