"""The Dagster code location: assembles ``Definitions`` from ``assets/``, ``resources/`` and ``checks/``.

This is the only module of :mod:`cbp_platform` that imports Dagster. The asset graph is filled stage by stage
(ingestion, segmentation, metrics, analysis); until then the location loads with no assets.
"""

from __future__ import annotations

import dagster as dg

defs = dg.Definitions(assets=[])
