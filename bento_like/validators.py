"""BentoML's ``bentoml.validators``: what an input annotated with ``Annotated[...]`` must be.

``Annotated[np.ndarray, Shape((-1, 4)), DType("float32")]`` and the other validators, under the names a port from
BentoML writes (``bl.validators.Shape``); the same objects as ``bl.Shape`` and ``bl.DType``.
"""

from .sdk.io import DType, Shape

__all__ = ["DType", "Shape"]
