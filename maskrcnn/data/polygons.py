"""Polygon geometry: clipping to a rectangle (`clip_to_rectangle`), and does a polygon cross or touch
itself? The latter by a sweep-line test in O(n log n) time and O(n) memory.

check-dataset warns about such polygons (they still rasterise). Testing every pair of edges costs
O(n^2): 37 GiB for the 200 000-point contours that tracing a large mask produces. Instead, the
Shamos-Hoey sweep: a vertical line moves left to right over the edges' endpoints (ties broken by y,
so vertical edges are handled as if tilted a hair); it keeps the edges it currently cuts ordered from
bottom to top, and tests an edge only against its neighbours in that order, when they become
neighbours. If any two edges meet, some meeting pair becomes neighbours before the sweep passes the
leftmost meeting point, so stopping at the first pair found is exact. Orientation signs are the same
float expressions the pairwise test used, so integer and other exactly representable coordinates get
exact verdicts.

Small polygons (most of them) are tested pairwise instead, all pairs at once in numpy, which is faster
there than the sweep's Python loop; both give the same verdicts (tests/test_polygons.py).

Adjacent edges share a vertex by construction; they count as meeting only when one doubles back along
the other (checked first, at every vertex). Repeated vertices (the polygon passes through one point
twice) are found with a set, before the sweep; so during the sweep no two edges share an endpoint
except adjacent ones.
"""

from __future__ import annotations

import numpy as np


def distinct_vertices(points: np.ndarray) -> np.ndarray:
    """Return the polygon's vertices without consecutive repeats (a repeated closing point included)."""
    if len(points) < 2:
        return points
    keep = np.any(points != np.concatenate([points[-1:], points[:-1]]), axis=1)
    return points[keep] if keep.any() else points[:1]


def collinear(points: np.ndarray, atol: float = 0.0) -> bool:
    """Return True if all points [P,2] lie on one line (or coincide): the polygon has no interior.

    Exact by default, as COCO annotations are checked; `atol` forgives the rounding of computed vertices
    (a clipped polygon's crossing points). A NaN coordinate makes the answer False.
    """
    d = points[1:] - points[0]
    nonzero = np.flatnonzero(np.abs(d).sum(axis=1))
    if len(nonzero) == 0:
        return True
    v = d[nonzero[0]]
    return bool((np.abs(v[0] * d[:, 1] - v[1] * d[:, 0]) <= atol).all())


def clip_to_rectangle(points: np.ndarray, lo: tuple[float, float], hi: tuple[float, float],
                      snap: bool = False) -> np.ndarray:
    """Return the part of polygon [P,2] inside the rectangle from `lo` to `hi` (x, y); unchanged if inside.

    Sutherland-Hodgman, one side at a time: exact geometry for any polygon against a convex window (a
    concave polygon may keep zero-width slivers along the border, which rasterise to nothing). `snap`
    puts each crossing point exactly on its side, whatever the rounding.
    """
    low, high = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if (points >= low).all() and (points <= high).all():
        return points
    for axis, bound, keep_below in ((0, low[0], False), (0, high[0], True), (1, low[1], False), (1, high[1], True)):
        if len(points) == 0:
            break
        out = []
        prev = points[-1]
        for cur in points:
            cur_in = cur[axis] <= bound if keep_below else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_below else prev[axis] >= bound
            if cur_in != prev_in:  # the edge crosses this side: keep the crossing point
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = prev + t * (cur - prev)
                if snap:
                    cross[axis] = bound
                out.append(cross)
            if cur_in:
                out.append(cur)
            prev = cur
        points = np.array(out, dtype=np.float64).reshape(-1, 2)
    return points


PAIRWISE_UP_TO = 48  # vertices: below this, testing all pairs at once in numpy beats the Python sweep


