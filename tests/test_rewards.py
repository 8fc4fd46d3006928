"""The toy rewards (rewards.py): the GenEval detector and rules, OCR's score, the aesthetic
stand-in, each on ground truth, noise and blank images, and the task table."""
import numpy as np
import pytest

import rewards
import rewards as R
import toy


RNG_SEED = 0


def _render_all(prompts, seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    return np.stack([toy.render(p, rng) for p in prompts])


def _noise(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, toy.RES, toy.RES, 3), dtype=np.uint8)


# ---- geneval --------------------------------------------------------------------
def _gv(prompt_drawn, prompt_scored, strict=True, seed=0):
    img = toy.render(prompt_drawn, np.random.default_rng(seed))[None]
    return rewards.geneval_reward(img, [prompt_scored], strict=strict)[0]


@pytest.mark.parametrize("p", ["a red square left of a blue triangle", "four yellow triangles",
                               "a green triangle below a green square", "a square",
                               "a blue square and a yellow square", "a red triangle"])
def test_geneval_correct_render_scores_1(p):
    assert _gv(p, p) == 1.0 and _gv(p, p, strict=False) == 1.0


def test_geneval_swapped_positions_score_0():
    assert _gv("a blue triangle left of a red square", "a red square left of a blue triangle") == 0
    assert _gv("a red square right of a blue triangle", "a red square left of a blue triangle") == 0
    assert _gv("a red square below a blue triangle", "a red square above a blue triangle") == 0
    # the same scene phrased the other way round is correct
    assert _gv("a blue triangle right of a red square", "a red square left of a blue triangle") == 1
    # partial credit: every object right, only the relation wrong -> 4 of 5 rules
    assert _gv("a red square right of a blue triangle", "a red square left of a blue triangle",
               strict=False) == pytest.approx(0.8)


def test_geneval_wrong_count_or_colour_scores_0():
    for drawn in ("two blue triangles", "four blue triangles", "a blue triangle"):
        assert _gv(drawn, "three blue triangles") == 0
    assert _gv("three red triangles", "three blue triangles") == 0
    assert _gv("three blue squares", "three blue triangles") == 0
    # colour attribution: right shapes and colours, bound to the wrong objects
    assert _gv("a blue square and a red triangle", "a red square and a blue triangle") == 0


def test_geneval_relations_follow_geneval_rule():
    box = lambda x, y: {"box": (x, y, 10, 10)}
    assert rewards.relations(box(2, 10), box(20, 10)) == {"left of"}
    assert rewards.relations(box(10, 20), box(10, 2)) == {"below"}
    assert rewards.relations(box(10, 10), box(11, 10)) == set()      # within the slack
    assert rewards.relations(box(0, 0), box(20, 20)) == {"left of", "above"}


# ---- GenEval's rules as GenEval checks them: the top k detections by size -----------------
def _det(color, shape, area, x=10, y=10, s=8):
    return {"color": color, "shape": shape, "area": area, "box": (x, y, s, s)}


def _rules(prompt, objects):
    return all(R.geneval_checks(toy.parse(prompt), sorted(objects, key=lambda o: -o["area"])))


def test_geneval_rules_judge_the_top_k_detections():
    """Hand-made detections: colour and position are judged on the largest detection(s) of each
    shape whatever their colour (GenEval's top-k), counting excludes n + 1, so an extra, wrongly
    coloured or misplaced detection fails a prompt that any-match rules would pass."""
    g = "a green triangle"
    assert _rules(g, [_det("green", "triangle", 50)])
    assert _rules(g, [_det("green", "triangle", 50), _det("red", "triangle", 30)])      # smaller extra: top 1 is right
    assert not _rules(g, [_det("green", "triangle", 30), _det("red", "triangle", 50)])  # wrongly coloured top 1
    c = "two blue squares"
    assert _rules(c, [_det("blue", "square", 50), _det("blue", "square", 40), _det("red", "triangle", 60)])
    assert not _rules(c, [_det("blue", "square", 50), _det("blue", "square", 40), _det("red", "square", 20)])  # extra
    assert not _rules(c, [_det("blue", "square", 50), _det("red", "square", 40)])                               # colour
    t = "a red square and a blue triangle"
    ok = [_det("red", "square", 50), _det("blue", "triangle", 40)]
    assert _rules(t, ok) and _rules(t, ok + [_det("yellow", "triangle", 20)])
    assert not _rules(t, ok + [_det("yellow", "triangle", 60)])                          # a larger extra triangle
    assert not _rules(t, [_det("blue", "square", 50), _det("red", "triangle", 40)])      # colours swapped
    p = "a red square left of a blue triangle"
    left, right = _det("red", "square", 50, x=2), _det("blue", "triangle", 40, x=20)
    assert _rules(p, [left, right])
    assert not _rules(p, [_det("red", "square", 50, x=20), _det("blue", "triangle", 40, x=2)])   # misplaced
    assert not _rules(p, [left, right, _det("blue", "triangle", 60, x=0, y=20)])  # top triangle not right of it
    # two objects of one shape: the top 2 of the shape, each object the one in its colour
    q = "a red square above a blue square"
    top, bottom = _det("red", "square", 50, y=2), _det("blue", "square", 45, y=20)
    assert _rules(q, [top, bottom]) and _rules(q, [bottom, top])
    assert not _rules(q, [_det("red", "square", 50, y=20), _det("blue", "square", 45, y=2)])
    assert not _rules(q, [top, bottom, _det("yellow", "square", 60)])                    # a third, larger square
    assert not _rules(q, [top, _det("red", "square", 45, y=20)])                          # no blue square in the top 2


