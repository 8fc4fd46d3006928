"""rewards.py - the task table and the three toy rewards (the paper's Sec. 4 / Table 1 columns, Sec. 9).

DiffusionOPD trains one teacher per reward and reports one metric per task: GenEval
(compositional correctness), OCR accuracy, and a human-preference score (the LAION aesthetic
predictor). This file holds their toy-scale stand-ins and the table that ties each task to its
prompts (toy.py) and its scorer; the real-scale rewards of Sec. 9 (Mask2Former GenEval, PP-OCR at
512 px, PickScore) are in real_rewards.py, the evaluation protocol in evaluate.py:

    TASKS[name] = Task(name, train, test, reward, metric, scale)
    reward(images_NHWC_uint8, prompts, strict=True) -> float numpy (N,)

  * geneval  - a programmatic detector (hue segmentation, connected components, shape by pixel
               moments) applying GenEval's per-prompt rules to the top-k detections of each class
               (geneval_checks). strict=True: GenEval's 0/1 (evaluation); strict=False: the
               fraction of rules met; geneval_rl_reward: half strict, half per-object credit (RL);
               geneval_diagnostics: per-tag accuracy and per-colour found-rates.
  * ocr      - PP-OCR's recognizer (rapidocr-onnxruntime, offline), the paper's score: 1 if the
               target is a substring of what is read, else 1 - min(Levenshtein, len) / len (Sec. 9)
  * aesthetic- a deterministic 0-10 score standing in for the LAION predictor (aesthetic_reward).

What each scores on ground truth, noise and blank images, and its cost (ground_truth_check):
docs/experiments.md, "The toy rewards on ground truth, and their cost".

Deliberate deviations from the paper:
  1. A hand-written detector (hue classes, components, moments), not Mask2Former + CLIP colours;
     its objects carry no confidence, so where GenEval judges a class's top k by it, the k largest.
  2. Colours are named in counting and position prompts too (GenEval's do not): the top n / top 1
     of the shape must have the colour. Two objects may share a shape: its top 2, one per colour.
  3. OCR reads the whole image as one text line (x4 upscale, no text detection): 50x faster, within
     0.04 of detection + recognition; over 64 px, the full pipeline. Reads are NFKC-normalised
     (PP-OCR sometimes returns full-width letters), lower-cased, spaces removed (Sec. 9).
  4. The aesthetic score is a fixed formula, not a learned predictor; prompt independent, as LAION's.
"""
import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

import toy

# ---------------------------------------------------------------------------------
# geneval: a detector for coloured squares and triangles
# ---------------------------------------------------------------------------------
CHROMA_MIN = 60        # a pixel is "coloured" if max(rgb) - min(rgb) >= this (0-255);
                       # the background is near grey (chroma <= ~12), and a half-covered
                       # edge pixel of the least saturated colour (green) still has ~65
HUE_TOL = 30.0         # degrees; a coloured pixel whose hue is further than this from
                       # every palette hue belongs to no colour (e.g. cyan, magenta)
MIN_AREA = 20          # pixels; smaller components are specks, not objects (the
                       # smallest canonical object, a 9 px triangle, covers ~40)
POS_MARGIN = 0.1       # GenEval's relative-position slack: centre offsets shrink by
                       # 0.1 x (sum of the two boxes' sizes) before the direction test


def _hue_chroma(img):
    """uint8 (..., 3) -> (hue in degrees [0, 360), chroma in 0-255), float arrays."""
    x = img.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6,                # standard HSV hue
                   np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue, c


PALETTE_HUES = _hue_chroma(np.array(list(toy.COLORS.values()), np.uint8))[0]  # (4,) deg


