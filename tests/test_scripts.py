"""The scripts as a whole: one import direction (no cycle), --help that helps, a checkpoint folder
with one file missing or unreadable, bench_distill.py at SD3.5-M's architecture (tiny, on the CPU)
and Policy.from_transformer, and experiments.py's every study with tiny budgets."""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import ablations as A
import bench_distill as B
import distill as D
import rewards as R
import runs
import sampler as S
from conftest import REPO, _dcfg, _refused, _tree


# ---- one import direction, help that helps --------------------------------------------------
def test_imports_have_no_cycle():
    """runs <- sampler <- toy <- rewards <- the rest (evaluate, teachers, distill, ablations and the
    tools on top): an AST walk over the imports of every module at the repository root, those
    inside functions included, finds no cycle, and the bottom four import only what is below them."""
    import ast
    mods = {p.stem: p for p in REPO.glob("*.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            graph[m] |= {n.split(".")[0] for n in names if n.split(".")[0] in mods and n.split(".")[0] != m}
    assert {"runs", "sampler", "toy", "rewards", "evaluate", "distill", "ablations"} <= set(mods), sorted(mods)
    order = ["runs", "sampler", "toy", "rewards"]
    for i, m in enumerate(order):
        assert graph[m] <= set(order[:i]), f"{m} imports {graph[m] - set(order[:i])}, above it"
    state = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) != 2:
            state[m] = 1
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = 2
    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("script", ["distill", "ablations", "teachers", "multitask", "toy", "evaluate", "sampler",
                                    "bench_distill", "experiments"])
def test_every_flag_has_help(script, monkeypatch):
    """Every flag of every script says what it does (3 words or more) and its default (for the config
    dataclasses: the help of the field's arg(), one source for code and terminal)."""
    import argparse
    got = []

    class Caught(Exception):
        pass

    def capture(self, *a, **k):
        got.append(self)
        raise Caught
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Caught):
        __import__(script).main([])
    flags = [act for act in got[0]._actions if act.option_strings and act.dest != "help"]
    assert flags
    for act in flags:
        assert act.help and len(act.help.split()) >= 3 and ("default" in act.help or act.required), \
            (script, act.dest, act.help)


