"""Errors raised by the model store; each message names the tag, file or archive member at fault."""

from __future__ import annotations


class ModelStoreError(Exception):
    """Base class: catch this to handle every model store failure."""


class InvalidTagError(ModelStoreError, ValueError):
    """A name, version or tag does not follow the tag grammar."""


class ModelNotFoundError(ModelStoreError, LookupError):
    """No model matches the tag; the message lists the tags that do exist."""


class ModelExistsError(ModelStoreError):
    """A version with that name already holds different content."""


class ManifestError(ModelStoreError):
    """A manifest is missing, unreadable or describes something other than its files."""


class IntegrityError(ModelStoreError):
    """A stored file does not match the size or digest its manifest records."""


class UnsafeArchiveError(ModelStoreError):
    """An archive tried to write outside its model, held links or devices, or did not match its manifest."""


class TrustRequiredError(ModelStoreError):
    """Importing this archive would let its pickles run code on load; pass trust=True (CLI: --trust)."""


class AdapterError(ModelStoreError):
    """No adapter can save the object, or the adapter named by a manifest is not registered."""