def _classify_shape(mask):
    """A component's boolean mask, cropped to its box -> "square" | "triangle" | None.

    The vertical skewness of the mask's pixels tells the shapes apart: an up-pointing
    triangle has its mass at the bottom (skewness -0.57 in the limit; y grows
    downwards), a square is symmetric (0). Measured on renders blurred by sigma 1.5 px
    with pixel noise sigma 15: squares |skew| <= 0.09, triangles <= -0.13 (99% of
    them). This is far more robust than box-based features: a 1-px spur of noise
    stretches a box but hardly moves a moment. The fill of the box (square ~1,
    triangle ~0.5, >= 0.73 / <= 0.84 when degraded) rules out bars and ragged blobs.
    """
    h, w = mask.shape
    if not 0.67 <= w / h <= 1.5:          # both shapes fit a square box; two objects
        return None                       # merged side by side (2:1) are neither
    ys, xs = np.nonzero(mask)
    def skew(v):
        v = v - v.mean()
        return (v ** 3).mean() / max(v.var(), 1e-6) ** 1.5
    sy, sx, fill = skew(ys.astype(float)), skew(xs.astype(float)), mask.mean()
    if abs(sx) > 0.25:                                            # lopsided: neither shape
        return None
    if abs(sy) <= 0.12 and fill >= 0.7:
        return "square"
    if sy <= -0.15 and 0.4 <= fill <= 0.85:
        return "triangle"
    return None


def detect(img):
    """uint8 (H, W, 3) -> list of objects {"color", "shape", "area", "box": (x, y, w, h)},
    largest first. Components that look like no shape are dropped."""
    # a 3x3 median first: removes speckle (generated images are grainy) but keeps edges
    hue, chroma = _hue_chroma(cv2.medianBlur(np.ascontiguousarray(img), 3))
    dist = np.abs((hue[..., None] - PALETTE_HUES + 180.0) % 360.0 - 180.0)  # (H, W, 4)
    nearest = dist.argmin(-1)
    coloured = (chroma >= CHROMA_MIN) & (dist.min(-1) <= HUE_TOL)
    objects = []
    for ci, color in enumerate(toy.COLORS):
        mask = (coloured & (nearest == ci)).astype(np.uint8)
        # 4-connectivity: diagonal touches do not merge neighbours into one object
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        for j in range(1, n):                                     # label 0 is background
            x, y, w, h, area = stats[j]
            if area < MIN_AREA:
                continue
            shape = _classify_shape(labels[y:y + h, x:x + w] == j)
            if shape is not None:
                objects.append({"color": color, "shape": shape, "area": int(area),
                                "box": (int(x), int(y), int(w), int(h))})
    return sorted(objects, key=lambda o: -o["area"])


def relations(a, b):
    """The set of GenEval relations ("left of", ...) that object a has to object b:
    shrink the centre offset by POS_MARGIN x (sizes), then a direction holds if its
    component of the unit offset exceeds 0.5. y grows downwards: above = dy < 0."""
    ca = np.array([a["box"][0] + a["box"][2] / 2, a["box"][1] + a["box"][3] / 2])
    cb = np.array([b["box"][0] + b["box"][2] / 2, b["box"][1] + b["box"][3] / 2])
    size = np.array(a["box"][2:], float) + np.array(b["box"][2:], float)
    off = ca - cb
    shrunk = np.maximum(np.abs(off) - POS_MARGIN * size, 0) * np.sign(off)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(off)
    return {r for r, ok in (("left of", dx < -0.5), ("right of", dx > 0.5),
                            ("above", dy < -0.5), ("below", dy > 0.5)) if ok}


def geneval_checks(spec, objects):
    """GenEval's rules for one prompt -> list of booleans (all True = correct).

    As GenEval's evaluate_images does: the detections of each requested class (shape) are
    ranked - by confidence there, by area here (deviation 1) - and only the top k are judged,
    k = how many objects of that class the prompt asks for. Colour and position are judged on
    THOSE detections, whatever their colour: a correct smaller object does not rescue a wrong
    larger one.
      include  : at least k detections of the shape                  (presence, count)
      colour   : the top k carry the requested colour(s)
      exclude  : counting prompts also fail with n + 1 of the shape   (so exactly n)
      position : object A's detection stands in the relation to B's   (relations())
    A two-object prompt whose objects share a shape ("a red square and a blue square"; GenEval
    never pairs a class with itself) takes the top 2 of that shape, and each object is the one
    of them in its colour (deviation 2).
    """
    by_shape = {}
    for d in objects:                                        # detect() lists largest first
        by_shape.setdefault(d["shape"], []).append(d)
    objs, conds = spec["objects"], []
    if spec["category"] in ("single", "colors", "counting"):
        o = objs[0]
        found = by_shape.get(o["shape"], [])
        top = found[:o["count"]]
        conds.append(len(top) == o["count"])                                  # include
        if o["color"] is not None:
            conds.append(len(top) == o["count"] and all(d["color"] == o["color"] for d in top))
        if spec["category"] == "counting":
            conds.append(len(found) < o["count"] + 1)                         # exclude n + 1
        return conds
    picked = []                                              # the detection judged as each object
    for o in objs:
        k = sum(q["shape"] == o["shape"] for q in objs)
        top = by_shape.get(o["shape"], [])[:k]
        conds.append(len(top) == k)                                           # include
        free = [d for d in top if not any(d is p for p in picked)]
        mine = [d for d in free if o["color"] is None or d["color"] == o["color"]]
        picked.append(mine[0] if mine else None)
        if o["color"] is not None:
            conds.append(bool(mine))                                          # colour of the top k
    if spec["relation"] is not None:
        a, b = picked
        conds.append(a is not None and b is not None and spec["relation"] in relations(a, b))
    return conds


