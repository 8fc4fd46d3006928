"""The toy world: three tasks that mirror the paper's, and a renderer of ground truth.

DiffusionOPD (Sec. 4, Table 1) distils three specialist teachers - GenEval (composition), OCR
(text rendering) and aesthetics (human preference) - into one student. This file is the
laptop-sized stand-in for that world:

  * `geneval`  - coloured squares and triangles on a plain background, in GenEval's categories:
                 single object, colours, counting, two objects / colour attribution, position
                 ("a red square left of a blue triangle", also right of / above / below).
  * `ocr`      - a light sign with two dark glyphs: `a sign that says "K5"` (as Flow-GRPO's OCR prompts).
  * `aesthetic`- open scene prompts ("a misty forest at dawn"), coloured by the prompt's words.

`render(prompt, rng)` draws a ground-truth 32x32 image for ANY prompt of the three tasks: the
pretraining data of the tiny base (bottom of this file). `prompts(task, split)` gives fixed train /
held-out sets, the held-out ones of combinations never seen in training; `parse(prompt)` gives the
spec rewards.py checks. Why 32 px, fixed object slots, squares and triangles, four far-apart hues
and these 12 glyphs: docs/experiments.md, "Why the toy world looks the way it does".

    python toy.py                  # pretrain: 14.6 min on 2 cores -> runs/toy/checkpoint
    python toy.py --export base    # ship the finished run's checkpoint to base/
    python evaluate.py runs/toy/checkpoint      # its scores, both tables

Deliberate deviations from the paper:
  1. Tiny synthetic pictures, not 512 px photographs: two shapes in four colours, two-glyph strings.
  2. GenEval's single-object category has two prompts here ("a square", "a triangle"), in training.
  3. A closed vocabulary (40 lower-case words, 12 glyphs, the double quote), so a character-level
     tokenizer can spell held-out strings.
  4. The GenEval test set (70 prompts, 48 of them position; parse(p)["category"]) leans on position
     far more than GenEval's (18%): holding out whole object pairings takes all their relations.
  5. Caption noise: 45% of geneval captions in pretraining are confusable(prompt), as noisy web
     captions; without it the base scored GenEval 0.99, leaving RL nothing to fix.
  6. Time sampling: half uniform, half SD3's logit-normal (pretrain()).
"""
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import runs
from runs import arg
import sampler as S

RES = 32                                    # image side in pixels (H = W = RES)
TASK_NAMES = ("geneval", "ocr", "aesthetic")
SPLIT_SEED = 1234                           # the train / test split and the prompt order

# ---------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------
# geneval: plain saturated colours with hues about 50-130 degrees apart (red 0, yellow
# ~50, green ~130, blue ~225), so rewards.py can classify a pixel by its hue alone.
COLORS = {"red": (220, 40, 40), "yellow": (235, 200, 30),
          "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")   # GenEval's four relations
# ocr: upper-case letters and digits that PP-OCR reads well at font size 16 (see top)
GLYPHS = "ABGHKMPRX245"
OCR_TEMPLATE = 'a sign that says "{}"'
# aesthetic: "a {mood} {place} at {time}" -> 6 x 7 x 5 = 210 scenes
MOODS = ("calm", "misty", "stormy", "bright", "golden", "gloomy")
PLACES = ("sea", "lake", "forest", "desert", "hill", "field", "mountain")
TIMES = ("dawn", "noon", "sunset", "dusk", "night")

# Canonical slots (centre x, centre y, size) in pixels. Everything the model must draw
# sits in one of these; render() only jitters them by up to 1 px.
SLOTS = {
    "centre": [(16, 16, 14)],
    "pair_h": [(8, 16, 11), (24, 16, 11)],                         # left, right
    "pair_v": [(16, 8, 11), (16, 24, 11)],                         # top, bottom
    3: [(8, 8, 10), (24, 8, 10), (16, 24, 10)],                   # 16 px apart: even with
    4: [(8, 8, 10), (24, 8, 10), (8, 24, 10), (24, 24, 10)],      # jitter, gaps >= 3 px
}
SUPERSAMPLE = 4                             # shapes are drawn at 4x, then box-filtered


