"""real_rewards.py - the paper's rewards at real scale (Sec. 9) and the prompt folders; a toy reader may skip it.

At real scale (an SD3 base; README, "Real scale") the three task names of rewards.TASKS take their
prompts from a prompt folder (read_prompts; the example set prompts/, or write_geneval_prompts'
output) and the paper's Sec. 9 rewards, in this process: GenEval's rules on Mask2Former detections
with a CLIP colour classifier (GenEvalScorer), PP-OCR with detection as Flow-GRPO runs it (ocr_real_reward),
PickScore for the aesthetic task. tasks_for(base) picks the task table: a toy base rewards.TASKS,
an SD3 base real_tasks(prompt_dir).
"""
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

import runs
from rewards import POS_MARGIN, SPLITS, TASKS, Task, _check, ocr_score, ocr_target, relations


# ---------------------------------------------------------------------------------
# real-scale rewards (SD3.5-M, 512 px): GenEval, PickScore, ClipScore, in process (Sec. 9)
# ---------------------------------------------------------------------------------
# The paper scores SD3.5-Medium samples with (Sec. 9): GenEval = a Mask2Former (Swin-S, COCO
# instance) detector + a CLIP ViT-L/14 colour classifier applying GenEval's per-prompt rules;
# OCR = PP-OCR with the Levenshtein score (ocr_real_reward); PickScore; ClipScore. Everything here
# runs in this process on transformers models (no reward servers, no mmcv/mmdet, no Paddle),
# loaded lazily from the hub cache or a local folder: a model that is not there is one line,
# runs.CheckpointError, naming the download command. Deviations from GenEval's own code
# (djghosh13/geneval, evaluation/evaluate_images.py):
#   1. the detector is transformers' port of Mask2Former Swin-S COCO-instance (the Detectron2
#      weights), not mmdet's; its output goes through mmdet's instance post-processing
#      (mask2former_detections) at mmdet's test scale (shortest edge 800), but the weights differ.
#   2. square images are assumed (SD3.5-M samples at 512 x 512): the mask logits then cover the
#      whole image, and one bilinear resize to (H, W) stands in for mmdet's two (to the padded
#      input, then to the original size).
#   3. strict=True is GenEval's 0/1 (evaluation); strict=False is the Stage 1 RL reward as
#      Flow-GRPO's reward server computes it: each requested count scores 1 - |n - found| / n
#      over ALL of the class's detections (exact counts), no exclude rules (geneval_rules).

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
    class has >= count detections (counting prompts: n + 1, so exactly n).
    strict=False (Stage 1's RL reward, Flow-GRPO's): the mean of the rule terms, where presence
    is 1 - min(|n - found|, n) / n with found = ALL the class's kept detections (so too many
    objects cost too), and exclude rules are left out."""
    thr = GENEVAL_COUNT_THRESHOLD if meta["tag"] == "counting" else GENEVAL_THRESHOLD
    by_class = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        found = by_class.setdefault(d["class"], [])
        if d["score"] > thr and len(found) < GENEVAL_MAX_OBJECTS:
            found.append(d)
    conds, groups = [], []
    for req in meta.get("include", []):
        n, every = req["count"], by_class.get(req["class"], [])
        found = every[:n]
        ok = len(found) == n
        conds.append(ok if strict else 1.0 - min(abs(n - len(every)), n) / n)
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
    for req in meta.get("exclude", []) if strict else []:
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
    folder -> one line of runs.CheckpointError naming the download command (failures not cached)."""
    try:
        return _load(cls, model_id)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise runs.CheckpointError(f"{model_id}: the {what} model is not available ({reason}); "
                                   + runs.download_hint(model_id)) from None


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
    """GenEval at real scale: 0/1 per image (strict), else Flow-GRPO's RL score (geneval_rules)."""
    return _scorer(GenEvalScorer)(images, metas, strict)


@functools.cache
def _ocr_engine():
    from rapidocr_onnxruntime import RapidOCR                   # PP-OCR's models inside the wheel
    return RapidOCR()