def polygon_self_intersects(points: np.ndarray, distinct: bool = False, method: str = "auto") -> bool:
    """Return True if the closed polygon through `points` [N,2] crosses, touches or folds back on itself.

    `distinct`: the caller already removed consecutive repeated vertices (`distinct_vertices`).
    `method`: "sweep", "pairwise" (O(n^2) memory) or "auto" (pairwise for small polygons, as most are).
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    p = p if distinct else distinct_vertices(p)
    n = len(p)
    if n < 3:
        return False
    nxt = np.concatenate([p[1:], p[:1]])  # (slicing: np.roll costs more than the test on small polygons)
    u, v = np.concatenate([p[-1:], p[:-1]]) - p, nxt - p  # the two edges at each vertex, away from it
    if np.any((u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0] == 0) & ((u * v).sum(axis=1) > 0)):
        return True  # an edge doubles back along the previous one
    if n < 4:
        return False
    if method == "pairwise" or (method == "auto" and n <= PAIRWISE_UP_TO):
        return _pairwise_meets(p, nxt)
    if len(set(map(tuple, p.tolist()))) < n:
        return True  # a vertex visited twice: the edges there touch
    return _Sweep(p).finds_meeting()


def _pairwise_meets(p: np.ndarray, nxt: np.ndarray) -> bool:
    """Return True if two non-adjacent edges of the polygon `p` (distinct vertices, n >= 4; edge i runs
    from p[i] to nxt[i]) cross or touch, testing every pair whose bounding boxes overlap at once (O(n^2)
    memory: for small polygons)."""
    n = len(p)
    lo, hi = np.minimum(p, nxt), np.maximum(p, nxt)
    overlap = ((lo[:, None, 0] <= hi[None, :, 0]) & (lo[None, :, 0] <= hi[:, None, 0])
               & (lo[:, None, 1] <= hi[None, :, 1]) & (lo[None, :, 1] <= hi[:, None, 1]))
    overlap = np.triu(overlap, k=2)  # j >= i + 2: neither the same edge nor the next one
    overlap[0, n - 1] = False  # the last edge is adjacent to the first
    i, j = np.nonzero(overlap)
    if not len(i):
        return False
    a, b, c, d = p[i], nxt[i], p[j], nxt[j]
    d1, d2 = _cross_v(c, d, a), _cross_v(c, d, b)
    d3, d4 = _cross_v(a, b, c), _cross_v(a, b, d)
    crossing = (np.sign(d1) * np.sign(d2) < 0) & (np.sign(d3) * np.sign(d4) < 0)
    touching = (((d1 == 0) & _within_v(c, d, a)) | ((d2 == 0) & _within_v(c, d, b))
                | ((d3 == 0) & _within_v(a, b, c)) | ((d4 == 0) & _within_v(a, b, d)))
    return bool((crossing | touching).any())


def _cross_v(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the z of (a - o) x (b - o) for rows of points."""
    return (a[:, 0] - o[:, 0]) * (b[:, 1] - o[:, 1]) - (a[:, 1] - o[:, 1]) * (b[:, 0] - o[:, 0])