def test_bench_toy_times_both_schedules_and_folded_sampling(tiny_base, tmp_path, capsys):
    """`bench_distill.py` (toy size, here on the tiny base): positive times for the fused round (all
    steps and --sample-steps), the three-pass one, the per-step passes of the floor and evaluation
    sampling with a rank-96 adapter folded in and as a branch, each ratio the one of its times, the
    floors their passes' sums, the JSON written as printed."""
    out, threads = tmp_path / "toy.json", torch.get_num_threads()
    try:
        res = B.main(["--base", str(tiny_base), "--prompts", "2", "--steps", "3", "--sample-steps", "1", "--repeats", "1",
                      "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == res and "folded into the weights" in capsys.readouterr().out
    for k in ("fused_s", "three_pass_s", "sampled_s", "student_step_s", "teacher_step_s", "walk_step_s",
              "eval_folded_s", "eval_branch_s"):
        assert res[k] > 0, (k, res[k])
    assert res["trained_steps"] == 3 and res["sample_steps"] == 1, res
    step = res["student_step_s"] + res["teacher_step_s"]
    assert res["floor_s"] == pytest.approx(3 * step)
    assert res["floor_sampled_s"] == pytest.approx(step + (1 * 4 / 2 - 1) * res["walk_step_s"])   # E[last drawn + 1] = 2
    assert res["fused_over_floor"] == pytest.approx(res["fused_s"] / res["floor_s"])
    assert res["sampled_over_floor"] == pytest.approx(res["sampled_s"] / res["floor_sampled_s"])
    assert res["fused_over_sampled"] == pytest.approx(res["fused_s"] / res["sampled_s"])
    assert res["three_pass_over_fused"] == pytest.approx(res["three_pass_s"] / res["fused_s"])
    assert res["eval_branch_over_folded"] == pytest.approx(res["eval_branch_s"] / res["eval_folded_s"])


# ---- a checkpoint folder with one file missing or unreadable (docs/formats.md, "Errors") ----
BREAKS = {"missing": lambda f: f.unlink(), "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
          "empty": lambda f: f.write_bytes(b""), "garbage": lambda f: f.write_bytes(b"{not json")}


@pytest.fixture(scope="module")
def tiny_student(tiny_teachers, tmp_path_factory):
    """A student folder as distill.py writes it (runs/distill/checkpoint): one round, no evaluation."""
    out = tmp_path_factory.mktemp("student") / "d"
    D.run(_dcfg(out, tiny_teachers, rounds=1, prompts=2, steps=2, eval_every=0, eval_n=0, eval_heldout_n=0))
    return out / "checkpoint"


def _copy_ckpt(src, dst):
    """A copy of a teacher or student folder elsewhere, its relative base path re-pointed (no score cache)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("scores.json"))
    meta = runs.read_meta(src)
    meta["base"]["path"] = os.path.relpath(runs.resolve_base(src, meta), dst)
    runs.write_json_atomic(dst / runs.META, meta)
    return dst


@pytest.mark.parametrize("how", BREAKS)
@pytest.mark.parametrize("name", [*runs.ADAPTER_FILES, runs.META])
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_a_broken_checkpoint_file_is_named_in_one_line(kind, name, how, tiny_base, tiny_teachers, tiny_student,
                                                       tmp_path, capsys):
    """Each file of a teacher and of a student folder, missing, truncated, empty or garbage: every
    script given the folder (evaluate.py, sampler.py, teachers.py --init; distill.py --teachers for
    a teacher) ends with one line naming the file, exit 2, before anything is loaded or written."""
    import evaluate as E
    import teachers as T
    d = _copy_ckpt(tiny_teachers[1] if kind == "teacher" else tiny_student, tmp_path / kind)
    BREAKS[how](d / name)
    before = _tree(tmp_path)
    calls = {"evaluate": (E.main, [d, "--n", "1", "--heldout-n", "0", "--json", tmp_path / "res.json"]),
             "sampler": (S.main, [d, "--prompt", "a red circle", "--n", "1", "--out", tmp_path / "s.png"]),
             "teachers --init": (T.main, ["--base", tiny_base, "--init", d, "--out", tmp_path / "rl", "--rank", "4",
                                          "--alpha", "8"])}
    if kind == "teacher":
        calls["distill"] = (D.main, ["--teachers", tiny_teachers[0], d, tiny_teachers[2], "--out", tmp_path / "out"])
    for script, (main, argv) in calls.items():
        err = _refused(capsys, main, [str(a) for a in argv])
        assert f"{d}: {name}" in err, (script, err)
        assert _tree(tmp_path) == before, f"{script} wrote {set(_tree(tmp_path)) ^ set(before)}"


def test_a_damaged_score_cache_is_recomputed(tiny_teachers, tmp_path, monkeypatch):
    """scores.json is only a cache: not a JSON object there, the scores are computed (here a stand-in
    for the sampling and scoring) and it is rewritten."""
    import evaluate as E
    import numpy as np
    d = _copy_ckpt(tiny_teachers[1], tmp_path / "t")
    (d / "scores.json").write_text("[]")
    monkeypatch.setattr(E, "evaluate", lambda policy, task, n, *a, **k: np.full(n, 0.5))
    E.evaluate_checkpoint(str(d), 1, 0, tasks=("aesthetic",), policy="loaded")
    assert [v["scores"] for v in json.loads((d / "scores.json").read_text()).values()] == [[0.5]]


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_distill_base_that_is_an_adapter_is_refused(kind, tiny_teachers, tiny_student, tmp_path, capsys):
    """`distill.py --base ckpts/ocr --teachers ckpts/*`: --base is a teacher (or a student), not a base."""
    b = tiny_teachers[1] if kind == "teacher" else tiny_student
    err = _refused(capsys, D.main, ["--base", str(b), "--teachers", *tiny_teachers, "--out", str(tmp_path / "out")])
    assert err == f"error: --base {b}: a {kind} checkpoint, not a base; leave --base out (a teacher folder's " \
                  f"{runs.META} names its base) or pass the base of the TASK=PATH teachers", err
    assert not (tmp_path / "out").exists()


def test_teachers_base_that_is_a_teacher_is_refused(tiny_teachers, tmp_path, capsys):
    """`teachers.py --base ckpts/ocr`: one line naming it a teacher, exit 2, no run folder."""
    import teachers as T
    err = _refused(capsys, T.main, ["--base", tiny_teachers[1], "--task", "ocr", "--out", str(tmp_path / "out")])
    assert err.startswith(f"error: --base {tiny_teachers[1]}: a teacher checkpoint, not a base;"), err
    assert not (tmp_path / "out").exists()


# ---- bench_distill.py at SD3.5-M's architecture (tiny on the CPU) and Policy.from_transformer ----
def test_bench_tiny_cpu_json_times_ratios_memory(tmp_path, capsys):
    """`bench_distill.py --size tiny` on the CPU (SD3.5-M's architecture, 2 layers, random
    weights; the scheduler's 10-step grid, 9 steps trained as distill.py trains them): the JSON is
    printed and written (atomically: no .tmp left), every schedule has a positive time, the ratios
    are the ones of those times, every batch a peak RSS from its own child process above its
    after-build baseline, and K teacher adapters on one backbone take less memory than K + 1 full
    transformers."""
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    # one batch, of 2 prompts (one text conditioning per prompt, the unconditional row broadcast):
    # each batch costs a memory child process, ~10 s of importing torch, diffusers and peft
    try:                                                       # 1 thread: robust on a shared machine
        res = B.main(["--size", "tiny", "--batches", "2", "--repeats", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == res and not list(tmp_path.glob("*.tmp"))
    assert json.loads(printed.split("\n\nSD3.5-M tiny")[0]) == res, printed[-500:]
    assert res["size"] == "tiny" and res["device"] == "cpu" and res["teachers"] == 3 and res["cfg"] == 4.5
    assert res["steps"] == 10 and res["lora"]["r"] == 32 and res["lora"]["alpha"] == 64
    assert res["trained_steps"] == 9        # the scheduler's grid at shift 3: its last step (.0089 -> 0) is not trained
    assert [r["batch"] for r in res["batches"]] == [2] and res["torch_threads"] == 1
    for r in res["batches"]:
        assert not r["oom"]
        for k in ("fused_s", "three_pass_s", "floor_s", "floor_student_fwd_bwd_step_s", "floor_teacher_fwd_step_s"):
            assert r[k] > 0, (r["batch"], k, r[k])
        assert r["floor_s"] == pytest.approx(9 * (r["floor_student_fwd_bwd_step_s"] + r["floor_teacher_fwd_step_s"]))
        assert r["fused_over_floor"] == pytest.approx(r["fused_s"] / r["floor_s"])
        assert r["three_pass_over_floor"] == pytest.approx(r["three_pass_s"] / r["floor_s"])
        assert r["three_pass_over_fused"] == pytest.approx(r["three_pass_s"] / r["fused_s"])
        # the two schedules do the same work: the same loss (random teachers: > 0)
        assert r["kl_fused"] > 0 and r["kl_fused"] == pytest.approx(r["kl_three_pass"], rel=1e-4), r
        assert 0 < r["pre_build_bytes"] <= r["baseline_bytes"] <= r["peak_bytes"], r
    lay = res["layouts"]
    assert lay["batch"] == 2 and lay["adapters"]["peak_bytes"] == res["batches"][0]["peak_bytes"]
    assert lay["param_ratio"] < 0.5, f"adapters / {3} + 1 copies, parameter bytes: {lay['param_ratio']:.3f} (expected < 0.5)"
    assert lay["peak_ratio"] < 1, f"adapters / copies, measured peak RSS above pre-build: {lay['peak_ratio']:.3f} (expected < 1)"
    assert res["fit_80gb"] is None                              # full size on CUDA only


def test_policy_from_transformer_velocity_equals_loaded_policy():
    """Policy.from_transformer around the toy base's transformer gives the loaded Policy's
    velocity exactly (CFG off, the base's CFG, 4.5), also with the same LoRA on both; its
    defaults are SD3.5-M's shift 3 and the paper's CFG 4.5."""
    from peft import LoraConfig
    pol = S.Policy(str(REPO / "base"), device="cpu")
    bare = S.Policy.from_transformer(copy.deepcopy(pol.transformer), shift=pol.shift, guidance=pol.guidance, device="cpu")
    assert (bare.shift, bare.guidance) == (pol.shift, pol.guidance)
    d = S.Policy.from_transformer(copy.deepcopy(pol.transformer))
    assert (d.shift, d.guidance, d.dtype) == (3.0, 4.5, torch.float32) and d.vae is None and d.pipe is None
    cond = pol.encode(["a red circle above a blue square", 'a sign that says "K7"'])
    x = torch.randn(2, *pol.latent_shape(), generator=torch.Generator().manual_seed(0))
    for g in (1.0, pol.guidance, 4.5):
        assert torch.equal(bare.velocity(x, 0.7, cond, g), pol.velocity(x, 0.7, cond, g)), g
    for p in (pol, bare):                                      # the same random LoRA on both
        torch.manual_seed(1)
        p.add_adapter("t", config=LoraConfig(r=4, lora_alpha=8, target_modules=S.LORA_TARGETS, init_lora_weights=False))
        p.use("t")
    v = pol.velocity(x, 0.7, cond)
    assert torch.equal(bare.velocity(x, 0.7, cond, pol.guidance), v)
    bare.use(None)
    assert not torch.equal(bare.velocity(x, 0.7, cond, pol.guidance), v)   # the adapter did something


@pytest.mark.parametrize("argv", [["--size", "huge"], ["--size", "tiny", "--batches", "0"],
                                  ["--size", "tiny", "--batches", "1,x"], ["--size", "tiny", "--prompts", "4"],
                                  ["--size", "tiny", "--sample-steps", "2"], ["--sample-steps", "-1"],
                                  ["--batches", "2"], ["--size", "tiny", "--fit-batch", "3"],
                                  ["--size", "full", "--dtype", "fp16"], ["--repeats", "0"],
                                  pytest.param(["--size", "full"], marks=pytest.mark.skipif(
                                      torch.cuda.is_available(), reason="on a GPU --size full runs"))])
def test_bench_bad_flags_one_line_exit_2(argv, capsys):
    """A bad or misplaced flag: one line on stderr starting with 'error:', exit 2, nothing run."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        B.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (argv, e.value.code, err)


# ---- experiments.py: every study's code path with tiny budgets ----
def test_experiments_quick_all_studies_and_resume(tiny_teachers, tmp_path, capsys, monkeypatch):
    """`experiments.py --quick` runs all five studies on tiny teachers, writes each results JSON and
    figure, shares the runs it says it shares, and a re-run trains nothing new (every run folder
    is read back, the gradient spread from its cache) and rewrites the same numbers."""
    import experiments as X
    args = ["--teachers", *tiny_teachers, "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"),
            "--quick", "--seeds", "2"]
    # every Stage 2 run's report draws base-vs-student grids (distill.figures: 6 more 40-step samplings
    # and 4 PNGs a run, a third of this test's time; tests/test_distill.py checks them): drawn for the
    # first run here, at --quick's sizes, and skipped for the other runs; no study reads them
    drawn, figures = [], D.figures

    def first_figures(out, *a, **k):
        drawn.append(out)
        return figures(out, *a, **k) if len(drawn) == 1 else {}
    monkeypatch.setattr(D, "figures", first_figures)
    X.main(args)
    # 10 Stage 2 runs, no more (the shared ones run once): 2 seeds, a = 0.3, a = 0.7, PPO, REINFORCE, SFT,
    # and the objective study's SFT, DMD and TDM at the a = 0 run's training time
    assert len(drawn) == 10 and (drawn[0] / "grid_ocr.png").is_file(), drawn
    docs = tmp_path / "docs"
    res = {s: json.loads((docs / f"{s}.json").read_text()) for s in X.STUDIES}
    assert all((docs / f"{s}.png").is_file() for s in ("noise", "estimators", "estimators_variance", "sft", "objectives"))
    names = [r["name"] for r in res["table1"]["rows"]]
    assert names[0] == "base" and {"joint GRPO-Guard", "joint NFT", "cascade NFT", "DiffusionOPD (2 seeds)"} <= set(names)
    assert all(0 <= r["average"] <= 1 for r in res["table1"]["rows"]) and len(res["table1"]["seeds"]) == 2
    # the baselines train GenEval as its shipped teacher does (per-object reward, tags by spread);
    # the NFT ones are sampled at the base's CFG, as that teacher is
    meta = {r["name"]: runs.read_meta(r["path"]) for r in res["table1"]["rows"] if "NFT" in r["name"] or "GRPO" in r["name"]}
    assert all(m["trained"]["config"]["rl_reward"] == "objects" and m["trained"]["config"]["prompt_mix"] == "spread"
               for m in meta.values()), meta
    base_cfg = runs.settings(runs.settings(tiny_teachers[0])["base"])["cfg"]
    assert [meta[n]["cfg"] for n in ("joint NFT", "cascade NFT", "joint GRPO-Guard")] == [base_cfg] * 3, meta
    avg = {r["name"]: r["average"] for r in res["table1"]["rows"]}
    minus = res["table1"]["opd_minus"]                               # OPD's Average minus each row's, +- SE
    assert set(minus) == set(names) - {"DiffusionOPD (2 seeds)"}
    assert all(abs(v["scores"][0] - (avg["DiffusionOPD (2 seeds)"] - avg[n])) < 1e-9 and v["scores"][1] >= 0
               and v["heldout"][1] >= 0 for n, v in minus.items()), (minus, avg)
    # both tables for every row: the OPD seeds' held-out scores come from table1 itself (--quick
    # runs skip their own held-out table), the primary ones from the runs' cache
    assert all(set(r["heldout"]) == set(r["scores"]) == set(R.toy.TASK_NAMES) for r in res["table1"]["rows"])
    noise = res["noise"]["runs"]
    assert set(noise) == {"0.0", "0.3", "0.7"}
    first = {a: v["probe_kl"][0] for a, v in noise.items()}          # round 0: the same no-op student
    assert first["0.0"] == first["0.3"] == first["0.7"], first
    assert all(len(v["rounds"]) == 2 and v["evals"] for v in noise.values()), noise   # probes: round 0, the end
    assert noise["0.0"]["path"] == res["sft"]["runs"]["DiffusionOPD (on-policy)"]["path"]
    assert noise["0.7"]["path"] == res["estimators"]["runs"]["closed"]["path"]
    obj = res["objectives"]                                         # every rival trained for OPD's training time
    assert list(obj["runs"]) == ["DiffusionOPD", "SFT", "DMD", "TDM"] and obj["budget_minutes"] > 0, obj
    assert obj["runs"]["DiffusionOPD"]["path"] == noise["0.0"]["path"]
    for name, v in obj["runs"].items():
        assert v["rounds_done"] >= 1 and v["vs_opd"]["train"], (name, v)
        if name != "DiffusionOPD":                                   # stopped by --minutes, not by --rounds
            assert runs.read_meta(Path(v["path"]) / "checkpoint")["trained"]["rounds"] == v["rounds_done"], (name, v)
    assert all(abs(d[0]) < 1e-12 for d in obj["runs"]["DiffusionOPD"]["vs_opd"]["train"].values())
    var = res["estimators"]["variance"]["tasks"]["ocr"]["0.7"]
    assert all(v > 0 for e in A.ESTIMATORS for v in var[e]["trace_cov"]), var
    states = sorted(p for p in (tmp_path / "runs").rglob("state.json"))
    stamps = {p: p.stat().st_mtime_ns for p in states}
    monkeypatch.setattr(A, "estimator_gradients", lambda *a, **k: pytest.fail("the gradient spread was recomputed"))
    X.main(args)
    assert {p: p.stat().st_mtime_ns for p in states} == stamps, "a re-run trained again"
    again = json.loads((docs / "table1.json").read_text())
    assert [r["scores"] for r in again["rows"]] == [r["scores"] for r in res["table1"]["rows"]]
    for s in X.STUDIES:                                               # the tables docs/experiments.md shows
        assert X.render_study(s, res[s]).count("\n|") >= 2, s
    assert "Held-out" in X.render_study("table1", res["table1"]) and "bootstrap" in X.render_study("table1", res["table1"])
    with pytest.raises(SystemExit) as e:
        X.main(args + ["--only", "everything"])
    assert e.value.code == 2 and "--only" in capsys.readouterr().err


def test_gpu_check_builds_the_real_scale_inputs(tmp_path):
    """gpu_check.py's inputs at the tiny size: an SD3 pipeline folder with SD3.5-M's wiring (16
    latent channels, VAE factor 8, dual attention) that sampler.Policy loads with the scheduler's
    grid, and three published-style teachers (PEFT files, no opd.json) that fit it, each moving
    the velocity. Its full-size run needs a GPU and is refused here in one line."""
    import gpu_check as G
    pipe = G.pipeline("tiny", torch.device("cpu"))
    pipe.save_pretrained(tmp_path / "sd3")
    entries = G.teachers(tmp_path / "sd3", tmp_path / "teachers")
    assert [e.split("=")[0] for e in entries] == ["geneval", "ocr", "aesthetic"]
    assert all(not (Path(e.split("=")[1]) / runs.META).exists() for e in entries)
    pol = S.Policy(str(tmp_path / "sd3"))
    assert pol.latent_shape()[0] == 16 and pol.sigma_min == pytest.approx(runs.sigma_min_of(3.0))
    x = torch.randn(1, *pol.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = pol.encode(["a red cat"])
    with torch.no_grad():
        v0 = pol.velocity(x, 0.5, cond, 1.0)
        for e in entries:
            task, path = e.split("=")
            pol.add_adapter(task, path)
            pol.use(task)
            assert (pol.velocity(x, 0.5, cond, 1.0) - v0).abs().max() > 1e-4, task
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            G.main(["--out", str(tmp_path / "full")])
        assert e.value.code == 2 and not (tmp_path / "full").exists()