def geneval_reward(images, prompts, strict=True):
    """GenEval-style score per image: strict -> 0/1 (all rules hold), else the fraction
    of rules that hold (partial credit for RL)."""
    _check(images, prompts)
    out = np.zeros(len(prompts))
    for i, (img, p) in enumerate(zip(images, prompts)):
        conds = geneval_checks(toy.parse(p), detect(img))
        out[i] = float(all(conds)) if strict else float(np.mean(conds))
    return out


def _in_place(d, relation, first, side):
    """Position prompts: is detection d in its object's half of the canvas? "A left of B" puts A's
    centre left of the middle and B's right of it (above / below: the vertical middle)."""
    cx, cy = d["box"][0] + d["box"][2] / 2, d["box"][1] + d["box"][3] / 2
    c = cx if relation in ("left of", "right of") else cy
    before = relation in ("left of", "above")                  # does object A come first along the axis?
    return (c < side / 2) if before == first else (c > side / 2)


def object_credit(spec, objects, side=toy.RES):
    """Credit per requested object, judged on the detections GenEval judges (the top k of each
    shape by area, as geneval_checks): 1 when the one picked for it has its colour and, in a position
    prompt, lies in its half of the canvas (_in_place); a counting prompt's one entry is the share of
    its top n in the colour over max(n, detections of the shape), so extra objects cost too."""
    by_shape = {}
    for d in objects:
        by_shape.setdefault(d["shape"], []).append(d)
    objs = spec["objects"]
    if spec["category"] in ("single", "colors", "counting"):
        o = objs[0]
        found = by_shape.get(o["shape"], [])
        right = sum(o["color"] is None or d["color"] == o["color"] for d in found[:o["count"]])
        return [right / max(o["count"], len(found))]
    credits, picked = [], []
    for i, o in enumerate(objs):
        k = sum(q["shape"] == o["shape"] for q in objs)
        free = [d for d in by_shape.get(o["shape"], [])[:k] if not any(d is p for p in picked)]
        mine = [d for d in free if o["color"] is None or d["color"] == o["color"]]
        picked.append(mine[0] if mine else None)
        ok = picked[-1] is not None and (spec["relation"] is None or _in_place(picked[-1], spec["relation"], i == 0, side))
        credits.append(float(ok))
    return credits


RL_STRICT_WEIGHT = 0.5    # geneval_rl_reward = w * strict + (1 - w) * mean object credit


def geneval_rl_reward(images, prompts):
    """The GenEval reward RL trains on (teachers.py --rl-reward objects): half GenEval's strict 0/1,
    half the mean per-object credit (object_credit). A cheap wrong picture earns little: both objects
    in one colour, or a wrong shape, or one object missing, earn 0.25; objects in swapped places 0;
    a counting prompt drawn in the wrong colour 0 (the fraction of rules, geneval_reward(strict=False),
    pays 0.5-0.8 for each of these)."""
    _check(images, prompts)
    out = np.zeros(len(prompts))
    for i, (img, p) in enumerate(zip(images, prompts)):
        spec, objects = toy.parse(p), detect(img)
        strict = float(all(geneval_checks(spec, objects)))
        out[i] = RL_STRICT_WEIGHT * strict + (1 - RL_STRICT_WEIGHT) * float(np.mean(object_credit(spec, objects, img.shape[1])))
    return out