# ---- ocr ------------------------------------------------------------------------# ---- geneval's RL reward and the run diagnostics (teachers.py --rl-reward objects) ----------
def _rl(prompt_drawn, prompt_scored, seed=0, erase_right=False):
    img = toy.render(prompt_drawn, np.random.default_rng(seed))[None].copy()
    if erase_right:                                                 # the right half painted over with background
        img[:, :, toy.RES // 2:] = img[:, :1, :1]
    return rewards.geneval_rl_reward(img, [prompt_scored])[0], rewards.geneval_reward(img, [prompt_scored], strict=False)[0]


P = "a green square left of a red triangle"


@pytest.mark.parametrize("drawn,rl,rules", [
    (P, 1.0, 1.0),                                                  # ground truth
    ("a red square left of a red triangle", 0.25, 0.6),             # both objects in one colour
    ("a green square left of a green triangle", 0.25, 0.6),         # ... in the other colour
    ("a green square left of a red square", 0.25, 0.4),             # a shape wrong (two squares)
    ("a green square right of a red triangle", 0.0, 0.8),           # places swapped
    ("missing", 0.25, 0.4),                                         # the triangle missing
])
def test_geneval_rl_reward_hand_made_scenes(drawn, rl, rules):
    """Half strict, half the per-object credit (shape, colour and place right): the scenes the fraction
    of rules (GenEval's 5 for a position prompt) pays 0.4-0.8 for earn at most a quarter; the truth 1."""
    got, frac = _rl(P, P, erase_right=True) if drawn == "missing" else _rl(drawn, P)
    assert got == pytest.approx(rl) and frac == pytest.approx(rules), (drawn, got, frac)


def test_geneval_rl_reward_other_categories():
    every = toy.prompts("geneval", "train") + toy.prompts("geneval", "test")
    assert rewards.geneval_rl_reward(_render_all(every), every).min() == 1.0      # every ground truth: 1
    assert _rl("three green triangles", "three green triangles")[0] == 1.0
    assert _rl("three blue triangles", "three green triangles")[0] == 0.0          # wrong colour: nothing
    assert _rl("four green triangles", "three green triangles")[0] == pytest.approx(0.5 * 3 / 4)   # one too many
    assert _rl("two green triangles", "three green triangles")[0] == pytest.approx(0.5 * 2 / 3)    # one missing
    assert _rl("a blue square", "a green square")[0] == 0.0 and _rl("a blue square", "a square")[0] == 1.0
    assert _rl("a red square and a blue triangle", "a red square and a blue triangle")[0] == 1.0
    assert _rl("a red square and a red triangle", "a red square and a blue triangle")[0] == 0.25


def test_geneval_diagnostics_tags_and_colour_found_rates():
    """Per-tag strict accuracy and per-colour found-rates on a batch whose green objects are all
    drawn blue: green's found-rate is 0 while the others' are 1, and colour_warnings names green."""
    prompts = ["a green square", "a red triangle left of a green square", "three green triangles", "a square",
               "a yellow square and a blue triangle"]
    drawn = [p.replace("green", "blue") if "green" in p else p for p in prompts]
    drawn[1] = "a red triangle left of a blue square"
    imgs = _render_all(drawn)
    d = rewards.geneval_diagnostics(imgs, prompts)
    assert d["colours"] == {"red": [1.0, 1], "yellow": [1.0, 1], "green": [0.0, 5], "blue": [1.0, 1]}, d
    assert d["tags"] == {"single": [1.0, 1], "colors": [0.0, 1], "counting": [0.0, 1], "two_object": [1.0, 1],
                         "position": [0.0, 1]}, d
    assert d["strict"] == pytest.approx(0.4)
    truth = rewards.geneval_diagnostics(_render_all(prompts), prompts)
    assert truth["strict"] == 1.0 and all(r == 1.0 for r, _ in truth["colours"].values()), truth
    warn = rewards.colour_warnings(d, truth)
    assert len(warn) == 1 and "green" in warn[0] and "0%" in warn[0], warn



@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "abc", 0), ("", "ab", 2), ("ab", "", 2),
                                   ("kitten", "sitting", 3), ("ab", "ba", 2), ("flaw", "lawn", 2),
                                   ("a", "b", 1)])