# ---------------------------------------------------------------------------------
# parsing: prompt -> structured spec (used by render() and by rewards.py)
# ---------------------------------------------------------------------------------
def _parse_object(words):
    """["two", "red", "squares"] -> {"shape", "color" (or None), "count"}."""
    count_of = {w: n for n, w in COUNT_WORDS.items()}
    if not words or words[0] not in count_of:
        raise ValueError(f"object phrase must start with a count word: {words}")
    count, rest = count_of[words[0]], words[1:]
    color = rest[0] if len(rest) == 2 and rest[0] in COLORS else None
    shape = rest[-1][:-1] if count > 1 else rest[-1]          # "squares" -> "square"
    if shape not in SHAPES or len(rest) != (1 if color is None else 2) \
            or (count > 1) != rest[-1].endswith("s"):
        raise ValueError(f"not an object phrase: {' '.join(words)}")
    return {"shape": shape, "color": color, "count": count}


@functools.lru_cache(maxsize=None)
def parse(prompt: str) -> dict:
    """Prompt -> spec dict. Raises ValueError for prompts outside the toy grammar.

    geneval:   {"task", "category", "objects": [obj, ...], "relation": None | str}
               category in single / colors / counting / two_object / position;
               "A left of B" means objects[0] is left of objects[1].
    ocr:       {"task", "text"}             (the first quoted span, as in Sec. 9)
    aesthetic: {"task", "mood", "place", "time"}
    """
    if '"' in prompt:
        text = prompt.split('"')[1]
        if prompt != OCR_TEMPLATE.format(text) or not text or set(text) - set(GLYPHS):
            raise ValueError(f"not an ocr prompt: {prompt!r}")
        return {"task": "ocr", "text": text}
    w = prompt.split()
    if len(w) == 5 and w[0] == "a" and w[1] in MOODS and w[2] in PLACES and w[3] == "at" \
            and w[4] in TIMES:
        return {"task": "aesthetic", "mood": w[1], "place": w[2], "time": w[4]}
    # geneval: OBJ | OBJ and OBJ | OBJ REL OBJ
    for rel in ("and",) + RELATIONS:
        rw = rel.split()
        for i in range(1, len(w) - len(rw)):
            if w[i:i + len(rw)] == rw:
                a, b = _parse_object(w[:i]), _parse_object(w[i + len(rw):])
                if a["count"] != 1 or b["count"] != 1 or a == b:
                    raise ValueError(f"two-object prompts need two distinct single objects: {prompt!r}")
                return {"task": "geneval", "category": "two_object" if rel == "and" else "position",
                        "objects": [a, b], "relation": None if rel == "and" else rel}
    o = _parse_object(w)
    cat = "counting" if o["count"] > 1 else ("colors" if o["color"] else "single")
    return {"task": "geneval", "category": cat, "objects": [o], "relation": None}


def _obj_phrase(color, shape, count=1):
    return " ".join([COUNT_WORDS[count]] + ([color] if color else []) + [shape + ("s" if count > 1 else "")])


