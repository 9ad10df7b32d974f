"""sparsec: make pretrained neural networks sparse, accurate and fast.

Ways in: :func:`sparsec.compile` (Python), the ``sparsec`` command (pipeline text), and
artifacts written by :func:`sparsec.save` / ``sparsec compile -o DIR``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # The API pulls in torch, transformers and numba; import it on first use so that
    # `import sparsec.formats` or the CLI's argument parsing stay fast.
    if name in ("compile", "save", "load", "CompiledModule", "CompileReport"):
        from sparsec import api
        from sparsec.runtime.compiled import CompiledModule

        return CompiledModule if name == "CompiledModule" else getattr(api, name)
    if name == "generate":
        from sparsec.runtime.generate import generate

        return generate
    if name == "export_onnx":
        from sparsec.export.onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'sparsec' has no attribute {name!r}")


__all__ = ["compile", "save", "load", "generate", "export_onnx", "CompiledModule", "CompileReport", "__version__"]