def ocr_real_reward(images, prompts, strict=True):
    """OCR at real scale (Sec. 9's score, rewards.ocr_score) on PP-OCR set as Flow-GRPO calls
    PaddleOCR(use_angle_cls=False, lang="en"): text detection + recognition, no angle classifier
    (use_cls=False) and every read kept (text_score 0: rapidocr's default drops reads under 0.5
    confidence), the reads joined. strict is unused: the score is the metric. The wheel ships
    PP-OCRv4's Chinese + English recogniser, not PaddleOCR's English one (docs/real_scale.md)."""
    _check(images, prompts)
    engine, out = _ocr_engine(), []
    for im, p in zip(images, prompts):
        res = engine(np.ascontiguousarray(im[..., ::-1]), use_cls=False, text_score=0.0)[0]   # BGR, as cv2
        out.append(ocr_score("".join(r[1] for r in res) if res else "", ocr_target(p)))
    return np.array(out, dtype=np.float64)


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
PROMPT_DIR = runs.REPO / "prompts"
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
        raise runs.CheckpointError(f"{f}: no such prompt file; a prompt folder holds geneval/{split}_metadata.jsonl, "
                                f"ocr/{split}.txt and pickscore/{split}.txt (README, 'Real scale')")
    return read_prompt_file(f, task)


def read_prompt_file(f: Path, task: str) -> tuple[list[str], dict]:
    """Blank lines are skipped; any other line that cannot be used (OCR without a quoted target,
    GenEval metadata that is not valid) is an error naming the file and line, as is a file with
    no usable line. Errors are runs.CheckpointError (one line, exit 2 in the scripts)."""
    prompts, specs = [], {}
    for ln, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if task == "geneval":
            try:
                m = json.loads(line)
            except json.JSONDecodeError as e:
                raise runs.CheckpointError(f"{f}:{ln}: not a JSON object ({e.msg}); one GenEval metadata record per line")
            if why := _geneval_meta_ok(m):
                raise runs.CheckpointError(f"{f}:{ln}: unusable GenEval metadata: {why}")
            p = m["prompt"].strip()
            specs[p] = m
        else:
            p = line.strip()
            if task == "ocr" and not re.search(r'"[^"]+"', p):
                raise runs.CheckpointError(f"{f}:{ln}: an OCR prompt needs its target text in double quotes: {p[:60]!r}")
        prompts.append(p)
    if not prompts:
        raise runs.CheckpointError(f"{f}: no usable prompt line; add one prompt per line (README, 'Real scale')")
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
        raise runs.CheckpointError(f"only {len(out)} distinct GenEval prompts could be drawn (asked for {n})")
    return out


def write_geneval_prompts(out_dir: str | Path, n: int, seed: int = 0, exclude: tuple = ()) -> Path:
    """Write out_dir/geneval/train_metadata.jsonl (a new file: an existing one is refused), leaving
    out every prompt of the given test metadata files."""
    f = Path(out_dir) / "geneval" / "train_metadata.jsonl"
    if f.exists():
        raise runs.CheckpointError(f"{f} exists; choose another folder (nothing is overwritten)")
    test = set()
    for e in exclude:
        if not Path(e).is_file():
            raise runs.CheckpointError(f"{e}: no such GenEval metadata file to exclude")
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
        raise runs.CheckpointError(f"{folder}: no such prompt folder (README, 'Real scale')")
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
            reward = ocr_real_reward if name == "ocr" else pickscore_reward
        tag = (lambda p, specs=specs: specs[p]["tag"]) if name == "geneval" else None
        table[name] = Task(name, train, test, reward, metric, scale, cfg, h.hexdigest()[:16], tag)
    return table


def tasks_for(base: str | Path, prompt_dir: str | Path | None = None) -> dict:
    """The base picks the prompts: a toy base the toy TASKS, an SD3 base real_tasks(prompt_dir)."""
    return real_tasks(prompt_dir) if runs.settings(base)["kind"] == "sd3" else TASKS
