"""The task table and the three rewards (the paper's Sec. 4 / Table 1 columns, Sec. 9).

DiffusionOPD trains one teacher per reward and reports one metric per task: GenEval
(compositional correctness), OCR accuracy, and human-preference scores such as the
LAION aesthetic predictor. This file holds their toy-scale stand-ins and the table
that ties each task to its prompts (toy.py) and its scorer:

    TASKS[name] = Task(name, train, test, reward, metric, scale)
    reward(images_NHWC_uint8, prompts, strict=True) -> float numpy (N,)

  * geneval  - a programmatic detector (hue segmentation, connected components, shape
               by pixel moments, box centres) applying GenEval's per-prompt rules to the
               top-k detections of each class: presence, exact counts, colours, relative
               position (geneval_checks). strict=True is GenEval's all-or-nothing 0/1
               (evaluation); strict=False is the fraction of satisfied rules (RL's denser signal).
  * ocr      - PaddleOCR's PP-OCR recognizer (rapidocr-onnxruntime, offline) with the
               paper's score: 1 if the target is a substring of what is read, else
               1 - min(Levenshtein, len(target)) / len(target)                  (Sec. 9)
  * aesthetic- a deterministic 0-10 score standing in for the LAION predictor (see
               aesthetic_reward's docstring for the formula and its anchors).

At real scale (an SD3 base; README, "Real scale") the same three task names take their prompts
from a prompt folder (read_prompts; the example set prompts/, or write_geneval_prompts' output)
and the paper's Sec. 9 rewards, in this process: GenEval's rules on Mask2Former detections with a
CLIP colour classifier (GenEvalScorer), PP-OCR with detection (ocr_reward at 512 px), PickScore
for the aesthetic task. tasks_for(base) picks the table.

Below them, the evaluation protocol (README, "Evaluation"): evaluate / evaluate_checkpoint,
the score cache keyed by cache_key (protocol + weights_hash + reward_version), the results
JSON with the paper's Average (minmax_average; average_difference bootstraps the difference of
two rows'), and the CLI that prints both tables:

    python rewards.py base ckpts/*                         # both tables, paired to the first folder
    python rewards.py base ckpts/* --export-scores         # also store them in the folders' scores.json
    python rewards.py --geneval-prompts DIR --exclude prompts/geneval/test_metadata.jsonl   # GenEval training prompts

Measured on 2 CPU cores (images of the 64-70 held-out prompts, one render each;
`ground_truth_check()`, ~2 s): ground truth scores geneval 1.00, ocr 1.00; noise and blank
images 0.00 on both. Aesthetic: ground truth 4.94 on average, the hand-made ideal 8.88, noise
0.48, blank 0. Cost: geneval ~0.4 ms, ocr ~4 ms (batched), aesthetic ~0.15 ms an image.

Deliberate deviations from the paper:
  1. GenEval's detector is Mask2Former + a CLIP colour classifier; here a hand-written
     detector on a synthetic world (hue classes, components, moments). Objects carry no
     confidence, so where GenEval ranks a class's detections by confidence and judges the
     top k, we rank them by area (largest first) and judge the k largest.
  2. Our colour prompts also name colours in counting and position prompts (GenEval's do
     not): the top n (counting) or top 1 (position) of the shape must have the colour. Two
     objects may share a shape ("a red square and a blue square"); the top 2 of that shape
     are judged, each object being the one in its colour (GenEval never pairs a class with
     itself).
  3. OCR reads the whole image as one text line (no text detection, x4 upscale): 50x
     faster, and within 0.04 of detection + recognition on a toy model's samples
     (measured). Images larger than 64 px go through the full detector pipeline. Recognised text is NFKC
     normalised (PP-OCR sometimes returns full-width letters), then lower-cased with
     spaces removed as in Sec. 9.
  4. The aesthetic score is a fixed formula, not a learned predictor; it is prompt
     independent (as the LAION predictor is).
"""
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import types
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

import sampler as S
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