GENEVAL_TAGS = ("single", "colors", "counting", "two_object", "position")   # the toy's categories (GenEval's tags)


def geneval_diagnostics(images, prompts) -> dict:
    """What a GenEval run should watch besides its mean: strict accuracy per tag, and per colour the
    found-rate - of the objects asked for in that colour, the share detected with their shape in
    that colour (an object asked n times counts n; detections of the shape in the colour, at most n).
    {"strict": mean, "tags": {tag: [accuracy, n]}, "colours": {colour: [found-rate, asked]}}."""
    _check(images, prompts)
    tags, asked, found, strict = {}, {}, {}, []
    for img, p in zip(images, prompts):
        spec, objects = toy.parse(p), detect(img)
        ok = float(all(geneval_checks(spec, objects)))
        strict.append(ok)
        tags.setdefault(spec["category"], []).append(ok)
        for o in spec["objects"]:
            if o["color"] is not None:
                hits = sum(d["shape"] == o["shape"] and d["color"] == o["color"] for d in objects)
                asked[o["color"]] = asked.get(o["color"], 0) + o["count"]
                found[o["color"]] = found.get(o["color"], 0) + min(hits, o["count"])
    return {"strict": float(np.mean(strict)) if strict else float("nan"),
            "tags": {t: [float(np.mean(tags[t])), len(tags[t])] for t in GENEVAL_TAGS if t in tags},
            "colours": {c: [found[c] / asked[c], asked[c]] for c in toy.COLORS if asked.get(c)}}


def colour_warnings(diag: dict, base: dict) -> list[str]:
    """One line per colour whose found-rate fell below half the base's (the forgetting a mean hides)."""
    return [f"warning: {c} objects found in {r:.0%} of {n} asked, under half the base's {base['colours'][c][0]:.0%}"
            for c, (r, n) in diag["colours"].items() if c in base["colours"] and r < 0.5 * base["colours"][c][0]]


# ---------------------------------------------------------------------------------
# ocr: PP-OCR recognition + the paper's edit-distance score (Sec. 9)
# ---------------------------------------------------------------------------------
OCR_UPSCALE = 4        # 32 px -> 128 px: PP-OCR's recognizer expects text ~48 px tall
OCR_BATCH = 64


@functools.lru_cache(maxsize=1)
def _ocr_engine():
    """The PP-OCR engine, built once on first use (loading takes ~0.3 s)."""
    from rapidocr_onnxruntime import RapidOCR   # lazy: importing it costs ~1 s
    # rec_img_shape width 64 (default 320): our square inputs are resized to 48 px
    # high, so 64 px of width is enough and the recognizer runs ~5x faster
    return RapidOCR(rec_batch_num=OCR_BATCH, rec_img_shape=[3, 48, 64])


def ocr_read(images):
    """uint8 (N, H, W, 3) -> list of N recognised strings (raw engine output)."""
    engine = _ocr_engine()
    bgr = np.ascontiguousarray(images[..., ::-1])   # the engine, like cv2, expects BGR
    if images.shape[1] <= 64:
        # toy fast path: the whole image is the text line, no detection (deviation 3)
        big = [cv2.resize(im, None, fx=OCR_UPSCALE, fy=OCR_UPSCALE,
                          interpolation=cv2.INTER_CUBIC) for im in bgr]
        return [text for text, _conf in engine.text_rec(big)[0]]
    # real-scale images: detection + recognition, lines joined (slow: 0.15-0.25 s an image)
    reads = [engine(im)[0] for im in bgr]
    return [" ".join(r[1] for r in res) if res else "" for res in reads]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    prev = list(range(len(b) + 1))                # distances from "" to b[:j]
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _norm(s):
    return unicodedata.normalize("NFKC", s).lower().replace(" ", "")


def ocr_target(prompt):
    """The first double-quoted span of the prompt (Sec. 9)."""
    m = re.search(r'"([^"]*)"', prompt)
    if m is None:
        raise ValueError(f"OCR prompt has no quoted text: {prompt!r}")
    return m.group(1)


