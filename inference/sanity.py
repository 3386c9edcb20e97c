"""Whether a series' geometry is physically possible for a lumbar spine MRI, checked before grading.

``ImagePlane`` refuses what cannot be a plane at all (NaN, non-unit directions, a position beyond
100 m); this module refuses what is a plane but not an MR image of a lumbar spine: a pixel of a
metre, every slice at one position, a field of view of a millimetre or of a building. A series that
fails is not graded: the labels that need it are "not assessed" with the reason, never graded from
whichever slice happens to sort first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.geometry import ImagePlane

#: PixelSpacing (mm) of an MR image: finer is a microscope, coarser is not an image of a spine.
PIXEL_SPACING_MM = (0.1, 5.0)
#: In-plane field of view (mm, rows x spacing and columns x spacing) of an image of the lumbar spine.
FIELD_OF_VIEW_MM = (40.0, 600.0)
#: Extent of a series along its slice normal (mm): a whole spine is shorter than this.
MAX_STACK_EXTENT_MM = 600.0
#: Two slices closer than this along the normal are at one position.
SAME_POSITION_MM = 0.01
#: A series needs at least this fraction of its slices at distinct positions along the normal.
MIN_DISTINCT_FRACTION = 0.5


def _mm(value: float) -> str:
    return f"{value:.4g}"


def spacing_problem(plane: ImagePlane) -> str | None:
    """Why one image's PixelSpacing or field of view is not possible for a lumbar MR image, or None."""
    low, high = PIXEL_SPACING_MM
    spacing = (plane.row_spacing, plane.col_spacing)
    if not all(low <= s <= high for s in spacing):
        return (f"PixelSpacing {_mm(spacing[0])} x {_mm(spacing[1])} mm is outside {_mm(low)} to {_mm(high)} mm")
    fov = (plane.rows * plane.row_spacing, plane.columns * plane.col_spacing)
    low, high = FIELD_OF_VIEW_MM
    if not all(low <= f <= high for f in fov):
        return (f"field of view {_mm(fov[0])} x {_mm(fov[1])} mm (Rows/Columns x PixelSpacing) is outside "
                f"{_mm(low)} to {_mm(high)} mm")
    return None


def stack_problem(planes: Sequence[ImagePlane]) -> str | None:
    """Why the slice positions of one series are not a stack of distinct slices of plausible extent
    (measured along the first slice's normal), or None."""
    if len(planes) < 2:
        return None
    normal = planes[0].normal
    along = np.array([float(p.position @ normal) for p in planes])
    distinct = len(np.unique(np.round(along / SAME_POSITION_MM)))
    if distinct < max(2, int(np.ceil(MIN_DISTINCT_FRACTION * len(planes)))):
        return (f"{len(planes)} slices lie at {distinct} distinct position{'s' if distinct > 1 else ''} along the "
                "slice normal (ImagePositionPatient)")
    extent = float(along.max() - along.min())
    if extent > MAX_STACK_EXTENT_MM:
        return f"the slices span {_mm(extent)} mm along the slice normal (at most {_mm(MAX_STACK_EXTENT_MM)} mm)"
    return None


def screen_series(planes: Sequence[ImagePlane]) -> tuple[list[int], dict[int, str], str | None]:
    """The images of one series to keep, those left out with why, and why the whole series cannot be
    graded (or None). An image of impossible spacing or field of view is left out when it is one of
    a few (a corrupt header); when half the series or more is, the series is refused. The slices
    kept must then form a stack (``stack_problem``)."""
    left_out = {i: p for i, plane in enumerate(planes) if (p := spacing_problem(plane)) is not None}
    if left_out and 2 * len(left_out) >= len(planes):
        return [], left_out, next(iter(left_out.values()))
    kept = [i for i in range(len(planes)) if i not in left_out]
    return kept, left_out, stack_problem([planes[i] for i in kept])
