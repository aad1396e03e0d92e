"""The synthetic referring-segmentation benchmark, written in the official on-disk formats.

Images of flat-coloured shapes (circle, square, triangle; six colours; small or big)
with referring expressions built from colour, shape, size, absolute position
("the circle on the left") and relative position ("the square above the red
triangle"). From one seed it writes, under ``out_dir``, exactly the layout of the real
data (see ``data/README.md``) so that the real loaders read it through the same code:

* ``refer_seg/refcoco/refs(unc).p`` + ``instances.json`` -- one target per ref;
* ``refer_seg/grefcoco/grefs(unc).json`` + ``instances.json`` -- single-, multi- and
  no-target expressions (``ann_id == [-1]``);
* ``coco/train2014/COCO_train2014_<id>.png`` -- the images of both;
* ``reason_seg/ReasonSeg/{train,val,test}/`` -- riddle-style texts, labelme polygons,
  some ``ignore`` regions and deprecated ``flag`` shapes;
* ``vqav2/`` -- colour and count questions with 10 human answers each.

Every image draws from its own ``numpy`` generator seeded by ``(seed, split, index)``,
so the output is a pure function of the config and one split's size does not change
another split's content. Masks are rasterised by the same rule that the format's
loader applies (pycocotools for COCO polygons, OpenCV for labelme), so written and read
back they are identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sam4mllm.data.masks import encode_rle, encode_uncompressed_rle

FORMAT_VERSION = 2
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 87, 200),
    "yellow": (240, 210, 30),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.09, "big": 0.15}  # radius as a fraction of min(H, W)
CATEGORY_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
BACKGROUND = (225, 225, 225)
OCCLUDER = (70, 70, 70)  # not a palette colour: an occluder is never a referent
REF_SPLITS = ("train", "val", "testA", "testB")
REASON_SPLITS = ("train", "val", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SHAPE_RIDDLES = {
    "circle": ("the shape with no corners", "the shape that could roll like a wheel"),
    "square": ("the shape with four equal sides", "the shape that looks like a box seen from the front"),
    "triangle": ("the shape with three corners", "the shape that looks like a slice of pizza"),
}
COLOR_RIDDLES = {
    "red": "the shape coloured like a ripe tomato",
    "green": "the shape coloured like fresh grass",
    "blue": "the shape coloured like a clear sky",
    "yellow": "the shape coloured like a banana",
    "purple": "the shape coloured like a plum",
    "orange": "the shape coloured like a carrot",
}


@dataclass
class SyntheticConfig:
    """What to generate. ``images`` counts images per refer split, ``reason_images`` per ReasonSeg split."""

    seed: int = 0
    width: int = 112
    height: int = 112
    min_objects: int = 2
    max_objects: int = 4
    images: dict[str, int] = field(default_factory=lambda: {"train": 240, "val": 24, "testA": 16, "testB": 16})
    reason_images: dict[str, int] = field(default_factory=lambda: {"train": 20, "val": 20, "test": 20})
    max_sentences_per_ref: int = 3
    ignore_fraction: float = 0.3
    # Object radius per size word, as a fraction of min(H, W).
    radius: dict[str, float] = field(default_factory=lambda: dict(SIZES))
    # Radius of an unannotated grey disc over each refer object's outline, as a fraction of the
    # object's radius (0: none). It sits inside the object's box, so the box alone no longer
    # gives the mask and points have something to fix (the paper's premise, its §1).
    occluder: float = 0.0

    def __post_init__(self) -> None:
        # Hydra passes DictConfigs; keep plain dicts so the config hashes and serialises.
        self.images = {str(k): int(v) for k, v in dict(self.images).items()}
        self.reason_images = {str(k): int(v) for k, v in dict(self.reason_images).items()}
        unknown = (set(self.images) - set(REF_SPLITS)) | (set(self.reason_images) - set(REASON_SPLITS))
        if unknown:
            raise ValueError(f"unknown synthetic splits {sorted(unknown)}; use {REF_SPLITS} and {REASON_SPLITS}")
        self.radius = {str(k): float(v) for k, v in dict(self.radius).items()}
        if set(self.radius) != set(SIZES) or not all(0 < r < 0.5 for r in self.radius.values()):
            raise ValueError(f"radius needs a fraction in (0, 0.5) for each of {sorted(SIZES)}, got {self.radius}")
        if not 0 <= self.occluder <= 1:
            raise ValueError(f"occluder is a fraction of the object radius in [0, 1], got {self.occluder}")

    def digest(self) -> str:
        """Short hash of the config and format version (stored in the manifest)."""
        fields = asdict(self)
        if fields["radius"] == SIZES:  # defaults leave benchmarks made before their fields valid
            del fields["radius"]
        if fields["occluder"] == 0:
            del fields["occluder"]
        blob = json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Obj:
    """One shape of a scene; ``polygon`` is a flat ``[x1, y1, ...]`` list and ``mask`` its raster,
    less what an occluder hides (then ``polygon`` is None: the visible part is written as RLE)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    polygon: list[float] | None
    mask: np.ndarray

    def phrase(self, *attrs: str) -> str:
        words = {"size": self.size, "color": self.color, "shape": self.shape}
        return " ".join(words[a] for a in ("size", "color", "shape") if a in attrs)