# ---------------------------------------------------------------------------------
# prompt sets: fixed, disjoint, held-out combinations in test
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _splits(task):
    """(train, test) tuples of prompts, each shuffled once with a fixed seed so that any
    prefix mixes the categories (the evaluation draws prompts in list order)."""
    rng = np.random.default_rng([SPLIT_SEED, TASK_NAMES.index(task)])
    train, test = [], []
    if task == "geneval":
        objs = [(c, s) for s in SHAPES for c in COLORS]                    # 8 objects
        train += [_obj_phrase(None, s) for s in SHAPES]                    # single: train only
        # colours: hold out one colour per shape (2 of 8)
        for s in SHAPES:
            held = rng.choice(list(COLORS))
            for c in COLORS:
                (test if c == held else train).append(_obj_phrase(c, s))
        # counting: hold out 8 of the 24 (count, colour, shape) triples
        triples = [(n, c, s) for n in (2, 3, 4) for c, s in objs]
        held = set(rng.choice(len(triples), 8, replace=False).tolist())
        for i, (n, c, s) in enumerate(triples):
            (test if i in held else train).append(_obj_phrase(c, s, n))
        # two objects and position: hold out 6 of the 28 unordered object PAIRS
        # entirely, so each test scene shows two objects never drawn together. Both
        # orders and all four relations go with the pair: "A left of B" and "B right
        # of A" are the same picture and must never straddle the split.
        pairs = list(itertools.combinations(objs, 2))
        held = set(rng.choice(len(pairs), 6, replace=False).tolist())
        for i, (p, q) in enumerate(pairs):
            dest = test if i in held else train
            for x, y in ((p, q), (q, p)):
                dest.append(f"{_obj_phrase(*x)} and {_obj_phrase(*y)}")
                dest += [f"{_obj_phrase(*x)} {r} {_obj_phrase(*y)}" for r in RELATIONS]
    elif task == "ocr":
        # 144 strings -> 80 train / 64 test; redraw until every glyph appears at both
        # positions at least 4 times in training (the model must learn each glyph in
        # each slot; the held-out strings are new COMBINATIONS of known glyphs)
        strings = ["".join(p) for p in itertools.product(GLYPHS, repeat=2)]
        while True:
            held = set(rng.choice(len(strings), 64, replace=False).tolist())
            tr = [s for i, s in enumerate(strings) if i not in held]
            if all(sum(s[k] == g for s in tr) >= 4 for g in GLYPHS for k in (0, 1)):
                break
        for i, s in enumerate(strings):
            (test if i in held else train).append(OCR_TEMPLATE.format(s))
    elif task == "aesthetic":
        # 210 scenes -> 146 train / 64 test (new mood x place x time combinations)
        scenes = [f"a {m} {p} at {t}" for m in MOODS for p in PLACES for t in TIMES]
        held = set(rng.choice(len(scenes), 64, replace=False).tolist())
        for i, s in enumerate(scenes):
            (test if i in held else train).append(s)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    order = np.random.default_rng([SPLIT_SEED, 99])
    return (tuple(train[i] for i in order.permutation(len(train))),
            tuple(test[i] for i in order.permutation(len(test))))


