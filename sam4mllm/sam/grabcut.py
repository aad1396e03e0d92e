"""An offline segmenter that needs no weights: OpenCV GrabCut seeded by the box and points.

Inside the box is "probably object", a ring around it (one margin wide) "probably
background" and a thin ring beyond that "surely background"; a disc around each
positive point is "surely object" and around each negative point "surely background".
The "probably" ring lets the mask grow past a box that cuts the object, as SAM's does:
were everything outside the box "surely background", the object's own colour would
enter the background model and a box a few pixels short would give an empty mask.
Only connected parts of the mask that lie mostly inside the box (or hold a positive
point) are kept, so a box does not reach out for an object it barely touches.
Only a crop around the prompt is processed, which keeps one prompt at a few
milliseconds on the synthetic images. OpenCV's random generator is re-seeded before
every call, so results are deterministic.
"""

from __future__ import annotations

import cv2
import numpy as np

from sam4mllm.sam.base import Prediction, Prompts, Segmenter


class GrabCutSegmenter(Segmenter):
    """GrabCut on a crop around each prompt.

    Args:
        iterations: GrabCut iterations per prompt.
        point_radius: radius in pixels of the disc each point fixes.
        margin: width of the probably-background ring, as a fraction of the box size (>= 2 px).
        seed: OpenCV RNG seed set before each call.

    Every prompt needs a box. ``scores`` are all 1.0: GrabCut gives no quality estimate.
    """

    name = "grabcut"

    def __init__(self, iterations: int = 3, point_radius: int = 1, margin: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        self.iterations, self.point_radius, self.margin, self.seed = iterations, point_radius, margin, seed
        self._bgr: np.ndarray | None = None

    def _embed(self, image: np.ndarray) -> None:
        self._bgr = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def _predict(self, prompts: Prompts) -> Prediction:
        if prompts.boxes is None:
            # Seeded by points alone GrabCut has no background model worth the name.
            raise ValueError("GrabCutSegmenter needs a box in every prompt (points alone are not enough)")
        h, w = self.image_size  # type: ignore[misc]
        masks = np.zeros((len(prompts), h, w), dtype=bool)
        for i in range(len(prompts)):
            box = prompts.boxes[i]
            pts = np.zeros((0, 2)) if prompts.points is None else prompts.points[i]
            lab = np.zeros(0, dtype=np.int64) if prompts.labels is None else prompts.labels[i]
            masks[i] = self._one(box, pts, lab)
        return Prediction(masks, np.ones(len(prompts), np.float32))

    def _one(self, box: np.ndarray, pts: np.ndarray, lab: np.ndarray) -> np.ndarray:
        assert self._bgr is not None
        h, w = self._bgr.shape[:2]
        x1, y1, x2, y2 = np.clip(np.round(box), 0, [w, h, w, h]).astype(int)
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        mx, my = max(2, int(self.margin * (x2 - x1))), max(2, int(self.margin * (y2 - y1)))
        ox, oy = mx + max(2, (x2 - x1) // 10), my + max(2, (y2 - y1) // 10)  # the surely-background ring is thin
        cx1, cy1, cx2, cy2 = max(0, x1 - ox), max(0, y1 - oy), min(w, x2 + ox), min(h, y2 + oy)
        ipts = np.clip(np.floor(pts), 0, [w - 1, h - 1]).astype(int) if len(pts) else np.zeros((0, 2), int)
        if len(ipts):  # the crop must contain every point
            cx1, cy1 = min(cx1, ipts[:, 0].min()), min(cy1, ipts[:, 1].min())
            cx2, cy2 = max(cx2, ipts[:, 0].max() + 1), max(cy2, ipts[:, 1].max() + 1)
        init = np.full((cy2 - cy1, cx2 - cx1), cv2.GC_BGD, np.uint8)
        init[max(0, y1 - my - cy1):y2 + my - cy1, max(0, x1 - mx - cx1):x2 + mx - cx1] = cv2.GC_PR_BGD
        init[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1] = cv2.GC_PR_FGD
        for (x, y), lbl in zip(ipts, lab, strict=True):
            cv2.circle(init, (int(x - cx1), int(y - cy1)), self.point_radius,
                       int(cv2.GC_FGD if lbl == 1 else cv2.GC_BGD), -1)
        out = np.zeros((h, w), dtype=bool)
        has_bg = np.isin(init, (cv2.GC_BGD, cv2.GC_PR_BGD)).any()
        has_fg = np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD)).any()
        if has_bg and has_fg:
            cv2.setRNGSeed(self.seed)
            bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
            crop = np.ascontiguousarray(self._bgr[cy1:cy2, cx1:cx2])
            cv2.grabCut(crop, init, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        # Without both kinds of seed GrabCut cannot model anything: keep the prior as is.
        fg = np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD))
        n, parts = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
        total = np.bincount(parts.ravel(), minlength=n)
        inside = np.bincount(parts[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1].ravel(), minlength=n)
        keep = 2 * inside >= total
        keep[parts[init == cv2.GC_FGD]] = True  # a part holding a positive point
        keep[0] = False  # the background label
        out[cy1:cy2, cx1:cx2] = keep[parts]
        return out