def ocr_score(recognised: str, target: str) -> float:
    """Sec. 9: 1 if target is a substring of what was read, else
    1 - min(Levenshtein(rec, target), len(target)) / len(target); both lower-cased,
    spaces removed."""
    r, t = _norm(recognised), _norm(target)
    if t in r:
        return 1.0
    return 1.0 - min(levenshtein(r, t), len(t)) / len(t)


def ocr_reward(images, prompts, strict=True):
    """OCR score per image (strict is unused: the paper's score is the metric)."""
    _check(images, prompts)
    return np.array([ocr_score(r, ocr_target(p)) for r, p in zip(ocr_read(images), prompts)])


# ---------------------------------------------------------------------------------
# aesthetic: a fixed stand-in for the LAION aesthetic predictor
# ---------------------------------------------------------------------------------
AES_RES = 32           # images are area-resized to 32 x 32 first (any input size works)
AES_C0 = 0.7           # mean chroma at which the colour factor saturates
AES_V0, AES_VW = 0.75, 0.5   # preferred mean brightness and tolerance
AES_H0 = 0.08          # high-frequency energy scale (mean |x - blur(x)|, x in [0, 1])
AES_L0 = 0.1           # large-scale colour variation at which the layout factor saturates


def aesthetic_features(images):
    """uint8 (N, H, W, 3) -> dict of (N,) float arrays: C, V, HF, L (see below)."""
    x = np.stack([cv2.resize(im, (AES_RES, AES_RES), interpolation=cv2.INTER_AREA)
                  if im.shape[:2] != (AES_RES, AES_RES) else im for im in images])
    x = x.astype(np.float32) / 255.0                                       # (N, 32, 32, 3)
    blur = np.stack([cv2.GaussianBlur(im, (0, 0), 1.0) for im in x])
    cells = x.reshape(len(x), 4, AES_RES // 4, 4, AES_RES // 4, 3).mean((2, 4))  # 4x4 grid
    return {
        "C": (x.max(-1) - x.min(-1)).mean((1, 2)),          # colourfulness: mean chroma
        "V": x.max(-1).mean((1, 2)),                        # brightness: mean HSV value
        "HF": np.abs(x - blur).mean((1, 2, 3)),             # crispness: detail above 1 px
        "L": np.sqrt(cells.reshape(len(x), 16, 3).var(1).mean(-1)),  # layout: cell spread
    }


def aesthetic_reward(images, prompts=None, strict=True):
    """A 0-10 "aesthetic" score that likes soft, bright, saturated colour fields:

        score = 10 * min(C / 0.7, 1)^(1/4)            colour: saturated is better
                   * exp(-((V - 0.75) / 0.5)^2)        light: bright but not blown out
                   * exp(-HF / 0.08)                   softness: no crisp edges or grain
                   * min(L / 0.1, 1)^(1/4)             layout: not one flat colour

    C = mean chroma (max - min of RGB), V = mean HSV value, HF = mean |x - Gaussian
    blur(x, sigma 1 px)|, L = spread of colour between the 4 x 4 grid of 8 px cells;
    all on [0, 1] images, area-resized to 32 x 32.
    Why this shape: each factor is something a diffusion model gets by smooth,
    low-frequency changes (no fine detail), and the crispness factor punishes exactly
    what text and sharp shapes need - so pushing it pulls against OCR and GenEval.
    Anchors (held-out prompts, one render each): ground-truth scenes 4.9 on average
    (LAION score of SD3.5-M: 5.36; range 0.7 stormy night - 8.3 golden dawn),
    ideal_aesthetic_image() 8.9, GenEval renders ~5.0, OCR renders ~2.7, uniform
    noise ~0.5, any blank image 0. Prompt independent; `prompts` and `strict` unused.
    """
    if prompts is not None:
        _check(images, prompts)
    f = aesthetic_features(images)
    score = (np.minimum(f["C"] / AES_C0, 1.0) ** 0.25
             * np.exp(-(((f["V"] - AES_V0) / AES_VW) ** 2))
             * np.exp(-f["HF"] / AES_H0)
             * np.minimum(f["L"] / AES_L0, 1.0) ** 0.25)
    return 10.0 * score.astype(np.float64)


def ideal_aesthetic_image():
    """A hand-made image the aesthetic score loves: a violet-magenta-orange sunset sky
    blending into a deep blue sea, with a soft glowing sun; no hard edge anywhere.
    uint8 (32, 32, 3); scores ~8.9."""
    y = np.arange(toy.RES) + 0.5
    stops = [(0, (70, 20, 170)), (10, (230, 40, 150)), (19, (255, 140, 20)),
             (21, (240, 90, 60)), (32, (30, 30, 170))]                 # (row, colour)
    col = np.stack([np.interp(y, [s[0] for s in stops], [s[1][c] for s in stops])
                    for c in range(3)], -1)                                # (H, 3)
    img = np.broadcast_to(col[:, None], (toy.RES, toy.RES, 3))
    glow = np.exp(-((y[None, :] - 16) ** 2 + (y[:, None] - 18) ** 2) / (2 * 4.0 ** 2))[..., None]
    img = img * (1 - glow) + np.array([255, 215, 60]) * glow               # the sun
    return img.clip(0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------
# the task table
# ---------------------------------------------------------------------------------
def _check(images, prompts):
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3):
        raise ValueError(f"rewards take uint8 (N, H, W, 3) images, got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


@dataclass(frozen=True)
class Task:
    name: str               # task key: "geneval" | "ocr" | "aesthetic"
    train: list             # prompts RL trains on (toy.prompts(name, "train"))
    test: list              # held-out prompts evaluation draws from
    reward: Callable        # reward(images_NHWC_uint8, prompts, strict=True) -> (N,) float
    metric: str             # column name in the results table
    scale: str              # the metric's range, for printing
    teacher_cfg: float      # CFG of a published SD3 teacher without opd.json (paper Sec. 4)
    source: str = ""        # real scale: a hash of the prompt files (part of the evaluation protocol)
    tag: Callable | None = None   # GenEval: prompt -> its tag; the protocol draws the same number of images
                                  # per tag and the column is GenEval's Overall, the mean of the tags' accuracies


def geneval_tag(prompt: str) -> str:
    """A toy GenEval prompt's tag (GENEVAL_TAGS)."""
    return toy.parse(prompt)["category"]


def by_tag(task: "Task", prompts: list[str]) -> list[list[str]]:
    """A tagged task's prompts grouped by tag, tags in order of first appearance, each group in list
    order (the evaluation's per-tag draw and teachers.py --prompt-mix tags)."""
    groups: dict = {}
    for p in prompts:
        groups.setdefault(task.tag(p), []).append(p)
    return list(groups.values())


TASKS = {
    "geneval": Task("geneval", toy.prompts("geneval", "train"), toy.prompts("geneval", "test"),
                    geneval_reward, "GenEval", "0-1", 1.0, tag=geneval_tag),      # CFG-free NFT
    "ocr": Task("ocr", toy.prompts("ocr", "train"), toy.prompts("ocr", "test"),
                ocr_reward, "OCR", "0-1", 4.5),
    "aesthetic": Task("aesthetic", toy.prompts("aesthetic", "train"), toy.prompts("aesthetic", "test"),
                      aesthetic_reward, "Aesthetic", "0-10", 4.5),
}


def score(task, images, prompts, strict=True):
    """Score images with a task's reward: (N,) float numpy."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return TASKS[task].reward(images, prompts, strict=strict)


def ground_truth_check(seed=0):
    """Each scorer's mean on renders of the held-out prompts, uniform noise and blank
    (mid-grey) images: docs/experiments.md, "The toy rewards on ground truth, and their cost"."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, task in TASKS.items():
        gt = np.stack([toy.render(p, rng) for p in task.test])
        noise = rng.integers(0, 256, gt.shape, dtype=np.uint8)
        blank = np.full_like(gt, 128)
        out[name] = {k: round(float(score(name, v, task.test).mean()), 3)
                     for k, v in (("ground_truth", gt), ("noise", noise), ("blank", blank))}
    out["aesthetic"]["ideal"] = round(float(aesthetic_reward(ideal_aesthetic_image()[None])[0]), 3)
    return out


SPLITS = ("train", "test")  # primary table (the prompts RL and distillation use), held-out table
