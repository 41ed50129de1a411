"""Registering the test nnU-Net model (the ``nnunet_model`` session fixture, built by nnU-Net itself with
:mod:`cbp_platform.segmentation.backends.nnunet_phantom`) under the platform's classes."""

from __future__ import annotations

from pathlib import Path

from cbp_platform.segmentation.backends import nnunet_phantom as phantom

LABEL_ARGS = {v: k for k, v in phantom.PLATFORM_OF.items()}      # platform class -> the test model's label id


def register_phantom_model(registry: Path, folder: Path, name: str = "phantom-nnunet", **kw):
    """``register`` the test model's ``folder`` as ``name`` with its own label table, channels and orientation
    (each overridable through ``kw``); returns (manifest, manifest path)."""
    from cbp_platform.segmentation.registry import register

    kw.setdefault("labels", dict(phantom.PLATFORM_OF))
    kw.setdefault("inputs", ("water", "fat"))
    kw.setdefault("orientation", phantom.ORIENTATION)
    return register(registry, folder, backend="nnunetv2", name=name, **kw)
