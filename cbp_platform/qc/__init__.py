"""Visual quality control of segmentations: QC images, the triage score, reviewers' decisions, the review app."""

import os

APP_URL_ENV = "CBP_QC_URL"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def app_url() -> str:
    """Where reviewers open the review app (``cbp qc serve``): ``$CBP_QC_URL``, else the loopback default."""
    return os.environ.get(APP_URL_ENV) or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
