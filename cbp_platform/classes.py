"""The platform's muscle classes: the one registry of label ids and names.

Every label map the platform writes (the simulator's truth, every model's segmentation after its label mapping)
uses these ids; every table, check and report names the classes from here. A model's own label ids are mapped onto
these names by its manifest (:mod:`cbp_platform.segmentation.manifest`), never the other way round, so adding a
model never touches this file, and a new class is added here and nowhere else.

A compartment is the region inside the muscle's fascia: intermuscular fat inside the fascia belongs to it.
"""

from dataclasses import dataclass

BACKGROUND = 0
BACK_TOTAL = "back_total"          # the metrics' row summing every class


@dataclass(frozen=True)
class MuscleClass:
    id: int                        # the platform's label id
    name: str                      # the platform's name (tables, reports, manifests' label mapping)
    muscle: str                    # the anatomical muscle (left and right share it)
    side: str                      # "left" or "right": the participant's side


MUSCLE_CLASSES: tuple[MuscleClass, ...] = (
    MuscleClass(1, "autochthonous_left", "autochthonous", "left"),
    MuscleClass(2, "autochthonous_right", "autochthonous", "right"),
    MuscleClass(3, "psoas_left", "psoas", "left"),
    MuscleClass(4, "psoas_right", "psoas", "right"),
)

IDS: tuple[int, ...] = tuple(c.id for c in MUSCLE_CLASSES)
NAMES: dict[int, str] = {c.id: c.name for c in MUSCLE_CLASSES}
BY_NAME: dict[str, MuscleClass] = {c.name: c for c in MUSCLE_CLASSES}
LABELS: dict[int, str] = {BACKGROUND: "background", **NAMES}
NUM_CLASSES = len(LABELS)


def _pairs() -> tuple[tuple[MuscleClass, MuscleClass], ...]:
    out = []
    for muscle in dict.fromkeys(c.muscle for c in MUSCLE_CLASSES):
        side = {c.side: c for c in MUSCLE_CLASSES if c.muscle == muscle}
        if set(side) != {"left", "right"}:
            raise ValueError(f"muscle {muscle!r} needs exactly one left and one right class")
        out.append((side["left"], side["right"]))
    return tuple(out)


LR_PAIRS: tuple[tuple[MuscleClass, MuscleClass], ...] = _pairs()   # (left, right) per muscle
LR_SWAP: dict[int, int] = {a.id: b.id for pair in LR_PAIRS for a, b in (pair, pair[::-1])}  # under a mirror


def swap_lr(labels):
    """A label map (numpy array or torch tensor) with left and right exchanged: the labels of a volume mirrored
    left-right."""
    out = labels.clone() if hasattr(labels, "clone") else labels.copy()
    for a, b in LR_SWAP.items():
        out[labels == a] = b
    return out