TASKS = {
    "geneval": Task("geneval", toy.prompts("geneval", "train"), toy.prompts("geneval", "test"),
                    geneval_reward, "GenEval", "0-1", 1.0),                       # CFG-free NFT
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
    (mid-grey) images: the numbers quoted at the top of this file."""
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


# ---------------------------------------------------------------------------------
# real-scale rewards (SD3.5-M, 512 px): GenEval, PickScore, ClipScore, in process (Sec. 9)
# ---------------------------------------------------------------------------------
# The paper scores SD3.5-Medium samples with (Sec. 9): GenEval = a Mask2Former (Swin-S, COCO
# instance) detector + a CLIP ViT-L/14 colour classifier applying GenEval's per-prompt rules;
# OCR = PP-OCR with the Levenshtein score (ocr_reward above already runs rapidocr's detection +
# recognition on images larger than 64 px: no new code); PickScore; ClipScore. Everything here
# runs in this process on transformers models (no reward servers, no mmcv/mmdet, no Paddle),
# loaded lazily from the hub cache or a local folder: a model that is not there is one line,
# S.CheckpointError, naming the download command. Deviations from GenEval's own code
# (djghosh13/geneval, evaluation/evaluate_images.py):
#   1. the detector is transformers' port of Mask2Former Swin-S COCO-instance (the Detectron2
#      weights), not mmdet's; its output goes through mmdet's instance post-processing
#      (mask2former_detections) at mmdet's test scale (shortest edge 800), but the weights differ.
#   2. square images are assumed (SD3.5-M samples at 512 x 512): the mask logits then cover the
#      whole image, and one bilinear resize to (H, W) stands in for mmdet's two (to the padded
#      input, then to the original size).
#   3. strict=False returns the fraction of satisfied rules (RL's denser signal); strict=True is
#      GenEval's 0/1.

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's object_names.txt: COCO's 80 classes in COCO's order, three of them renamed
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# a detector's id2label name (lower-cased) -> GenEval's: COCO's names, and VOC-style spellings
DETECTOR_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
                    "tv monitor": "tv", "diningtable": "dining table", "pottedplant": "potted plant",
                    "hair dryer": "hair drier", "cellphone": "cell phone", "doughnut": "donut"}
# GenEval's evaluate_images defaults (--options threshold, counting_threshold, max_objects,
# position_threshold); the last is POS_MARGIN, which relations() reads
GENEVAL_THRESHOLD = 0.3        # detection confidence kept ...
GENEVAL_COUNT_THRESHOLD = 0.9  # ... and for counting prompts
GENEVAL_MAX_OBJECTS = 16       # detections kept per class
GENEVAL_POSITION_THRESHOLD = POS_MARGIN   # 0.1
CLIP_L14 = "openai/clip-vit-large-patch14"  # GenEval's colour classifier (open_clip ViT-L-14, openai)
MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
DETECTOR_SHORT_EDGE = 800      # mmdet's test resize (1333, 800): a 512 px image goes in at 800
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"   # PickScore's own README pairs these


def _geneval_name(label):
    """A detector's class name -> GenEval's, or None for a class GenEval does not know."""
    name = DETECTOR_ALIASES.get(str(label).strip().lower(), str(label).strip().lower())
    return name if name in COCO_CLASSES else None


def mask2former_detections(class_logits, mask_logits, size, id2label, top=100, min_score=0.0):
    """Mask2Former's COCO-instance output for ONE square image -> detections, best first.

    class_logits (Q, C + 1) (the last class is "no object"), mask_logits (Q, h, w) at 1/4 of the
    model's input. As mmdet's MaskFormerFusionHead.instance_postprocess: softmax over classes, drop
    no-object, top-k over all (query, class) pairs; each pair's mask logits are upsampled
    (bilinear) to size = (H, W), binary = sigmoid > 0.5, mask score = mean probability inside the
    binary mask, score = class probability x mask score, box = the binary mask's extent
    (x0, y0, x1, y1), x1 / y1 exclusive (mmdet's mask2bbox). Dropped: empty masks (score 0 in
    mmdet), classes GenEval does not know, and pairs whose class probability is <= min_score
    (a score never exceeds its class probability, so min_score = a threshold loses nothing).
    Each: {"class": GenEval name, "score", "box", "mask": bool (H, W)}."""
    probs = torch.as_tensor(class_logits).detach().float().cpu().softmax(-1)[:, :-1]
    scores, idx = probs.flatten().topk(min(top, probs.numel()))
    keep = scores > min_score
    scores, query, label = scores[keep], idx[keep] // probs.shape[1], idx[keep] % probs.shape[1]
    if not len(scores):
        return []
    masks = torch.as_tensor(mask_logits).detach()
    masks = masks[query.to(masks.device)].float()                # upsampled where they are (GPU)
    prob = torch.nn.functional.interpolate(masks[None], size=tuple(size), mode="bilinear",
                                           align_corners=False)[0].sigmoid().cpu()
    binary = prob > 0.5
    mask_score = (prob * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    out = []
    for k in range(len(scores)):
        lab = int(label[k])
        name = _geneval_name(id2label.get(lab, id2label.get(str(lab), "")))
        cols, rows = binary[k].any(0).nonzero()[:, 0], binary[k].any(1).nonzero()[:, 0]
        if name is None or not len(cols):
            continue
        out.append({"class": name, "score": float(scores[k] * mask_score[k]),
                    "box": (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
                    "mask": binary[k].numpy()})
    return sorted(out, key=lambda d: -d["score"])


def _xywh(d):
    """A detection as relations reads it: box (x, y, w, h)."""
    return {"box": (d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1])}


def geneval_rules(meta, detections, colour_of, strict=True):
    """GenEval's rules for one prompt (GenEval's metadata: tag, include, optional exclude) -> 1/0
    when strict, else the fraction of rules that hold.

    As GenEval's evaluate_image / evaluate: per class, detections with score > 0.3 (> 0.9 for
    counting prompts), best first, at most 16. Each include {"class", "count", "color"?,
    "position"?: [relation, group]} is judged on its class's top `count`:
      presence : `count` of them exist
      colour   : colour_of(those) names the colour for all of them (called only then)
      position : each stands in the relation (relations) to every object of include `group`,
                 which must itself have matched (else no target: fails)
    An include that fails a rule is unmatched: its later rules count as failed (GenEval skips
    them) and a position naming it has no target. Each exclude {"class", "count"} fails when the
    class has >= count detections (counting prompts: n + 1, so exactly n)."""
    thr = GENEVAL_COUNT_THRESHOLD if meta["tag"] == "counting" else GENEVAL_THRESHOLD
    by_class = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        found = by_class.setdefault(d["class"], [])
        if d["score"] > thr and len(found) < GENEVAL_MAX_OBJECTS:
            found.append(d)
    conds, groups = [], []
    for req in meta.get("include", []):
        found = by_class.get(req["class"], [])[:req["count"]]
        ok = len(found) == req["count"]
        conds.append(ok)
        if "color" in req:
            ok = ok and all(c == req["color"] for c in colour_of(found))
            conds.append(ok)
        if "position" in req:
            rel, group = req["position"]
            target = groups[group] if ok else None
            ok = target is not None and all(rel in relations(_xywh(a), _xywh(b))
                                            for a in found for b in target)
            conds.append(ok)
        groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        conds.append(len(by_class.get(req["class"], [])) < req["count"])
    return float(all(conds)) if strict or not conds else float(np.mean(conds))


def colour_crops(image, detections):
    """GenEval's ImageCrops: outside the object's mask the image is grey #999999, then cropped to
    the box -> list of uint8 (h, w, 3) arrays (h, w = the box's size)."""
    out = []
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        m = np.asarray(d["mask"], bool)[y0:y1, x0:x1, None]
        out.append(np.where(m, image[y0:y1, x0:x1], np.uint8(0x99)).astype(np.uint8))
    return out


def _hub_model(cls, model_id, what):
    """cls.from_pretrained(model_id), once per (class, id): a model in eval mode without gradients
    on the GPU when there is one (processors as they are). Not in the hub cache / not a model
    folder -> one line of S.CheckpointError naming the download command (failures not cached)."""
    try:
        return _load(cls, model_id)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise S.CheckpointError(f"{model_id}: the {what} model is not available ({reason}); "
                                f"download it first: huggingface-cli download {model_id}") from None


@functools.lru_cache(maxsize=None)
def _load(cls, model_id):
    m = cls.from_pretrained(model_id)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return m.eval().requires_grad_(False).to(dev) if isinstance(m, torch.nn.Module) else m


def _clip(model_id, processor_id, what):
    """(CLIPModel, CLIPProcessor) of a hub id or folder (transformers imported lazily: seconds)."""
    from transformers import CLIPModel, CLIPProcessor
    return _hub_model(CLIPModel, model_id, what), _hub_model(CLIPProcessor, processor_id, what)


def _pooled(out):
    """get_*_features: a tensor in older transformers, an output whose pooler_output is the
    projected embedding in 5.x."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipColour:
    """GenEval's colour classifier: zero-shot CLIP over GENEVAL_COLORS with three templates; per
    object class, each colour's text embeddings are normalised, averaged over the templates and
    renormalised (clip_benchmark's zero_shot_classifier). __call__(crops, cls) -> colour names."""
    TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")

    def __init__(self, model_id=CLIP_L14):
        self.model, self.processor = _clip(model_id, model_id, "CLIP colour")
        self.heads = {}                                  # class name -> (10, D), as GenEval caches

    @torch.no_grad()
    def _head(self, cls):
        if cls not in self.heads:
            texts = [t.format(c=c, cls=cls) for c in GENEVAL_COLORS for t in self.TEMPLATES]
            tok = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
            e = _pooled(self.model.get_text_features(**tok)).float()
            e = torch.nn.functional.normalize(e, dim=-1).view(len(GENEVAL_COLORS), len(self.TEMPLATES), -1)
            self.heads[cls] = torch.nn.functional.normalize(e.mean(1), dim=-1)
        return self.heads[cls]

    @torch.no_grad()
    def __call__(self, crops, cls):
        if not len(crops):
            return []
        px = self.processor(images=list(crops), return_tensors="pt")["pixel_values"].to(self.model.device)
        img = torch.nn.functional.normalize(_pooled(self.model.get_image_features(pixel_values=px)).float(), dim=-1)
        return [GENEVAL_COLORS[i] for i in (img @ self._head(cls).T).argmax(-1).tolist()]


class ClipScore:
    """ClipScore: the cosine between CLIP's image and prompt embeddings (the paper's column,
    ~0.27-0.29 for SD3.5-M). __call__(images uint8 NHWC, prompts) -> float64 (N,)."""
    scaled = False          # PickScore: times logit_scale.exp()
    what = "ClipScore (CLIP)"

    def __init__(self, model_id=CLIP_L14, processor_id=None, batch=32):
        self.model, self.processor = _clip(model_id, processor_id or model_id, self.what)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, images, prompts):
        _check(images, prompts)
        out, norm = [], torch.nn.functional.normalize
        for i in range(0, len(images), self.batch):
            inp = self.processor(text=list(prompts[i:i + self.batch]), images=list(images[i:i + self.batch]),
                                 padding=True, truncation=True, return_tensors="pt").to(self.model.device)
            img = norm(_pooled(self.model.get_image_features(pixel_values=inp["pixel_values"])).float(), dim=-1)
            txt = norm(_pooled(self.model.get_text_features(input_ids=inp["input_ids"],
                                                            attention_mask=inp["attention_mask"])).float(), dim=-1)
            out.append((img * txt).sum(-1) * (self.model.logit_scale.exp().float() if self.scaled else 1.0))
        return torch.cat(out).double().cpu().numpy()


class PickScore(ClipScore):
    """PickScore: logit_scale.exp() x cosine on PickScore_v1 (a CLIP-H fine-tuned on Pick-a-Pic), the
    raw scale of the paper's Table 1 (~22 for SD3.5-M). Flow-GRPO divides it by 26 for its RL
    reward; scale it there, not here."""
    scaled = True
    what = "PickScore"

    def __init__(self, model_id=PICKSCORE, processor_id=PICKSCORE_PROCESSOR, batch=32):
        super().__init__(model_id, processor_id, batch)


@functools.cache
def _mask2former():
    """transformers' Mask2FormerForUniversalSegmentation for inference: its __init__ without the
    training loss, whose Hungarian matcher needs scipy (which nothing else here needs)."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerModel

    class Mask2FormerInference(Mask2FormerForUniversalSegmentation):
        _keys_to_ignore_on_load_unexpected = [r"criterion\."]     # the loss's class weights

        def __init__(self, config):
            super(Mask2FormerForUniversalSegmentation, self).__init__(config)
            self.model = Mask2FormerModel(config)
            self.class_predictor = torch.nn.Linear(config.hidden_dim, config.num_labels + 1)
            self.weight_dict, self.criterion = {}, None
            self.post_init()
    return Mask2FormerInference


class GenEvalScorer:
    """GenEval at real scale: Mask2Former -> mask2former_detections -> geneval_rules, colours by
    ClipColour on colour_crops. __call__(images uint8 NHWC, metas, strict=True) -> float64 (N,);
    metas: GenEval metadata dicts (or their JSON lines). detect: a callable image -> detections
    replacing the model (tests); colour: a model id or a callable (crops, cls) -> colour names;
    short_edge: the detector's input size (a square image is resized to it; 32 | short_edge)."""

    def __init__(self, detector=MASK2FORMER, colour=CLIP_L14, detect=None, batch=8,
                 short_edge=DETECTOR_SHORT_EDGE):
        self.detect, self.batch, self.short_edge = detect, batch, short_edge
        if detect is None:
            from transformers import Mask2FormerImageProcessor
            self.model = _hub_model(_mask2former(), detector, "GenEval detector")
            self.processor = _hub_model(Mask2FormerImageProcessor, detector, "GenEval detector")
        self.colour = colour if callable(colour) else ClipColour(colour)

    @torch.no_grad()
    def detections(self, images):
        """uint8 (N, H, W, 3), square -> N detection lists (GenEval's threshold applied early)."""
        if self.detect is not None:
            return [self.detect(im) for im in images]
        out = []
        for i in range(0, len(images), self.batch):
            inp = self.processor(images=list(images[i:i + self.batch]), return_tensors="pt",
                                 size={"shortest_edge": self.short_edge, "longest_edge": 1333})
            res = self.model(**{k: v.to(self.model.device) for k, v in inp.items()})
            out += [mask2former_detections(c, m, images.shape[1:3], self.model.config.id2label,
                                           min_score=GENEVAL_THRESHOLD)
                    for c, m in zip(res.class_queries_logits, res.masks_queries_logits)]
        return out

    def __call__(self, images, metas, strict=True):
        _check(images, metas)
        out = np.zeros(len(metas))
        for i, (img, dets, meta) in enumerate(zip(images, self.detections(images), metas)):
            meta = json.loads(meta) if isinstance(meta, str) else meta
            out[i] = geneval_rules(meta, dets, lambda f, img=img: self.colour(colour_crops(img, f), f[0]["class"]),
                                   strict)
        return out


@functools.cache
def _scorer(cls):
    """One instance of a real-scale scorer per process (its models load on first use)."""
    return cls()


def geneval_real_reward(images, metas, strict=True):
    """GenEval at real scale: 0/1 per image (strict), else the fraction of rules (RL)."""
    return _scorer(GenEvalScorer)(images, metas, strict)


def pickscore_reward(images, prompts, strict=True):
    """The aesthetic task at real scale: PickScore (raw scale; strict unused)."""
    return _scorer(PickScore)(images, prompts)


def load_real_rewards(tasks) -> None:
    """Load the reward models of these real-scale tasks now (before a run writes anything): a
    missing one is one line naming it. OCR's PP-OCR ships inside its wheel."""
    for t in tasks:
        if t in ("geneval", "aesthetic"):
            _scorer(GenEvalScorer if t == "geneval" else PickScore)


# ---------------------------------------------------------------------------------
# real scale: prompt folders and the task table of an SD3 base (README, "Real scale")
# ---------------------------------------------------------------------------------
# The same three task names at both scales; the base picks the prompts (Sec. 9): a toy base
# takes TASKS above, an SD3 base the files of a prompt folder in the layout of Flow-GRPO's
# dataset/ folder - one sub-folder per task, `train` for Stage 1 / Stage 2, `test` for evaluation:
#     geneval/{train,test}_metadata.jsonl   GenEval's metadata, one JSON object per line
#     ocr/{train,test}.txt                  one prompt per line; the target is its first "quoted" span
#     pickscore/{train,test}.txt            the aesthetic task: Pick-a-Pic style prompts, PickScore reward
# The repository ships a small example set in prompts/ (a few dozen lines per task).
PROMPT_DIR = S.REPO / "prompts"
REAL_FOLDERS = {"geneval": "geneval", "ocr": "ocr", "aesthetic": "pickscore"}
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


def _geneval_meta_ok(m) -> str:
    """'' if m is a usable GenEval metadata record, else what is wrong with it."""
    if not isinstance(m, dict) or not isinstance(m.get("prompt"), str) or not m["prompt"].strip():
        return "no prompt"
    if m.get("tag") not in GENEVAL_TAGS:
        return f"tag {m.get('tag')!r} is not one of {GENEVAL_TAGS}"
    inc = m.get("include")
    if not isinstance(inc, list) or not inc:
        return "no include list"
    for i, r in enumerate(inc + list(m.get("exclude", []))):
        if not isinstance(r, dict) or r.get("class") not in COCO_CLASSES:
            return f"class {r.get('class') if isinstance(r, dict) else r!r} is not a GenEval (COCO) class"
        if not isinstance(r.get("count"), int) or r["count"] < 1:
            return f"count {r.get('count')!r} is not a positive integer"
        if "color" in r and r["color"] not in GENEVAL_COLORS:
            return f"colour {r['color']!r} is not one of GenEval's"
        pos = r.get("position")
        if pos is not None and not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                                    and isinstance(pos[1], int) and 0 <= pos[1] < min(i, len(inc))):
            return f"position {pos!r} is not [relation, index of an earlier include]"
    return ""


