"""BentoML's ``bentoml.validators``: what an input annotated with ``Annotated[...]`` must be.

``Annotated[np.ndarray, Shape((-1, 4)), DType("float32")]``, ``Annotated[Path, ContentType("image/png")]``,
``Annotated[pd.DataFrame, DataframeSchema(orient="records", columns=["a", "b"])]``, under the names a port from
BentoML writes (``bl.validators.Shape``); the same objects as ``bl.Shape``, ``bl.DType``, ``bl.ContentType`` and
``bl.DataframeSchema``.
"""

from .sdk.io import ContentType, DataframeSchema, DType, Shape

__all__ = ["ContentType", "DataframeSchema", "DType", "Shape"]
