"""Graph passes. Importing this package registers every pass module found in it.

Each pass lives in its own module here and registers itself with ``@register_pass``; this
``__init__`` imports every module of the package so that a new pass file needs no edit
elsewhere to appear in ``sparsec passes`` and in pipeline text.
"""

from __future__ import annotations

import importlib
import pkgutil

from sparsec.passes.base import (
    DumpGraph,
    NumericCheck,
    Pass,
    PassContext,
    PassError,
    PassInstrument,
    PassOptionError,
    PassResult,
    PassTiming,
    make_pass,
    pass_class,
    register_pass,
    registered_passes,
    run_passes,
)
from sparsec.passes.pipeline import (
    Pipeline,
    PipelineSyntaxError,
    register_pipeline,
    registered_pipelines,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "pipeline"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DumpGraph", "NumericCheck", "Pass", "PassContext", "PassError", "PassInstrument",
    "PassOptionError", "PassResult", "PassTiming", "Pipeline", "PipelineSyntaxError",
    "make_pass", "pass_class", "register_pass", "register_pipeline", "registered_passes",
    "registered_pipelines", "run_passes",
]
