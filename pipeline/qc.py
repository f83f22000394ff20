"""Every QC decision about one image, in one place: its flags and whether it passes.

    row_qc(stats, refine_cfg, notes, view_position, quality, orientation) -> (flags, qc_pass)

Flags, in this order (docs/OUTPUT.md lists them):
    mask shape      no_lungs, one_lung, small_lung_area, large_lung_area (`pipeline.refine.qc_flags`)
    mask quality    low_quality: quality_score under the model's threshold (`pipeline.quality`)
    orientation     rotated_90, rotated_180, rotated_270, mirrored (`pipeline.orientation`): what the image
                    looked like when it came in, also when the job turned it upright (--fix-orientation)
    view            not_frontal: the DICOM ViewPosition says lateral or oblique
    decoding        burned_in_annotation, polarity_corrected (decoder notes a user should see)

A row fails QC (``qc_pass`` false; it still has its images, downstream may drop it) for any flag but
polarity_corrected, and for an orientation flag only when the image was left as it came.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.decode import NOTE_BURNED_IN
from pipeline.orientation import ORIENTATION_FLAGS
from pipeline.quality import QC_LOW_QUALITY
from pipeline.refine import QC_FLAGS as MASK_QC_FLAGS
from pipeline.refine import MaskStats, RefineConfig, qc_flags

QC_NOT_FRONTAL = "not_frontal"
NOTE_ORIENTATION_FIXED = "orientation_fixed"  # decode note: the image was turned upright before segmenting
NOTE_POLARITY_CORRECTED = "polarity_corrected"
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO"})  # ViewPosition defined terms of lateral and oblique views
DECODE_NOTES_IN_QC = (NOTE_BURNED_IN, NOTE_POLARITY_CORRECTED)  # decoder notes shown among the QC flags
FLAGS = (*MASK_QC_FLAGS, QC_LOW_QUALITY, *ORIENTATION_FLAGS, QC_NOT_FRONTAL, *DECODE_NOTES_IN_QC)  # every flag, in order
PASSING_FLAGS = frozenset({NOTE_POLARITY_CORRECTED})  # shown, but the image is fine


def row_qc(stats: MaskStats, refine_cfg: RefineConfig, *, notes: Iterable[str] = (), view_position: str | None = None,
           quality_score: float | None = None, quality_threshold: float | None = None,
           orientation_flags: Iterable[str] = (), orientation_fixed: bool = False) -> tuple[list[str], bool]:
    """The row's QC flags (in FLAGS order) and qc_pass.

    stats/refine_cfg: the refined mask's stats and the thresholds of its shape flags; notes: the decoder's;
    view_position: the DICOM ViewPosition column (None for other formats); quality_score and its threshold
    (None: no score); orientation_flags: what the orientation check found; orientation_fixed: the image was
    turned upright before segmenting.
    """
    flags = list(qc_flags(stats, refine_cfg))
    if quality_score is not None and quality_threshold is not None and quality_score < quality_threshold:
        flags.append(QC_LOW_QUALITY)
    found = set(orientation_flags)
    flags += [f for f in ORIENTATION_FLAGS if f in found]
    if view_position in NOT_FRONTAL_VIEWS:
        flags.append(QC_NOT_FRONTAL)
    notes = set(notes)
    flags += [n for n in DECODE_NOTES_IN_QC if n in notes]
    failing = set(flags) - PASSING_FLAGS - (set(ORIENTATION_FLAGS) if orientation_fixed else set())
    return flags, not failing