def prompts(task: str, split: str) -> list[str]:
    """The fixed prompt list of `task` ("geneval" | "ocr" | "aesthetic") for `split`
    ("train" | "test"). Same list, same order, every call."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return list(_splits(task)[0 if split == "train" else 1])


# ---------------------------------------------------------------------------------
# rendering: ground truth for any prompt (the pretraining data)
# ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _font():
    return ImageFont.load_default(size=16)  # Pillow's embedded font: no font files needed


def _jit(rng, rgb, amount):
    """An RGB triple with each channel moved by up to +-amount."""
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _draw_shape(draw, shape, cx, cy, size, fill):
    """Square or up-pointing triangle in the size x size box at (cx, cy), supersampled pixels."""
    h = size / 2
    if shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


def _render_geneval(spec, rng):
    bg = _jit(rng, (int(rng.integers(185, 226)),) * 3, 6)         # light grey background
    k = SUPERSAMPLE
    im = Image.new("RGB", (RES * k, RES * k), bg)
    draw = ImageDraw.Draw(im)
    objs = spec["objects"]
    if spec["category"] in ("two_object", "position"):
        rel = spec["relation"] or "left of"                       # "A and B": A left, B right
        slots = SLOTS["pair_h" if rel in ("left of", "right of") else "pair_v"]
        if rel in ("right of", "below"):
            slots = slots[::-1]                                   # A takes the 2nd slot
        items = [(objs[0], slots[0]), (objs[1], slots[1])]
    else:
        o = objs[0]
        slots = SLOTS[{1: "centre", 2: "pair_h"}.get(o["count"], o["count"])]
        items = [(o, sl) for sl in slots]
    color_any = rng.choice(list(COLORS))                          # "a square": any colour
    for o, (cx, cy, size) in items:
        fill = _jit(rng, COLORS[o["color"] or color_any], 12)
        cx, cy = cx + rng.uniform(-1, 1), cy + rng.uniform(-1, 1)  # +-1 px jitter
        size = size + rng.uniform(-1, 1)
        _draw_shape(draw, o["shape"], cx * k, cy * k, size * k, fill)
    return im.reduce(k)                                            # box filter: soft edges


def _render_ocr(spec, rng):
    im = Image.new("RGB", (RES, RES), _jit(rng, (90, 110, 140), 15))   # wall
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 5, RES - 1, RES - 6], fill=_jit(rng, (240, 235, 220), 8))  # the sign
    dx, dy = rng.integers(-1, 2, size=2)
    draw.text((RES // 2 + dx, RES // 2 + dy), spec["text"], fill=_jit(rng, (20, 20, 30), 10),
              font=_font(), anchor="mm")                          # "mm": centred on (x, y)
    return im


# aesthetic scenes: (sky top, sky at horizon, disc colour, disc (x, y, radius) or None)
SKIES = {
    "dawn":   ((70, 90, 170), (250, 170, 130), (255, 225, 160), (10, 15, 4)),
    "noon":   ((50, 130, 230), (160, 205, 245), (255, 250, 215), (22, 6, 3)),
    "sunset": ((110, 50, 130), (250, 120, 50), (255, 200, 80), (16, 17, 5)),
    "dusk":   ((35, 35, 95), (190, 100, 125), (240, 170, 150), (24, 16, 3)),
    "night":  ((10, 15, 40), (40, 55, 95), (235, 235, 215), (22, 7, 3)),
}
GROUNDS = {  # (colour at horizon, colour at bottom)
    "sea": ((40, 90, 150), (20, 40, 90)), "lake": ((70, 120, 150), (40, 80, 100)),
    "forest": ((30, 90, 40), (15, 50, 25)), "desert": ((225, 185, 115), (190, 140, 80)),
    "hill": ((90, 150, 60), (50, 110, 40)), "field": ((170, 180, 70), (110, 140, 50)),
    "mountain": ((90, 110, 80), (60, 80, 60)),
}


def _mood(img, mood, rng):
    """Colour grading by mood on a float (H, W, 3) image in [0, 255]."""
    grey = img.mean(-1, keepdims=True)
    if mood == "misty":                     # towards light grey: low contrast, pale
        img = 0.55 * img + 0.45 * 200
    elif mood == "stormy":                  # dark and desaturated
        img = 0.6 * (0.5 * img + 0.5 * grey)
    elif mood == "bright":                  # more saturated and lighter
        img = grey + 1.35 * (img - grey) + 20
    elif mood == "golden":                  # warm cast
        img = img * np.array([1.15, 1.0, 0.7]) + np.array([20, 10, 0])
    elif mood == "gloomy":                  # dim, cold, grey
        img = (0.7 * img + 0.3 * grey) * 0.75 + np.array([0, 5, 15])
    return np.clip(img, 0, 255)


def _render_aesthetic(spec, rng):
    top, hor, disc, sun = SKIES[spec["time"]]
    g_hor, g_bot = GROUNDS[spec["place"]]
    y0 = 18 + int(rng.integers(-1, 2))                            # horizon row
    t = np.linspace(0, 1, y0)[:, None, None]
    sky = (1 - t) * np.array(_jit(rng, top, 8)) + t * np.array(_jit(rng, hor, 8))
    t = np.linspace(0, 1, RES - y0)[:, None, None]
    ground = (1 - t) * np.array(_jit(rng, g_hor, 8)) + t * np.array(_jit(rng, g_bot, 8))
    img = np.concatenate([np.broadcast_to(sky, (y0, RES, 3)),
                          np.broadcast_to(ground, (RES - y0, RES, 3))]).astype(np.uint8)
    k = SUPERSAMPLE
    im = Image.fromarray(img).resize((RES * k, RES * k), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    sx, sy, r = sun
    sx, sy = sx + rng.uniform(-1, 1), sy + rng.uniform(-1, 1)
    draw.ellipse([(sx - r) * k, (sy - r) * k, (sx + r) * k, (sy + r) * k], fill=disc)
    if spec["time"] == "night":                                    # a few stars
        for x, y in ((4, 3), (9, 8), (14, 2), (28, 12), (5, 12)):
            draw.rectangle([x * k, y * k, x * k + k - 1, y * k + k - 1], fill=(230, 230, 200))
    horizon_y = y0 * k
    # paste the ground back over the disc: a low sun sets behind the horizon
    im.paste(Image.fromarray(img[y0:]).resize((RES * k, (RES - y0) * k), Image.NEAREST), (0, horizon_y))
    dark = tuple(int(c * 0.6) for c in g_hor)
    if spec["place"] == "forest":                                  # a row of fir trees
        for x in range(2, RES, 6):
            _draw_shape(draw, "triangle", x * k, (y0 - 3) * k, 7 * k, dark)
    elif spec["place"] == "mountain":                             # two grey peaks
        for x, w in ((9, 18), (22, 14)):
            draw.polygon([(x * k, (y0 - w * 0.6) * k), ((x + w / 2) * k, horizon_y),
                          ((x - w / 2) * k, horizon_y)], fill=(120, 120, 130))
    elif spec["place"] == "hill":                                 # two round hills
        for x, w in ((8, 20), (25, 16)):
            draw.ellipse([(x - w / 2) * k, (y0 - 4) * k, (x + w / 2) * k, (y0 + 4) * k], fill=dark)
    elif spec["place"] == "desert":                                # a dune
        draw.ellipse([10 * k, (y0 - 2) * k, 34 * k, (y0 + 5) * k], fill=_jit(rng, (210, 165, 95), 5))
    img = np.asarray(im.reduce(k), dtype=np.float64)
    return Image.fromarray(_mood(img, spec["mood"], rng).round().astype(np.uint8))


def confusable(prompt: str, rng: np.random.Generator) -> str:
    """A geneval caption that is WRONG in one plausible way, for caption noise in pretraining:
    position -> the opposite relation, two objects -> colours swapped between them (attribute
    binding), counting -> one more or one fewer, colour -> another colour. Other prompts are
    returned unchanged. Plays the part of noisy web captions: the base learns to follow
    prompts only most of the time, as SD3.5-M does (GenEval 0.63), and RL has room to fix it."""
    spec = parse(prompt)
    if spec["task"] != "geneval":
        return prompt
    objs = spec["objects"]
    if spec["category"] == "position":
        a, b = (_obj_phrase(o["color"], o["shape"]) for o in objs)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return f"{a} {opposite[spec['relation']]} {b}"
    if spec["category"] == "two_object" and objs[0]["color"] != objs[1]["color"]:
        return f"{_obj_phrase(objs[1]['color'], objs[0]['shape'])} and {_obj_phrase(objs[0]['color'], objs[1]['shape'])}"
    if spec["category"] == "counting":
        n = objs[0]["count"]
        return _obj_phrase(objs[0]["color"], objs[0]["shape"], int(rng.choice([k for k in (n - 1, n + 1) if 2 <= k <= 4])))
    if spec["category"] == "colors":
        return _obj_phrase(str(rng.choice([c for c in COLORS if c != objs[0]["color"]])), objs[0]["shape"])
    return prompt


def render(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """Ground truth for any toy prompt: uint8 (RES, RES, 3), canonical layout, +-1 px / colour jitter."""
    spec = parse(prompt)
    draw = {"geneval": _render_geneval, "ocr": _render_ocr, "aesthetic": _render_aesthetic}
    return np.asarray(draw[spec["task"]](spec, rng), dtype=np.uint8)


# ---- the tiny base model and its pretraining ---------------------------------------
# The base plays SD3.5-Medium's part: a diffusers SD3Transformer2DModel (the same class, MMDiT
# joint attention, adaLN) in PIXEL space (in_channels 3, no VAE), conditioned by a tiny
# transformers CLIPTextModelWithProjection (sequence -> joint attention, pooled -> adaLN);
# standard classes in standard folders, so sampler.Policy loads the base without this file.
# Tokenizer: lower-case runs are word tokens, every other character (glyph, digit, quote) is
# a token of its own, so a held-out OCR string is still a sequence of known tokens.
# Chosen (measured with throwaway probes on 2 cores): patch 4, width 128, 5 blocks (2.9M parameters), zero-
# initialised output and adaLN modulation (each block starts as the identity, as in DiT),
# lr 2e-3 and an EMA of the weights (what gets saved), captions dropped 10% for CFG.
SPECIALS = ["<pad>", "<bos>", "<unk>", "<eos>"]   # eos id 3: CLIP's pooled output takes the first eos
MAX_TOKENS = 24


def build_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Split(Regex(r"[a-z]+|[^a-z]"), behavior="isolated")])
    words = set()
    for t in texts:
        words.update(p for p, _ in pre.pre_tokenize_str(t))
    glyphs = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\"")
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words | glyphs))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=MAX_TOKENS, padding_side="right")


def build_base(tokenizer, width: int = 128, layers: int = 5, text_width: int = 128, seed: int = 0):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    heads = 4
    tr = SD3Transformer2DModel(sample_size=RES, patch_size=4, in_channels=3, out_channels=3, num_layers=layers,
                               attention_head_dim=width // heads, num_attention_heads=heads,
                               joint_attention_dim=text_width, caption_projection_dim=width,
                               pooled_projection_dim=text_width, pos_embed_max_size=RES // 4)
    # adaLN-Zero: zero the modulation of every block and the output layer -> identity at init
    for name, mod in tr.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
            torch.nn.init.zeros_(mod.weight); torch.nn.init.zeros_(mod.bias)
    te = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=text_width,
        pad_token_id=0, bos_token_id=1, eos_token_id=3))
    return tr, te


@dataclasses.dataclass
class PretrainConfig:
    out: str = arg("runs/toy", "run folder (config, log, resume state, checkpoint/); re-running resumes it")
    steps: int = arg(2800, "optimizer steps (~15 min on 2 cores at batch 64)", ">= 1")
    batch: int = arg(64, "images per step", ">= 1")
    lr: float = arg(2e-3, "AdamW learning rate (constant after a 100-step warm-up)", "> 0")
    ema: float = arg(0.998, "EMA decay of the saved weights", ">= 0")
    drop_caption: float = arg(0.1, "probability of training on the empty prompt (enables CFG)", ">= 0")
    caption_noise: float = arg(0.45, "probability that a geneval caption is confusable(prompt)", ">= 0")
    mix: str = arg("0.35,0.45,0.2", "sampling weights of geneval, ocr, aesthetic prompts")
    cfg: float = arg(3.0, "the base's CFG scale, recorded in its metadata", ">= 0")
    width: int = arg(128, "transformer width (heads x head_dim)", ">= 4")
    layers: int = arg(5, "transformer blocks", ">= 1")
    seed: int = arg(0, "seeds model init, data and noise")
    save_every: int = arg(400, "resume state every N steps", ">= 1")
    fresh: bool = arg(False, "delete --out (a toy run folder only) and start over")
    export: str = arg("", "copy the finished run's checkpoint/ to this folder (e.g. base)")


def pretrain(cfg: PretrainConfig) -> Path:
    from tqdm import tqdm
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if runs.open_run(out, dataclasses.asdict(cfg), cfg.fresh, "toy") and (ckpt / runs.META).is_file():
        print(f"{out} is finished, with this config: {ckpt} (--fresh starts over)")
        return ckpt
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    all_prompts = {t: prompts(t, "train") for t in TASK_NAMES}
    tok = build_tokenizer([p for t in TASK_NAMES for s in ("train", "test") for p in prompts(t, s)])
    tr, te = build_base(tok, cfg.width, cfg.layers, seed=cfg.seed)
    params = list(tr.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    start = 0
    if (out / "state.json").is_file():                         # resume
        start = runs.load_state(out / "state", {"params": params, "ema": ema}, opt)["step"]
        print(f"resuming {out} at step {start}")
    mix = np.array([float(w) for w in cfg.mix.split(",")]); mix /= mix.sum()
    print(f"base: {sum(p.numel() for p in tr.parameters()) / 1e6:.2f}M transformer + "
          f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f}M text encoder params, {cfg.steps} steps x {cfg.batch}")
    log = open(out / "log.jsonl", "a")
    t0 = time.time()
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain"):
        rng = np.random.default_rng([cfg.seed, step])          # data depends on (seed, step) only: exact resume
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        tasks = rng.choice(len(TASK_NAMES), size=cfg.batch, p=mix)
        ps = [all_prompts[TASK_NAMES[k]][rng.integers(len(all_prompts[TASK_NAMES[k]]))] for k in tasks]
        imgs = np.stack([render(p, rng) for p in ps])
        x_data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0     # (B, 3, H, W) in [-1, 1]
        # captions: wrong in a plausible way some of the time (geneval), empty 10% of the time (CFG)
        ps = [confusable(p, rng) if u < cfg.caption_noise else p for p, u in zip(ps, rng.random(cfg.batch))]
        ps = [("" if u < cfg.drop_caption else p) for p, u in zip(ps, rng.random(cfg.batch))]
        eps = torch.randn(x_data.shape, generator=gen)
        # times: half uniform, half SD3's logit-normal. Uniform alone (v1): OCR 0.07; logit-normal alone
        # (v2): ragged shapes, GenEval 0.14 - in pixel space layout (t ~ 1) and edges (t ~ 0) matter.
        t = torch.where(torch.rand(cfg.batch, generator=gen) < 0.5, torch.rand(cfg.batch, generator=gen),
                        torch.sigmoid(torch.randn(cfg.batch, generator=gen)))
        x_t = S.noised(x_data, eps, t)                         # Sec. 2: x_t
        ids = tok(ps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        enc = te(input_ids=ids)
        v = tr(hidden_states=x_t, encoder_hidden_states=enc.last_hidden_state, pooled_projections=enc.text_embeds,
               timestep=t * 1000.0, return_dict=False)[0]
        loss = (v - (eps - x_data)).pow(2).mean()              # flow matching: v target = eps - x_data
        opt.param_groups[0]["lr"] = cfg.lr * min(1.0, (step + 1) / 100)      # 100-step warm-up
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - cfg.ema)
        if step % 20 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 5), "time_s": round(time.time() - t0, 1)}), file=log, flush=True)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            runs.save_state(out / "state", {"params": params, "ema": ema}, opt, {"step": step + 1})
    # ---- export the EMA weights as a checkpoint of the contract (docs/formats.md, "Checkpoints") ----
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    tmp = out / "checkpoint.tmp"
    tr.to(torch.float16).save_pretrained(tmp / "transformer", safe_serialization=True)   # fp16 on disk: 6 MB
    te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tok.save_pretrained(tmp / "tokenizer")
    runs.write_json_atomic(tmp / runs.META, {"role": "base", "task": None, "cfg": cfg.cfg, "shift": 1.0,
                                       "trained": {"algorithm": "flow matching pretraining (toy.py)",
                                                   "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                              if k not in ("out", "export", "fresh")},
                                                   "minutes": round((time.time() - t0) / 60, 2)}})
    os.replace(tmp, ckpt)
    print(f"pretrained in {(time.time() - t0) / 60:.1f} min -> {ckpt}")
    return ckpt


def main(argv=None):
    ap = runs.config_parser(PretrainConfig, "Pretrain the toy base by flow matching (~15 min on 2 cores). "
                                         "Score it with: python evaluate.py runs/toy/checkpoint")
    cfg = PretrainConfig(**vars(ap.parse_args(argv)))
    try:
        ckpt = pretrain(cfg)
        if cfg.export:
            runs.export_checkpoint(ckpt, cfg.export)
            print(f"exported {ckpt} -> {cfg.export}")
    except runs.CheckpointError as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)


if __name__ == "__main__":
    main()