def test_levenshtein(a, b, d):
    assert rewards.levenshtein(a, b) == d == rewards.levenshtein(b, a)


def test_ocr_score_formula():
    s = rewards.ocr_score
    assert s("AB", "AB") == 1 and s("ab", "AB") == 1 and s("x A B y", "ab") == 1  # substring
    assert s("AK", "AB") == 0.5                     # one substitution in 2 chars
    assert s("A", "AB") == 0.5                      # one deletion
    assert s("", "AB") == 0 and s("KKKK", "AB") == 0  # distance capped at len(target)
    assert s("\uff21B", "AB") == 1                  # full-width A (NFKC)
    assert rewards.ocr_target('a sign that says "K5" and "X"') == "K5"


def test_ocr_one_character_error_scores_half():
    img = toy.render('a sign that says "AB"', np.random.default_rng(0))[None]
    assert rewards.ocr_reward(img, ['a sign that says "AB"'])[0] == 1.0
    assert rewards.ocr_reward(img, ['a sign that says "AK"'])[0] == 0.5


# ---- scorers on ground truth, noise and blank images ------------------------------
@pytest.mark.parametrize("task", ["geneval", "ocr"])
def test_ground_truth_high_noise_and_blank_low(task):
    test = toy.prompts(task, "test")
    gt = _render_all(test)
    assert rewards.score(task, gt, test).mean() >= 0.95
    assert rewards.score(task, _noise(len(test)), test).mean() <= 0.1
    for level in (0, 128, 255):
        blank = np.full_like(gt, level)
        assert rewards.score(task, blank, test).mean() <= 0.1
    # the right picture for the wrong prompt scores low (measured: 0.01 / 0.05)
    shifted = test[1:] + test[:1]
    assert rewards.score(task, gt, shifted).mean() <= 0.2


def test_aesthetic_anchors():
    test = toy.prompts("aesthetic", "test")
    gt = _render_all(test)
    s = rewards.aesthetic_reward(gt, test)
    assert 4.0 <= s.mean() <= 6.0                                   # LAION-like: ~5
    ideal = rewards.aesthetic_reward(rewards.ideal_aesthetic_image()[None])[0]
    assert ideal >= 8.0 and ideal > s.max()                         # room above the data
    assert rewards.aesthetic_reward(_noise(16)).mean() <= 2.0
    for rgb in ((0, 0, 0), (128, 128, 128), (255, 255, 255), (220, 40, 40)):
        blank = np.broadcast_to(np.array(rgb, np.uint8), (2, toy.RES, toy.RES, 3)).copy()
        assert rewards.aesthetic_reward(blank).max() <= 2.0
    # the tension with the other tasks: crisp text scores low, softening helps
    ocr_gt = _render_all(toy.prompts("ocr", "test"))
    assert rewards.aesthetic_reward(ocr_gt).mean() < s.mean() - 1.0
    import cv2
    soft = np.stack([cv2.GaussianBlur(im, (0, 0), 1.0) for im in gt])
    assert rewards.aesthetic_reward(soft).mean() > s.mean()
    # any image size: a 4x larger ideal scores about the same
    big = np.repeat(np.repeat(rewards.ideal_aesthetic_image(), 4, 0), 4, 1)[None]
    assert abs(rewards.aesthetic_reward(big)[0] - ideal) < 0.5


# ---- the task table -------------------------------------------------------------
def test_task_table():
    assert tuple(rewards.TASKS) == toy.TASK_NAMES
    assert [t.metric for t in rewards.TASKS.values()] == ["GenEval", "OCR", "Aesthetic"]
    for name, t in rewards.TASKS.items():
        assert t.name == name and t.test == toy.prompts(name, "test")
        out = t.reward(_render_all(t.test[:3]), t.test[:3], strict=False)
        assert out.shape == (3,) and out.dtype == np.float64
    with pytest.raises(ValueError):
        rewards.score("clip", _noise(1), ["x"])
    with pytest.raises(ValueError):
        rewards.score("geneval", _noise(1).astype(np.float32), ["a square"])
    with pytest.raises(ValueError):
        rewards.score("geneval", _noise(2), ["a square"])
