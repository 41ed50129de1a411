"""The Dagster code location: the per-area definitions merged with the deployment profile's.

Each area (ingestion, segmentation, analysis, model comparison) lists its assets, checks, jobs, sensors and
schedules in its own module of this package; the deployment profile adds the resources, the executor and the run
reaper (:func:`orchestration.profiles.profile_definitions`), and shows the warehouse assets under the profile's
backend (:func:`orchestration.profiles.show_warehouse_kind`). This module only merges them
(:meth:`dagster.Definitions.merge`, as Dagster's reference projects do).

With :mod:`orchestration`, this package is the only code under :mod:`cbp_platform` that imports Dagster (the ``cbp``
command line reaches it only through :mod:`orchestration`). Heavy libraries (torch, Great Expectations) are imported
inside the functions that use them, so the location loads in seconds.
"""

from __future__ import annotations

import dagster as dg

from cbp_platform import deployment
from cbp_platform.definitions import analysis, comparison, ingestion, segmentation
from orchestration.profiles import profile_definitions, show_warehouse_kind

AREAS = (ingestion, segmentation, analysis, comparison)


def build_definitions(profile: str | None = None) -> dg.Definitions:
    profile = profile or deployment.profile()
    return show_warehouse_kind(dg.Definitions.merge(*(area.defs for area in AREAS), profile_definitions(profile)),
                               profile)


defs = build_definitions()