def read_prompts(folder: str | Path, task: str, split: str) -> tuple[list[str], dict]:
    """One split of a task's prompt folder -> (prompts, {prompt: GenEval metadata} for geneval)."""
    f = Path(folder) / REAL_FOLDERS[task] / (f"{split}_metadata.jsonl" if task == "geneval" else f"{split}.txt")
    if not f.is_file():
        raise S.CheckpointError(f"{f}: no such prompt file; a prompt folder holds geneval/{split}_metadata.jsonl, "
                                f"ocr/{split}.txt and pickscore/{split}.txt (README, 'Real scale')")
    return read_prompt_file(f, task)


def read_prompt_file(f: Path, task: str) -> tuple[list[str], dict]:
    """Blank lines are skipped; any other line that cannot be used (OCR without a quoted target,
    GenEval metadata that is not valid) is an error naming the file and line, as is a file with
    no usable line. Errors are S.CheckpointError (one line, exit 2 in the scripts)."""
    prompts, specs = [], {}
    for ln, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if task == "geneval":
            try:
                m = json.loads(line)
            except json.JSONDecodeError as e:
                raise S.CheckpointError(f"{f}:{ln}: not a JSON object ({e.msg}); one GenEval metadata record per line")
            if why := _geneval_meta_ok(m):
                raise S.CheckpointError(f"{f}:{ln}: unusable GenEval metadata: {why}")
            p = m["prompt"].strip()
            specs[p] = m
        else:
            p = line.strip()
            if task == "ocr" and not re.search(r'"[^"]+"', p):
                raise S.CheckpointError(f"{f}:{ln}: an OCR prompt needs its target text in double quotes: {p[:60]!r}")
        prompts.append(p)
    if not prompts:
        raise S.CheckpointError(f"{f}: no usable prompt line; add one prompt per line (README, 'Real scale')")
    return prompts, specs