@dataclass
class Scene:
    """A rendered image and its objects."""

    image: np.ndarray
    objects: list[Obj]


# --------------------------------------------------------------------------- scenes
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    if shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    elif shape == "square":
        h = 0.85 * r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    else:
        pts = [(cx + 1.1 * r * math.cos(math.radians(a)), cy + 1.1 * r * math.sin(math.radians(a)))
               for a in (-90, 30, 150)]
    return [round(v, 2) for xy in pts for v in xy]


def coco_raster(polygon: list[float], h: int, w: int) -> np.ndarray:
    """The mask pycocotools decodes for a polygon: the canonical COCO rasterisation."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))).astype(bool)


def labelme_raster(polygon: list[float], h: int, w: int) -> np.ndarray:
    """The mask the ReasonSeg convention paints for integer labelme points."""
    canvas = np.zeros((h, w), np.uint8)
    pts = np.array([np.reshape(polygon, (-1, 2))], dtype=np.int32)
    cv2.polylines(canvas, pts, True, 1, 1)
    cv2.fillPoly(canvas, pts, 1)
    return canvas.astype(bool)


def make_scene(
    rng: np.random.Generator, cfg: SyntheticConfig, raster: Callable[[list[float], int, int], np.ndarray],
    occlude: bool = False,
) -> Scene:
    """Place non-overlapping shapes at random and render them on a flat background; with
    ``occlude`` and ``cfg.occluder``, a grey disc over each outline, towards a box corner."""
    h, w = cfg.height, cfg.width
    objects: list[Obj] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        size = str(rng.choice(list(SIZES)))
        r = cfg.radius[size] * min(h, w)
        for _try in range(100):
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > 1.15 * (r + o.r) + 3 for o in objects):
                shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
                poly = _polygon(shape, cx, cy, r)
                if raster is labelme_raster:
                    poly = [float(round(v)) for v in poly]
                objects.append(Obj(shape, color, size, cx, cy, r, poly, raster(poly, h, w)))
                break
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        image[o.mask] = COLORS[o.color]
    if occlude and cfg.occluder > 0:  # drawn after the shapes, so a benchmark without them is unchanged
        yy, xx = np.mgrid[:h, :w]
        for o in objects:
            x, y = _outline_point(o, math.radians(45 + 90 * int(rng.integers(4)) + rng.uniform(-20, 20)))
            disc = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= (cfg.occluder * o.r) ** 2
            image[disc] = OCCLUDER
            for hidden in objects:
                if (hidden.mask & disc).any():
                    hidden.mask, hidden.polygon = hidden.mask & ~disc, None
    return Scene(image, objects)


def _outline_point(o: Obj, angle: float) -> tuple[float, float]:
    """Where a ray from the object's centre at ``angle`` leaves its mask (pixel coordinates)."""
    h, w = o.mask.shape
    dx, dy = math.cos(angle), math.sin(angle)
    t = 0.0
    while 0 <= (x := o.cx + t * dx) < w and 0 <= (y := o.cy + t * dy) < h and o.mask[int(y), int(x)]:
        t += 0.25
    return o.cx + t * dx, o.cy + t * dy


