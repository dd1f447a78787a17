"""pleascc: merge two trained networks of one architecture with PLeaS, over torch.fx, to ONNX."""

from pleascc.blas_threads import sleep_idle_blas_threads
from pleascc.passes.errors import PleasccError

sleep_idle_blas_threads()  # before anything loads scipy's OpenBLAS

__version__ = "0.1.0"

__all__ = ["PleasccError", "merge", "export_onnx", "MergeResult", "__version__"]


def __getattr__(name):
    # The API pulls in torch; keep `import pleascc` (and `pleascc --version`) light.
    if name in ("merge", "export_onnx", "MergeResult"):
        from pleascc import api

        return getattr(api, name)
    raise AttributeError(name)