def _plural(name: str) -> str:
    irregular = {"person": "people", "sheep": "sheep", "knife": "knives", "skis": "skis", "scissors": "scissors",
                 "computer mouse": "computer mice"}
    if name in irregular:
        return irregular[name]
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def geneval_prompts(n: int, seed: int = 0, exclude: set | None = None) -> list[dict]:
    """n GenEval metadata records from GenEval's templates over its 80 classes and 10 colours, the
    six tags in turn (single object, two objects, counting 2-4 with n + 1 excluded, colour, position,
    colour attribution; single objects run out at 80), no prompt twice and none whose prompt is in
    `exclude` (a test set)."""
    rng, out, seen = np.random.default_rng(seed), [], set(exclude or ())
    words = {2: "two", 3: "three", 4: "four"}
    for tries in range(100 * n):
        if len(out) == n:
            break
        tag = GENEVAL_TAGS[tries % len(GENEVAL_TAGS)]      # in turn; a tag whose prompts run out drops out
        a, b = (COCO_CLASSES[k] for k in rng.choice(len(COCO_CLASSES), 2, replace=False))
        ca, cb = (GENEVAL_COLORS[k] for k in rng.choice(len(GENEVAL_COLORS), 2, replace=False))
        if tag == "single_object":
            m = {"include": [{"class": a, "count": 1}], "prompt": f"a photo of {_a(a)}"}
        elif tag == "two_object":
            m = {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                 "prompt": f"a photo of {_a(a)} and {_a(b)}"}
        elif tag == "counting":
            k = int(rng.integers(2, 5))
            m = {"include": [{"class": a, "count": k}], "exclude": [{"class": a, "count": k + 1}],
                 "prompt": f"a photo of {words[k]} {_plural(a)}"}
        elif tag == "colors":
            m = {"include": [{"class": a, "count": 1, "color": ca}], "prompt": f"a photo of {_a(ca)} {a}"}
        elif tag == "position":
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            m = {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                 "prompt": f"a photo of {_a(a)} {rel} {_a(b)}"}
        else:
            m = {"include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                 "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"}
        if m["prompt"] not in seen:
            seen.add(m["prompt"])
            out.append({"tag": tag, **m})
    if len(out) < n:
        raise S.CheckpointError(f"only {len(out)} distinct GenEval prompts could be drawn (asked for {n})")
    return out


def write_geneval_prompts(out_dir: str | Path, n: int, seed: int = 0, exclude: tuple = ()) -> Path:
    """Write out_dir/geneval/train_metadata.jsonl (a new file: an existing one is refused), leaving
    out every prompt of the given test metadata files."""
    f = Path(out_dir) / "geneval" / "train_metadata.jsonl"
    if f.exists():
        raise S.CheckpointError(f"{f} exists; choose another folder (nothing is overwritten)")
    test = set()
    for e in exclude:
        if not Path(e).is_file():
            raise S.CheckpointError(f"{e}: no such GenEval metadata file to exclude")
        test |= set(read_prompt_file(Path(e), "geneval")[0])
    recs = geneval_prompts(n, seed, test)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    os.replace(tmp, f)
    return f


def real_tasks(prompt_dir: str | Path | None = None) -> dict:
    """The task table of an SD3 base: prompts from a prompt folder (default: the shipped example
    set), the real rewards of Sec. 9 in-process (real-scale rewards below)."""
    folder = Path(prompt_dir or PROMPT_DIR)
    if not folder.is_dir():
        raise S.CheckpointError(f"{folder}: no such prompt folder (README, 'Real scale')")
    table = {}
    for name, metric, scale, cfg in (("geneval", "GenEval", "0-1", 1.0), ("ocr", "OCR", "0-1", 4.5),
                                     ("aesthetic", "PickScore", "~18-24", 4.5)):
        (train, specs), (test, specs_t) = (read_prompts(folder, name, s) for s in SPLITS)
        specs = specs | specs_t
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(json.dumps(read_prompts(folder, name, s)).encode())
        if name == "geneval":
            def reward(images, prompts, strict=True, specs=specs):
                return geneval_real_reward(images, [specs[p] for p in prompts], strict)
        else:
            reward = ocr_reward if name == "ocr" else pickscore_reward
        table[name] = Task(name, train, test, reward, metric, scale, cfg, h.hexdigest()[:16])
    return table


def tasks_for(base: str | Path, prompt_dir: str | Path | None = None) -> dict:
    """The base picks the prompts: a toy base the toy TASKS, an SD3 base real_tasks(prompt_dir)."""
    return real_tasks(prompt_dir) if S.settings(base)["kind"] == "sd3" else TASKS


# ---------------------------------------------------------------------------------
# evaluation: the protocol, the score cache, the results tables (README, "Evaluation")
# ---------------------------------------------------------------------------------
# Per task, n images: prompt i = split[i % len] (a short list repeats with fresh noise), image i
# starts from the noise of seed EVAL_SEED + i in EVERY checkpoint (paired comparisons), 40-step
# first-order ODE, each checkpoint's own CFG and its base's shift, strict (0/1) GenEval.
# Two tables: the primary one on the `train` prompts - the prompts RL and distillation use: the
# toy is a closed world, like an RL environment, and at 3M parameters what RL learns on its
# prompts does not transfer to others (README, "Evaluation") - and a held-out one on `test`.
EVAL_SEED = 10_000
EVAL_STEPS = 40
SPLITS = ("train", "test")  # primary table, held-out table
HELDOUT_N = 64              # images per task in the held-out table (primary: 256)
REWARD_PACKAGES = ("numpy", "opencv-python", "rapidocr-onnxruntime", "onnxruntime", "pillow")


def eval_prompts(task: str, split: str, n: int, table: dict | None = None) -> list[str]:
    """The protocol's n prompts: prompt i = split[i % len(split)], so a short list repeats
    with fresh noise (image i always starts from seed EVAL_SEED + i). table: the base's task
    table (tasks_for; default the toy one)."""
    t = (table or TASKS)[task]
    ps = t.train if split == "train" else t.test
    if not ps:
        raise ValueError(f"task {task!r} has an empty {split} prompt set")
    return [ps[i % len(ps)] for i in range(n)]


def evaluate(policy, task: str, n: int = 256, guidance: float | None = None, batch: int = 0,
             split: str = "train", table: dict | None = None) -> np.ndarray:
    """Per-image scores of the policy's ACTIVE adapter on n prompts of `task`'s `split` (table:
    the base's task table, default tasks_for(the policy's base); batch 0: 64 toy, 8 SD3 images)."""
    from tqdm import tqdm
    g = policy.guidance if guidance is None else guidance
    table = table or tasks_for(policy.base_path)
    batch = batch or (8 if policy.vae is not None else 64)
    ps = eval_prompts(task, split, n, table)
    out = []
    for i in tqdm(range(0, n, batch), desc=f"eval {task} ({split})", leave=False, disable=n <= batch):
        imgs = S.sample(policy, ps[i:i + batch], [EVAL_SEED + k for k in range(i, min(i + batch, n))],
                        EVAL_STEPS, policy.shift, g, batch)
        out.append(table[task].reward(imgs, ps[i:i + batch], strict=True))
    return np.concatenate(out).astype(np.float64)


def _stable(v) -> str:
    """A repr that is the same in every process (no object addresses)."""
    if isinstance(v, np.ndarray):
        return f"ndarray{v.shape}{v.dtype}:" + hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
    if isinstance(v, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_stable(x) for x in v) + "]"
    if isinstance(v, (set, frozenset)):
        return "{" + ",".join(sorted(_stable(x) for x in v)) + "}"
    if isinstance(v, (int, float, str, bool, type(None))):
        return repr(v)
    return type(v).__name__


def _reads(fn, seen: set, out: list) -> None:
    """Append the source of fn, of every function of this project it calls (recursively), and
    the current value of every module-level constant they read (ours or toy.py's)."""
    fn = getattr(fn, "__wrapped__", fn)                        # functools.lru_cache
    if not isinstance(fn, types.FunctionType) or fn in seen:
        return
    seen.add(fn)
    out.append(inspect.getsource(fn))
    codes, names = [fn.__code__], set()
    while codes:                                              # nested code: lambdas, comprehensions
        c = codes.pop()
        names |= set(c.co_names)
        codes += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    ours = ("rewards", "toy", "sampler", "__main__")
    scopes = [fn.__globals__] + [vars(m) for m in fn.__globals__.values()
                                 if isinstance(m, types.ModuleType) and m.__name__ in ours]
    for name in sorted(names):
        for scope in scopes:
            if name not in scope or isinstance(scope[name], (types.ModuleType, type)):
                continue
            v = scope[name]
            if callable(v):
                if getattr(v, "__module__", None) in ours:
                    _reads(v, seen, out)
            else:
                out.append(f"{name}={_stable(v)}")


def reward_version(task: str, table: dict | None = None) -> str:
    """A version of a task's reward code: a hash of the scoring function's source, of every helper
    it calls, of the values of the constants they read, and of the reward packages' versions.
    Any edit to any of them - a patched threshold too - is a new version (a cache miss)."""
    from importlib.metadata import PackageNotFoundError, version
    out: list[str] = []
    _reads((table or TASKS)[task].reward, set(), out)
    for p in REWARD_PACKAGES:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            out.append(f"{p} missing")
    return hashlib.sha256("\n".join(out).encode()).hexdigest()[:16]


_HASHES: dict = {}


def weights_hash(path: str | Path) -> str:
    """The weights every component of a checkpoint uses: its adapter files (teacher / student)
    and every file of its base's model folders (transformer, text encoder(s), tokenizer(s), VAE);
    a hub id by name. Memoised on the files' sizes and modification times."""
    path = Path(path)
    meta = S.read_meta(path) if path.is_dir() else {}
    if (path / "adapter_config.json").is_file():               # teacher / student, opd.json or not
        files = [path / "adapter_config.json", path / "adapter_model.safetensors"]
        extra = weights_hash(S.resolve_base(path, meta)) if meta.get("base") else ""
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.parent != path
                       or f.name == "model_index.json")
        extra = ""
    else:
        return f"hub:{path}"
    stamp = (str(path.resolve()), extra, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _HASHES:
        h = hashlib.sha256(extra.encode())
        for f in files:
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                hashlib.file_digest(fh, lambda: h)
        _HASHES[stamp] = h.hexdigest()[:16]
    return _HASHES[stamp]


def protocol(task: str, split: str, n: int, cfg: float, shift: float, resolution, table: dict | None = None) -> dict:
    """Everything that changes a score of one (task, split) evaluation, except the weights."""
    ps = eval_prompts(task, split, n, table)
    proto = {"task": task, "split": split, "n": n, "prompts_sha": hashlib.sha256("\n".join(ps).encode()).hexdigest()[:16],
             "seed": EVAL_SEED, "steps": EVAL_STEPS, "shift": float(shift), "resolution": resolution,
             "cfg": float(cfg), "strict": True, "reward_version": reward_version(task, table)}
    if (table or TASKS)[task].source:                          # real scale: the prompt files (GenEval metadata)
        proto["prompt_files"] = (table or TASKS)[task].source
    return proto


def cache_key(proto: dict, weights: str) -> str:
    return hashlib.sha256(json.dumps([proto, weights], sort_keys=True).encode()).hexdigest()[:16]


def _cache_files(path: Path) -> tuple[Path, Path]:
    """(where cached scores are read first, where misses are written). A shipped checkpoint
    (base/, ckpts/) is never written by an evaluation: its misses go to runs/scores/."""
    if not path.is_dir():                                      # a hub id: runs/scores/hub__owner__name.json
        f = S.REPO / "runs" / "scores" / ("hub__" + str(path).replace("/", "__") + ".json")
        return f, f
    own = path / "scores.json"
    if not S.shipped(path):
        return own, own
    return own, S.REPO / "runs" / "scores" / (str(path.resolve().relative_to(S.REPO)).replace(os.sep, "__") + ".json")


def _load_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}                                              # a damaged cache is only a cache