# ---------------------------------------------------------------------- expressions
_ATTRS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"), ("color",))
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def _noun(phrase: str, plural: bool = False) -> str:
    last = phrase.split()[-1]
    if last in _PLURAL:
        return phrase[: -len(last)] + (_PLURAL[last] if plural else last)
    return phrase + (" shapes" if plural else " shape")


def _groups(objects: list[Obj]) -> dict[str, list[int]]:
    """Noun phrase -> indices of the objects it describes (every attribute combination)."""
    out: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        for attrs in _ATTRS:
            out.setdefault(o.phrase(*attrs), []).append(i)
    return out


def _position_phrases(objects: list[Obj], groups: dict[str, list[int]], margin: float
                      ) -> list[tuple[str, int, str]]:
    """``(expression, index, kind)`` for objects singled out by ``absolute`` or ``relative`` position."""
    out: list[tuple[str, int, str]] = []
    axes = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1)}
    rel = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    for phrase, members in groups.items():
        if len(members) < 2:
            continue
        for words, (axis, sign) in axes.items():
            key = sorted(members, key=lambda i: sign * (objects[i].cx, objects[i].cy)[axis], reverse=True)
            a, b = ((objects[key[0]].cx, objects[key[0]].cy)[axis], (objects[key[1]].cx, objects[key[1]].cy)[axis])
            if abs(a - b) > margin:
                out.append((f"the {_noun(phrase)} {words}", key[0], "absolute"))
    uniques = {p: m[0] for p, m in groups.items() if len(m) == 1}
    for phrase, members in groups.items():
        for ref_phrase, ref in uniques.items():
            if ref in members and len(members) == 1:
                continue
            for words, (axis, sign) in rel.items():
                ref_v = (objects[ref].cx, objects[ref].cy)[axis]
                d = {i: sign * ((objects[i].cx, objects[i].cy)[axis] - ref_v) for i in members if i != ref}
                hits = [i for i, v in d.items() if v > margin]
                # Exactly one clear hit and nothing borderline, so the phrase is unambiguous.
                if len(hits) == 1 and not any(0 < v <= margin for v in d.values()):
                    out.append((f"the {_noun(phrase)} {words} the {_noun(ref_phrase)}", hits[0], "relative"))
    return out


def referring_expressions(scene: Scene, rng: np.random.Generator, k: int) -> dict[int, list[str]]:
    """Up to ``k`` expressions per object, each describing that object alone.

    Candidates are of three kinds -- attributes, absolute position, relative position --
    and the kinds take turns in a random order. Relative phrases outnumber the others
    combinatorially (every phrase x every reference x 4 relations): drawn uniformly they
    were ~90% of all expressions, unlike refCOCO, where attributes and absolute
    positions are the common case.
    """
    groups = _groups(scene.objects)
    cands: dict[int, dict[str, set[str]]] = {}
    for phrase, members in groups.items():
        if len(members) == 1:
            cands.setdefault(members[0], {}).setdefault("attribute", set()).add(f"the {_noun(phrase)}")
    margin = 0.08 * scene.image.shape[1]
    for text, i, kind in _position_phrases(scene.objects, groups, margin):
        cands.setdefault(i, {}).setdefault(kind, set()).add(text)
    out = {}
    for i, kinds in sorted(cands.items()):
        pools = {kind: sorted(texts) for kind, texts in sorted(kinds.items())}
        order = [list(pools)[j] for j in rng.permutation(len(pools))]
        picked: list[str] = []
        while len(picked) < k and any(pools.values()):
            for kind in order:
                if pools[kind] and len(picked) < k:
                    picked.append(pools[kind].pop(int(rng.integers(len(pools[kind])))))
        out[i] = sorted(picked)
    return out


