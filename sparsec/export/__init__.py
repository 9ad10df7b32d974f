"""Exports of compiled or pruned models to other runtimes' formats (ONNX)."""

from __future__ import annotations

from sparsec.export.onnx import OnnxExport, OnnxExportError, export_onnx

__all__ = ["OnnxExport", "OnnxExportError", "export_onnx"]