def evaluate_checkpoint(path: str, n: int = 256, heldout_n: int = HELDOUT_N, tasks=toy.TASK_NAMES,
                        policy=None, export: bool = False, prompt_dir=None) -> dict[str, dict[str, np.ndarray]]:
    """Per-image scores {split: {task: (n,)}} of a checkpoint on both tables, from its cache
    where the key matches, else computed (policy: an already loaded one to use). export=True
    (rewards.py --export-scores) writes exactly these entries into the checkpoint's own
    scores.json (and their means into its opd.json), the one way scores enter base/ or ckpts/."""
    path = Path(path)
    st = S.settings(path)
    table = tasks_for(st["base"], prompt_dir)
    weights = weights_hash(path)
    res = _resolution(st["base"])
    read_f, write_f = _cache_files(path)
    cache = _load_json(read_f) | _load_json(write_f)
    out, used, dirty = {}, {}, False
    for split, k in zip(SPLITS, (n, heldout_n)):
        if k <= 0:
            continue
        out[split] = {}
        for task in tasks:
            proto = protocol(task, split, k, st["cfg"], st["shift"], res, table)
            key = cache_key(proto, weights)
            if key not in cache:
                if policy is None:
                    policy = S.Policy(str(path))
                sc = np.round(evaluate(policy, task, k, st["cfg"], split=split, table=table), 6)
                cache[key] = {"protocol": proto, "weights": weights, "mean": float(sc.mean()),
                              "scores": [float(x) for x in sc]}
                dirty = True
            out[split][task] = np.array(cache[key]["scores"], dtype=np.float64)
            used[key] = cache[key]
    if export:                                                 # the scores and opd.json's summary of them
        S.write_json_atomic(read_f, used)
        if "train" in out and (path / S.META).is_file():
            S.write_json_atomic(path / S.META, S.read_meta(path) | {"scores": {
                t: round(float(v.mean()), 4) for t, v in out["train"].items()} | {"n": n, "prompts": "train"}})
    elif dirty:
        try:
            write_f.parent.mkdir(parents=True, exist_ok=True)
            S.write_json_atomic(write_f, _load_json(write_f) | {k: v for k, v in cache.items() if k in used})
        except OSError:
            pass                                               # a read-only folder: the cache is only a cache
    return out


