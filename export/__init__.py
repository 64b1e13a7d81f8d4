"""polysense.export: ONNX export of each encoder and the fusion head, parity checks, and the bundle writer
(needs the `train` extra: torch, onnx)."""

from polysense.export.parity import ExportError
from polysense.export.variants import VariantPolicy
from polysense.export.writer import ExportReport, export_run

__all__ = ["ExportError", "ExportReport", "VariantPolicy", "export_run"]
