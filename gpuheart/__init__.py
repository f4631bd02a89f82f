"""gpuheart: light-sheet heart scan -> vascular mask -> 3D mesh, on one GPU or on the CPU."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "PipelineConfig", "RunResult", "open_scan", "__version__"]


def __getattr__(name):
    # Lazy so that `import gpuheart` stays cheap (torch, numba and zarr load only when a stage needs them).
    if name in ("Pipeline", "PipelineConfig", "RunResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "open_scan":
        from .io import open_scan

        return open_scan
    raise AttributeError(f"module 'gpuheart' has no attribute {name!r}")


def __dir__():
    # the lazy names too, so tab completion and dir() offer them before first use
    return sorted(set(globals()) - {"annotations"} | set(__all__))
