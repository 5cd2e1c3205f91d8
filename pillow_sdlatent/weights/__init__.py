"""Data shipped with the package: network weights and fitted tables (origins and licences in NOTICE.md)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
