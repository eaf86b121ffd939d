"""Boolean masks to polygons with holes and back, exactly: the tissue mask as QuPath/TRIDENT GeoJSON geometry.

Both directions work in mask units, where pixel (row r, column c) covers [c, c+1] x [r, r+1]:

- :func:`mask_polygons` follows pixel edges, so its rings run along the mask's own staircase (no smoothing
  that could move a tile across the tissue threshold). Tissue pieces are 4-connected; a ring that would touch
  itself at a corner is split there, so every ring is simple and every polygon is valid as OGC (and shapely)
  define it. Exterior rings turn counterclockwise (positive shoelace area), holes clockwise, as RFC 7946 asks.
- :func:`fill_polygons` sets the pixels whose centre lies inside a polygon (even-odd over its rings, so holes
  stay open) by a scanline over pixel centres; polygons are OR-ed, so overlapping annotations add up instead of
  cancelling.

Filling the polygons of a mask on the mask's own grid gives the mask back bit for bit: ring vertices sit on
pixel corners, half a pixel from every centre, so no centre is ever on an edge.

Why not OpenCV (already installed with the bundled weights' package): ``cv2.findContours`` traces the centres of
the boundary pixels, half a pixel inside the tissue's edge, so its polygons cover less than the mask: 0.79% less
on the CMU slide's 1024 px tissue mask (297,219 against 299,578 px²), while these cover it exactly; and
``cv2.fillPoly`` fills every pixel a polygon touches rather than the pixels whose centre it holds, which is the
rule QuPath's and TRIDENT's polygons are drawn for. Tracing takes 16 ms here against OpenCV's 8 ms, and filling
4.5 ms against 0.3 ms: nothing next to reading a slide. Exported outlines are then simplified with shapely
(:mod:`.geojson`), and every polygon read is checked with shapely before it is filled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["Polygon", "fill_polygons", "mask_polygons", "ring_area"]

# A polygon: its exterior ring, then its holes; each ring an (K, 2) float array of (x, y), not repeating the first
# point at the end.
Polygon = list[np.ndarray]


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area: positive for a ring that turns counterclockwise in (x, y)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# -- mask -> polygons -----------------------------------------------------------------------------------------
def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every unit pixel edge between tissue and background, directed with the tissue on its left in (x, y)
    (so exterior rings turn counterclockwise by the shoelace sign).

    Returns start x, start y, end x, end y, and the row and column of the tissue pixel each edge belongs to.
    """
    m = np.pad(mask, 1)
    core = m[1:-1, 1:-1]
    parts = []
    # (neighbour that must be background, start corner offset, end corner offset) for the four sides of a pixel.
    sides = (
        (m[:-2, 1:-1], (0, 0), (1, 0)),  # top: towards +x
        (m[1:-1, 2:], (1, 0), (1, 1)),  # right: towards +y
        (m[2:, 1:-1], (1, 1), (0, 1)),  # bottom: towards -x
        (m[1:-1, :-2], (0, 1), (0, 0)),  # left: towards -y
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        r, c = np.nonzero(core & ~neighbour)
        parts.append(np.stack([c + sx, r + sy, c + ex, r + ey, r, c]))
    edges = np.concatenate(parts, axis=1).astype(np.int64)
    return tuple(edges)


def _cycles(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundary walks as (K, 2) integer corner arrays; at a corner where two tissue pixels touch only
    diagonally, the walk stays with the pixel it came along, so pieces are 4-connected."""
    x0, y0, x1, y1, pr, pc = _boundary_edges(mask)
    n = len(x0)
    if n == 0:
        return []
    width = mask.shape[1] + 2
    start_key, end_key = y0 * width + x0, y1 * width + x1
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    first = np.searchsorted(sorted_keys, end_key, side="left")
    count = np.searchsorted(sorted_keys, end_key, side="right") - first
    nxt = order[first]
    # A corner has two outgoing edges only where two pixels touch diagonally: take the one of the same pixel.
    saddle = np.nonzero(count == 2)[0]
    other = order[first[saddle] + 1]
    same = (pr[other] == pr[saddle]) & (pc[other] == pc[saddle])
    nxt[saddle[same]] = other[same]
    seen = np.zeros(n, dtype=bool)
    cycles = []
    for e0 in range(n):
        if seen[e0]:
            continue
        walk = []
        e = e0
        while not seen[e]:
            seen[e] = True
            walk.append(e)
            e = int(nxt[e])
        idx = np.asarray(walk)
        cycles.append(np.stack([x0[idx], y0[idx]], axis=1))
    return cycles


def _simple_loops(corners: np.ndarray) -> list[np.ndarray]:
    """Split a closed walk at every corner it passes twice, so each returned loop is a simple ring."""
    loops: list[np.ndarray] = []
    stack: list[tuple[int, int]] = []
    where: dict[tuple[int, int], int] = {}
    for x, y in corners.tolist():
        p = (x, y)
        if p in where:
            k = where[p]
            loop = stack[k:]
            for q in loop[1:]:
                del where[q]
            del stack[k + 1 :]
            loops.append(np.asarray(loop, dtype=np.int64))
        else:
            where[p] = len(stack)
            stack.append(p)
    if stack:
        loops.append(np.asarray(stack, dtype=np.int64))
    return loops


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep only the corners where the ring turns (a straight run of pixel edges becomes one segment)."""
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    turns = (d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) != 0
    return ring[turns]


def _inside(point: tuple[float, float], ring: np.ndarray) -> bool:
    """Even-odd point-in-ring test (the point is never on the ring here: it is a pixel centre)."""
    px, py = point
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (xs > px)) % 2)