def _resolution(base: str):
    """The image size the protocol samples at (Policy.latent_shape's default): the toy's sample size;
    an SD3 folder's min(512, its own); a hub id: its name plus 512."""
    f, v = Path(base) / "transformer" / "config.json", Path(base) / "vae" / "config.json"
    if not f.is_file():
        return f"{base}@{S.SD3_RES}"
    own = json.loads(f.read_text()).get("sample_size")
    if not v.is_file():
        return own
    return min(S.SD3_RES, own * 2 ** (len(json.loads(v.read_text())["block_out_channels"]) - 1))


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b and its paired standard error (same prompts, same initial noise)."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def minmax_average(means: np.ndarray) -> np.ndarray:
    """The paper's Average (Table 1): means (..., rows, metrics) -> (..., rows), the mean over the
    metric columns of (score - column min) / (column max - column min) over the rows given; a column
    whose rows are all equal contributes 0 (no columns: 0)."""
    if 0 in means.shape[-2:]:
        return np.zeros(means.shape[:-1])
    lo, hi = means.min(-2, keepdims=True), means.max(-2, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (means - lo) / np.where(span > 0, span, 1.0), 0.0).mean(-1)


def average_difference(per_image: dict, names: list[str], a: str, b: str, split: str = "train",
                       draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Average(a) - Average(b) over the rows `names` and its paired bootstrap standard error.
    per_image {name: {split: {task: (n,)}}}. The rows share prompts and initial noise, so one draw
    resamples each task's images with the same indices for every row (tasks independently), then
    recomputes every row's means, the columns' min-max and the two Averages: the column ends move
    with the draw, as they would in a rerun."""
    cols = [t for t in toy.TASK_NAMES if all(t in per_image[k][split] for k in names)]
    ia, ib = names.index(a), names.index(b)
    rng = np.random.default_rng(seed)
    full, boot = [], []
    for c in cols:
        m = np.stack([np.asarray(per_image[k][split][c], dtype=np.float64) for k in names])   # (rows, n)
        full.append(m.mean(-1))
        idx = rng.integers(0, m.shape[1], size=(draws, m.shape[1]))
        boot.append(m[:, idx].mean(-1).T)                                                     # (draws, rows)
    point = minmax_average(np.stack(full, -1))
    dist = minmax_average(np.stack(boot, -1))
    return float(point[ia] - point[ib]), float(np.std(dist[:, ia] - dist[:, ib], ddof=1))


def results(rows: list[dict], proto: dict, per_image: dict | None = None) -> dict:
    """The results JSON. rows: {name, path, scores: {task: mean}, heldout: {task: mean}}; the
    paper's Average per table: the mean over the metric columns of (score - column min) /
    (column max - column min) over THESE rows; a column whose rows are all equal contributes 0.
    per_image {name: {split: {task: (n,)}}}: each row also gets its paired difference to the
    first row (the base) with its standard error, per task and table."""
    for table, split in (("scores", "train"), ("heldout", "test")):
        have = [r for r in rows if r.get(table)]
        cols = [t for t in toy.TASK_NAMES if have and all(t in r[table] for r in have)]
        avg = minmax_average(np.array([[r[table][c] for c in cols] for r in have]).reshape(len(have), len(cols)))
        for r, a in zip(have, avg):
            r["average" if table == "scores" else "average_heldout"] = float(a)
            if per_image and r is not rows[0] and split in per_image.get(r["name"], {}):
                ref, mine = per_image[rows[0]["name"]][split], per_image[r["name"]][split]
                r["vs_base" if table == "scores" else "vs_base_heldout"] = {
                    c: list(paired(mine[c], ref[c])) for c in cols if c in ref}
    return {"protocol": proto, "rows": rows}


def render_table(res: dict, table: str = "scores") -> str:
    """A results JSON's table ("scores": primary, "heldout"): each cell is the mean and, when the
    JSON has them, the paired difference to the first row (the base) +- its standard error."""
    rows = [r for r in res["rows"] if r.get(table)]
    cols = [t for t in toy.TASK_NAMES if rows and all(t in r[table] for r in rows)]
    vs = "vs_base" if table == "scores" else "vs_base_heldout"
    avg = "average" if table == "scores" else "average_heldout"
    head = ["Model"] + [res["protocol"].get("metrics", {}).get(c, TASKS[c].metric) for c in cols] + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"]]
        for c in cols:
            d = r.get(vs, {}).get(c)
            cells.append(f"{r[table][c]:.3f}" + (f" ({d[0]:+.3f} ± {d[1]:.3f})" if d else ""))
        lines.append("| " + " | ".join(cells + [f"{r[avg]:.3f}"]) + " |")
    return "\n".join(lines)


def render_results(res: dict) -> str:
    """Both tables with their captions, as the scripts print them and the README shows them."""
    p = res["protocol"]
    out = [f"Primary table: the tasks' train prompts (the prompts RL and distillation use), n = {p['n']} per task; "
           "(paired difference to the base +- SE)", "", render_table(res, "scores")]
    if any(r.get("heldout") for r in res["rows"]):
        out += ["", f"Generalisation to unseen prompts: the held-out test prompts, n = {p['heldout_n']} per task",
                "", render_table(res, "heldout")]
    return "\n".join(out)


def row_name(path: str) -> str:
    """A results row's name from a checkpoint's metadata: base, teacher <task>, student."""
    meta = S.read_meta(path) if Path(path).is_dir() else {}
    name = meta.get("role", "base") + (f" {meta['task']}" if meta.get("task") else "")
    if meta.get("task") in ("joint", "cascade"):                # multi-task RL: say which algorithm
        name += f" ({meta.get('trained', {}).get('algorithm', '?')})"
    if meta.get("role") == "student" and not meta.get("trained", {}).get("config", {}).get("balance", True):
        name += " (--no-balance)"
    return name


def main(argv=None):
    ap = S._Parser(description="Evaluate checkpoints with the protocol (README, 'Evaluation'): both "
                                             "tables, paired to the first checkpoint given.")
    ap.add_argument("ckpts", nargs="*", help="checkpoint folders (base/, ckpts/*, runs/.../checkpoint); the first is "
                                             "the reference of the paired differences")
    ap.add_argument("--n", type=S.checked(int, (">=", "1")), default=256, help="images per task, primary table (default: 256)")
    ap.add_argument("--heldout-n", type=S.checked(int, (">=", "0")), default=HELDOUT_N,
                    help=f"images per task, held-out table; 0 skips it (default: {HELDOUT_N})")
    ap.add_argument("--json", default="", help="also write the results JSON to this file (default: none)")
    ap.add_argument("--export-scores", action="store_true",
                    help="write these per-image scores into each checkpoint's own scores.json - the one way "
                         "scores enter base/ or ckpts/ (default: off; misses of shipped checkpoints go to runs/scores/)")
    ap.add_argument("--prompt-dir", default="", help="SD3 bases: the prompt folder (README, 'Real scale'; "
                                                     "default: the example set in prompts/)")
    ap.add_argument("--geneval-prompts", default="", metavar="DIR",
                    help="instead of evaluating: write DIR/geneval/train_metadata.jsonl from GenEval's templates "
                         "(default: off)")
    ap.add_argument("--count", type=S.checked(int, (">=", "1")), default=5000,
                    help="--geneval-prompts: how many prompts (default: 5000)")
    ap.add_argument("--exclude", nargs="*", default=[], help="--geneval-prompts: GenEval metadata files whose "
                                                             "prompts are left out, e.g. a test set (default: none)")
    ap.add_argument("--seed", type=int, default=0, help="--geneval-prompts: the draw's seed (default: 0)")
    args = ap.parse_args(argv)
    rows, per = [], {}
    try:
        if args.geneval_prompts:
            print(f"wrote {write_geneval_prompts(args.geneval_prompts, args.count, args.seed, tuple(args.exclude))}")
            return
        if not args.ckpts:
            raise S.CheckpointError("no checkpoints given; pass folders to evaluate (or --geneval-prompts DIR)")
        for c in args.ckpts:
            if not Path(c).is_dir() and (c.startswith((".", "/")) or c.count("/") != 1):
                raise S.CheckpointError(f"{c}: no such checkpoint folder (and not a hub id like owner/name)")
            name = row_name(c)
            while name in per:
                name += "'"
            per[name] = evaluate_checkpoint(c, args.n, args.heldout_n, export=args.export_scores,
                                            prompt_dir=args.prompt_dir or None)
            rows.append({"name": name, "path": c, "scores": {k: float(v.mean()) for k, v in per[name]["train"].items()},
                         "heldout": {k: float(v.mean()) for k, v in per[name].get("test", {}).items()}})
    except S.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    table = tasks_for(S.settings(args.ckpts[0])["base"], args.prompt_dir or None)
    res = results(rows, {"n": args.n, "heldout_n": args.heldout_n, "seed": EVAL_SEED, "steps": EVAL_STEPS,
                         "sampler": "ODE (a = 0)", "metrics": {t: v.metric for t, v in table.items()}}, per)
    print(render_results(res))
    if args.json:
        S.write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