def _within_v(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Return whether each r lies in the axis-aligned box spanned by p and q (for collinear r)."""
    return np.all((np.minimum(p, q) <= r) & (r <= np.maximum(p, q)), axis=1)


class _Found(Exception):
    """Two non-adjacent edges meet (raised from deep in the sweep to stop it)."""


class _Sweep:
    """The sweep over one polygon's edges (vertices distinct, no fold-backs; see the module docstring)."""

    def __init__(self, p: np.ndarray) -> None:
        n = len(p)
        q = np.concatenate([p[1:], p[:1]])  # edge i runs from p[i] to q[i]
        swap = (q[:, 0] < p[:, 0]) | ((q[:, 0] == p[:, 0]) & (q[:, 1] < p[:, 1]))
        left, right = np.where(swap[:, None], q, p), np.where(swap[:, None], p, q)
        self.n = n
        self.lx, self.ly = left[:, 0].tolist(), left[:, 1].tolist()  # Python floats: faster one at a time
        self.rx, self.ry = right[:, 0].tolist(), right[:, 1].tolist()
        # Events: each edge's left end (insert) and right end (remove), by x, then y; at one point the
        # removals come first, so the edges in the line never share an endpoint there.
        xs = np.concatenate([left[:, 0], right[:, 0]])
        ys = np.concatenate([left[:, 1], right[:, 1]])
        kind = np.concatenate([np.ones(n, np.int8), np.zeros(n, np.int8)])
        order = np.lexsort((kind, ys, xs))
        self.events = [(int(k) % n, bool(k < n)) for k in order]

    def finds_meeting(self) -> bool:
        """Return True if two non-adjacent edges meet."""
        status: list[int] = []  # edges cut by the sweep line, bottom to top
        try:
            for edge, is_insert in self.events:
                if is_insert:
                    k = self._insert_position(status, edge)
                    status.insert(k, edge)
                    for other in status[max(k - 1, 0):k] + status[k + 1:k + 2]:
                        self._test(edge, other)
                else:
                    k = self._find(status, edge)
                    del status[k]
                    if 0 < k < len(status):
                        self._test(status[k - 1], status[k])
        except _Found:
            return True
        return False

    def _orient(self, t: int, x: float, y: float) -> float:
        """Return > 0 if (x, y) is above edge t's line (left of it, going left to right), < 0 below, 0 on it."""
        ax, ay = self.lx[t], self.ly[t]
        return (self.rx[t] - ax) * (y - ay) - (self.ry[t] - ay) * (x - ax)

    def _insert_position(self, status: list[int], s: int) -> int:
        """Return where edge s goes in `status` at its left end p; raise _Found if p lies on an edge there."""
        px, py = self.lx[s], self.ly[s]
        lo, hi = 0, len(status)
        while lo < hi:
            mid = (lo + hi) // 2
            t = status[mid]
            side = self._orient(t, px, py)
            if side == 0:
                if (px, py) != (self.lx[t], self.ly[t]):
                    raise _Found  # p is on edge t (past its left end; its right end was removed already)
                side = self._orient(t, self.rx[s], self.ry[s])  # t and s start at p: order by direction
                if side == 0:
                    raise _Found  # they leave p along the same line: they overlap
            if side > 0:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _find(self, status: list[int], e: int) -> int:
        """Return edge e's index in `status` at its right end p; raise _Found if p lies on another edge."""
        px, py = self.rx[e], self.ry[e]
        lo, hi = 0, len(status)
        while lo < hi:  # the first edge that p is not strictly above
            mid = (lo + hi) // 2
            if self._orient(status[mid], px, py) > 0:
                lo = mid + 1
            else:
                hi = mid
        k = lo
        while k < len(status) and self._orient(status[k], px, py) == 0:
            if status[k] == e:
                return k
            if not self._adjacent(status[k], e):
                raise _Found  # p, an end of e, lies on edge status[k]
            k += 1
        return status.index(e)  # not where the order says: only after a meeting the tests missed

    def _adjacent(self, a: int, b: int) -> bool:
        return (a - b) % self.n in (1, self.n - 1)

    def _test(self, a: int, b: int) -> None:
        """Raise _Found if non-adjacent edges a and b cross or touch."""
        if self._adjacent(a, b):
            return  # they share a vertex; a fold-back was ruled out before the sweep
        ax, ay, bx, by = self.lx[a], self.ly[a], self.rx[a], self.ry[a]
        cx, cy, dx, dy = self.lx[b], self.ly[b], self.rx[b], self.ry[b]
        d1, d2 = _cross(cx, cy, dx, dy, ax, ay), _cross(cx, cy, dx, dy, bx, by)
        d3, d4 = _cross(ax, ay, bx, by, cx, cy), _cross(ax, ay, bx, by, dx, dy)
        if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
            raise _Found  # a proper crossing
        if ((d1 == 0 and _within(cx, cy, dx, dy, ax, ay)) or (d2 == 0 and _within(cx, cy, dx, dy, bx, by))
                or (d3 == 0 and _within(ax, ay, bx, by, cx, cy)) or (d4 == 0 and _within(ax, ay, bx, by, dx, dy))):
            raise _Found  # an end of one lies on the other


def _cross(ox: float, oy: float, ax: float, ay: float, bx: float, by: float) -> float:
    """Return the z of (a - o) x (b - o) (sign = turn direction)."""
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)


def _within(px: float, py: float, qx: float, qy: float, rx: float, ry: float) -> bool:
    """Return whether r lies in the axis-aligned box spanned by p and q (for r collinear with them)."""
    return min(px, qx) <= rx <= max(px, qx) and min(py, qy) <= ry <= max(py, qy)