def _side_pixel(ring: np.ndarray, left: bool) -> tuple[int, int]:
    """(row, col) of the pixel beside the ring's first edge: on its left (the ring's inside for an exterior,
    since tissue lies left of every edge) or on its right."""
    (x0, y0), (x1, y1) = ring[0], ring[1]
    ux, uy = np.sign(x1 - x0), np.sign(y1 - y0)
    # the left normal of (ux, uy) in (x, y) is (-uy, ux)
    s = 0.5 if left else -0.5
    mx, my = x0 + 0.5 * ux - s * uy, y0 + 0.5 * uy + s * ux
    return int(np.floor(my)), int(np.floor(mx))


def mask_polygons(mask: np.ndarray) -> list[Polygon]:
    """The tissue of a boolean (H, W) mask as polygons with holes, in mask units (corners of pixels).

    One polygon per 4-connected piece of tissue, largest first; rings are simple, exteriors counterclockwise and
    holes clockwise in (x, y) (shoelace sign; with y pointing down the image they look the other way round).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    labels, _ = ndimage.label(mask)  # 4-connected, as the boundary walk
    shells: dict[int, list[np.ndarray]] = {}
    holes: list[np.ndarray] = []
    for cycle in _cycles(mask):
        for loop in _simple_loops(cycle):
            ring = _drop_collinear(loop)
            if ring_area(ring) > 0:
                r, c = _side_pixel(ring, left=True)
                shells.setdefault(int(labels[r, c]), []).append(ring)
            else:
                holes.append(ring)
    polygons = {id(s): [s] for rings in shells.values() for s in rings}
    for hole in holes:
        # The hole borders tissue of one piece; its inside is background. Its shell is that piece's exterior
        # (the one around the background pixel beside it, should a piece ever have two).
        r, c = _side_pixel(hole, left=True)
        candidates = shells[int(labels[r, c])]
        if len(candidates) > 1:  # the background pixel inside the hole lies inside exactly one of them
            br, bc = _side_pixel(hole, left=False)
            candidates = [s for s in candidates if _inside((bc + 0.5, br + 0.5), s)] or candidates
        polygons[id(candidates[0])].append(hole)
    return sorted(polygons.values(), key=lambda p: -ring_area(p[0]))


# -- polygons -> mask -----------------------------------------------------------------------------------------
def _fill_one(out: np.ndarray, rings: Sequence[np.ndarray]) -> None:
    """OR into ``out`` the pixels whose centre lies inside ``rings`` by the even-odd rule."""
    h, w = out.shape
    starts = [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in rings if len(r) >= 3]
    if not starts:
        return
    a = np.concatenate(starts)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in starts])
    keep = a[:, 1] != b[:, 1]  # horizontal edges cross no row centre
    a, b = a[keep], b[keep]
    if len(a) == 0:
        return
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    # rows whose centre r + 0.5 lies in [ylo, yhi): half-open, so a vertex shared by two edges counts once
    r0 = np.clip(np.ceil(ylo - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(yhi - 0.5), 0, h).astype(np.int64)
    n = np.maximum(r1 - r0, 0)
    if n.sum() == 0:
        return
    edge = np.repeat(np.arange(len(a)), n)
    rows = np.repeat(r0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    yc = rows + 0.5
    ax, ay, bx, by = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
    xc = ax + (yc - ay) * (bx - ax) / (by - ay)
    # every pixel whose centre lies right of the crossing sees one more crossing on its left
    first_col = np.clip(np.floor(xc - 0.5) + 1, 0, w).astype(np.int64)
    top = int(rows.min())
    toggles = np.zeros((int(rows.max()) - top + 1, w + 1), dtype=np.int32)
    np.add.at(toggles, (rows - top, first_col), 1)
    inside = (np.cumsum(toggles[:, :w], axis=1) & 1).astype(bool)
    out[top : top + len(inside)] |= inside


def fill_polygons(polygons: Sequence[Sequence[np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of ``shape`` (H, W): pixels whose centre is inside any polygon (exterior minus its holes).

    Coordinates are in mask units (pixel (r, c) covers [c, c+1] x [r, r+1]); parts outside the mask are cut.
    """
    h, w = (int(v) for v in shape)
    out = np.zeros((h, w), dtype=bool)
    for rings in polygons:
        _fill_one(out, rings)
    return out