def generalized_expressions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, list[int]]]:
    """gRefCOCO-style ``(expression, target indices)``: multi-, single- and no-target."""
    groups = _groups(scene.objects)
    multi = [(f"all {_noun(p, True)}" if rng.random() < 0.5 else f"the {_noun(p, True)}", m)
             for p, m in groups.items() if len(m) >= 2]
    single = [(t[0], [i]) for i, t in referring_expressions(scene, rng, 1).items()]
    present = set(groups)
    absent = [
        (f"the {_noun(p)}", [])
        for p in (f"{c} {s}" for c in COLORS for s in SHAPES)
        if p not in present
    ]
    out: list[tuple[str, list[int]]] = []
    for pool, n in ((single, 2), (multi, 1), (absent, 1)):
        for j in rng.permutation(len(pool))[:n]:
            out.append(pool[int(j)])
    return out


# ---------------------------------------------------------------------------- VQA
def _human_answers(rng: np.random.Generator, answer: str, kind: str, wrong: list[str]) -> list[str]:
    """10 answers: mostly the truth, in the spellings people use, sometimes wrong."""
    answers = []
    for _ in range(10):
        u = rng.random()
        if kind == "number" and u < 0.3:
            answers.append(NUMBER_WORDS[int(answer)])
        elif kind == "other" and u < 0.15:
            answers.append(answer.capitalize())
        elif kind == "other" and u < 0.25:
            answers.append(answer + ".")
        else:
            answers.append(answer)
    for j in rng.permutation(10)[: int(rng.integers(0, 3))]:
        answers[int(j)] = str(rng.choice(wrong))
    return answers


