"""The segmentation layer's error for a model that cannot be used (no imports: the manifest and the backend
registry both raise it, and neither may import the other's module for it)."""


class ManifestError(ValueError):
    """A model folder or manifest cannot be used; the message names the file and the problem."""