def vqa_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(question, answer, answer_type)`` about colour and count."""
    groups = _groups(scene.objects)
    out = []
    uniq_shapes = [s for s in SHAPES if len(groups.get(s, [])) == 1]
    if uniq_shapes:
        s = str(rng.choice(uniq_shapes))
        out.append((f"What color is the {s}?", scene.objects[groups[s][0]].color, "other"))
    s = str(rng.choice(SHAPES))
    out.append((f"How many {_PLURAL[s]} are there?", str(len(groups.get(s, []))), "number"))
    c = str(rng.choice(list(COLORS)))
    out.append((f"How many {c} shapes are there?", str(len(groups.get(c, []))), "number"))
    return out


# ---------------------------------------------------------------------------- writer
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _segmentation(obj: Obj, ann_id: int, h: int, w: int) -> Any:
    # Exercise every COCO encoding the loaders must read: polygons, compressed and raw RLE.
    kind = ann_id % 5
    if kind == 3 or (obj.polygon is None and kind != 4):
        return encode_rle(obj.mask)
    if kind == 4:
        return encode_uncompressed_rle(obj.mask)
    return [obj.polygon]


@dataclass
class SyntheticReport:
    """What was written: per-dataset, per-split counts, and the scenes (for tests and overlays)."""

    root: Path
    counts: dict[str, dict[str, dict[str, int]]]
    scenes: dict[int | str, Scene] = field(repr=False, default_factory=dict)


def generate_synthetic(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> SyntheticReport:
    """Write the synthetic benchmark under ``out_dir`` (atomically: a temporary folder is renamed).

    An existing folder written from the same config is kept as is; one from another
    config raises ``FileExistsError``.
    """
    cfg = cfg or SyntheticConfig()
    out = Path(out_dir)
    manifest = out / "synthetic.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("digest") != cfg.digest():
            raise FileExistsError(
                f"{out} holds a synthetic benchmark from another config or generator version (digest "
                f"{old.get('digest')} != {cfg.digest()}, format {old.get('format_version')} vs {FORMAT_VERSION}); "
                "delete it (and outputs made from it) or choose another paths.data_dir"
            )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    report = _write(tmp, cfg)
    (tmp / "synthetic.json").write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "digest": cfg.digest(), "config": asdict(cfg), "counts": report.counts},
        indent=1,
    ))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    report.root = out
    return report


def _write(root: Path, cfg: SyntheticConfig) -> SyntheticReport:
    h, w = cfg.height, cfg.width
    img_dir = root / "coco" / "train2014"
    img_dir.mkdir(parents=True)
    images, anns, refs, grefs = [], [], [], []
    vqa_q: dict[str, list] = {s: [] for s in REF_SPLITS}
    vqa_a: dict[str, list] = {s: [] for s in REF_SPLITS}
    scenes: dict[int | str, Scene] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {"refcoco": {}, "grefcoco": {}, "reasonseg": {}, "vqav2": {}}
    image_id = ann_id = ref_id = sent_id = 0
    for s_idx, split in enumerate(REF_SPLITS):
        c_ref = {"images": 0, "refs": 0, "sentences": 0}
        c_gref = {"sentences": 0, "multi_target": 0, "no_target": 0}
        for k in range(cfg.images.get(split, 0)):
            rng = _rng(cfg.seed, s_idx, k)
            scene = make_scene(rng, cfg, coco_raster, occlude=True)  # ReasonSeg's labelme polygons hold no holes
            image_id += 1
            scenes[image_id] = scene
            file_name = f"COCO_train2014_{image_id:012d}.png"
            Image.fromarray(scene.image).save(img_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            obj_ann = {}
            for o in scene.objects:
                ann_id += 1
                obj_ann[id(o)] = ann_id
                x1, y1, x2, y2 = _tight_box(o.mask)
                anns.append({
                    "id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o.shape],
                    "segmentation": _segmentation(o, ann_id, h, w), "area": int(o.mask.sum()),
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
                })
            c_ref["images"] += 1

            def sentences(texts: list[str]) -> list[dict[str, Any]]:
                nonlocal sent_id
                out = []
                for t in texts:
                    sent_id += 1
                    out.append({"sent_id": sent_id, "sent": t, "raw": t.capitalize(), "tokens": t.split()})
                return out

            for i, texts in referring_expressions(scene, rng, cfg.max_sentences_per_ref).items():
                o, ref_id = scene.objects[i], ref_id + 1
                sents = sentences(texts)
                refs.append({
                    "ref_id": ref_id, "ann_id": obj_ann[id(o)], "image_id": image_id,
                    "category_id": CATEGORY_IDS[o.shape], "split": split, "sentences": sents,
                    "sent_ids": [s["sent_id"] for s in sents],
                    "file_name": f"COCO_train2014_{image_id:012d}_{obj_ann[id(o)]}.png",
                })
                c_ref["refs"] += 1
                c_ref["sentences"] += len(sents)
            for text, idx in generalized_expressions(scene, rng):
                ref_id += 1
                sents = sentences([text])
                targets = [scene.objects[i] for i in idx]
                grefs.append({
                    "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sents,
                    "sent_ids": [s["sent_id"] for s in sents],
                    "ann_id": [obj_ann[id(o)] for o in targets] or [-1],
                    "category_id": [CATEGORY_IDS[o.shape] for o in targets] or [-1],
                    "no_target": not targets, "file_name": file_name,
                })
                c_gref["sentences"] += 1
                c_gref["multi_target"] += len(targets) > 1
                c_gref["no_target"] += not targets
            for question, answer, kind in vqa_questions(scene, rng):
                qid = len(vqa_q[split]) + 1 + 1_000_000 * s_idx
                vqa_q[split].append({"question_id": qid, "image_id": image_id, "question": question})
                wrong = [c for c in COLORS if c != answer] if kind == "other" else [
                    str(n) for n in range(5) if str(n) != answer]
                vqa_a[split].append({
                    "question_id": qid, "image_id": image_id, "answer_type": kind,
                    "question_type": " ".join(question.lower().split()[:3]),
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(_human_answers(rng, answer, kind, wrong))],
                })
        counts["refcoco"][split] = c_ref
        counts["grefcoco"][split] = c_gref
        counts["vqav2"][split] = {"questions": len(vqa_q[split])}

    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in CATEGORY_IDS.items()]
    instances = {"images": images, "annotations": anns, "categories": categories}
    for name, fname, payload in (("refcoco", "refs(unc).p", refs), ("grefcoco", "grefs(unc).json", grefs)):
        d = root / "refer_seg" / name
        d.mkdir(parents=True)
        (d / "instances.json").write_text(json.dumps(instances))
        if fname.endswith(".p"):
            # Protocol 2, like the Python 2 era files users download.
            (d / fname).write_bytes(pickle.dumps(payload, protocol=2))
        else:
            (d / fname).write_text(json.dumps(payload))
    vqa_dir = root / "vqav2"
    vqa_dir.mkdir()
    for split in REF_SPLITS:
        (vqa_dir / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": vqa_q[split]}))
        (vqa_dir / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": vqa_a[split]}))

    for s_idx, split in enumerate(REASON_SPLITS):
        d = root / "reason_seg" / "ReasonSeg" / split
        d.mkdir(parents=True)
        n_ignore = 0
        for k in range(cfg.reason_images.get(split, 0)):
            rng = _rng(cfg.seed, 100 + s_idx, k)
            while (ann := _reason_annotation(scene := make_scene(rng, cfg, labelme_raster), rng, cfg)) is None:
                pass  # every shape and colour repeats: no object can be singled out, draw again
            shapes, texts, is_sentence = ann
            stem = f"synthetic_{split}_{k:05d}"
            n_ignore += any(s["label"] == "ignore" for s in shapes)
            Image.fromarray(scene.image).save(d / f"{stem}.jpg", quality=95)
            (d / f"{stem}.json").write_text(json.dumps({"text": texts, "is_sentence": is_sentence, "shapes": shapes}))
            scenes[f"{split}/{stem}"] = scene
        counts["reasonseg"][split] = {"images": cfg.reason_images.get(split, 0), "with_ignore": n_ignore}
    return SyntheticReport(root, counts, scenes)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _reason_annotation(scene: Scene, rng: np.random.Generator, cfg: SyntheticConfig
                       ) -> tuple[list[dict[str, Any]], list[str], bool] | None:
    """labelme shapes + riddle texts for one object singled out by shape or colour (None if none is)."""
    groups = _groups(scene.objects)
    options = [(SHAPE_RIDDLES[s][j], groups[s][0]) for s in SHAPES if len(groups.get(s, [])) == 1 for j in (0, 1)]
    options += [(COLOR_RIDDLES[c], groups[c][0]) for c in COLORS if len(groups.get(c, [])) == 1]
    if not options:
        return None
    shapes: list[dict[str, Any]] = []
    phrase, target_idx = options[int(rng.integers(len(options)))]
    target = scene.objects[target_idx]
    is_sentence = bool(rng.random() < 0.5)
    texts = [f"Which shape is {phrase}? Please segment it." if is_sentence else phrase,
             f"Segment {phrase}."]

    def pts(poly: list[float]) -> list[list[float]]:
        return np.reshape(poly, (-1, 2)).tolist()

    shapes.append({"label": "target", "points": pts(target.polygon), "shape_type": "polygon"})
    others = [o for o in scene.objects if o is not target]
    if others and rng.random() < cfg.ignore_fraction:
        o = others[int(rng.integers(len(others)))]
        half = max(2.0, 0.3 * o.r)
        x, y = round(o.cx + o.r), round(o.cy)  # straddles the other object's right edge
        quad = [float(v) for v in (x - half, y - half, x + half, y - half, x + half, y + half, x - half, y + half)]
        quad = [float(round(v)) for v in quad]
        if not (labelme_raster(quad, cfg.height, cfg.width) & target.mask).any():
            shapes.append({"label": "ignore", "points": pts(quad), "shape_type": "polygon"})
    if rng.random() < 0.1:
        shapes.append({"label": "flag", "points": [[0, 0], [3, 0], [3, 3]], "shape_type": "polygon"})
    return shapes, texts, is_sentence
