"""The side-by-side table and the goals of bench/semantics, computed from its points alone.

A point is one setting measured on one prompt set: {"task", "split" ("tune" or "eval"), "family"
(untouched, upper bound, pack default, pack, negative prompt, conditioning delta, NAG), "label",
"setting", "presence", "kept", "success", "n"}. `kept` is the task's headline kept (against the prompt,
or against the strength-0 picture for the negated-prompt tasks and the specificity checks).
Kept pure so that runs on two hosts (NAGuidance exists only from ComfyUI 0.33) merge into one table.
"""
from __future__ import annotations

BASELINES = ("negative prompt", "conditioning delta", "NAG")
KEPT_SLACK = 0.03  # "content kept within 3 points" of the best baseline


def choose(points: list[dict]) -> dict:
    """The best setting of a sweep on the tuning prompts: the most pictures with the task done and the
    rest kept; ties go to the first (sweeps are listed from the mildest setting up)."""
    return max(points, key=lambda p: p["success"])  # max keeps the first of equals


def _eval(points: list[dict], task: str) -> dict[str, dict]:
    return {p["family"]: p for p in points if p["task"] == task and p["split"] == "eval"}


def beats(pack: dict, baseline: dict | None, removal: bool) -> bool:
    """Presence at least as good as the baseline's (a removal: at most as much left) with kept within
    3 points of it or better. Specificity rows (no presence) compare kept alone."""
    if baseline is None:
        return True
    if pack["presence"] is not None:
        better = pack["presence"] <= baseline["presence"] if removal else pack["presence"] >= baseline["presence"]
        if not better:
            return False
    return pack["kept"] >= baseline["kept"] - KEPT_SLACK


def best_baseline(rows: dict[str, dict]) -> dict | None:
    """The baseline (each at its chosen setting) with the most successes on the reported prompts."""
    found = [rows[f] for f in BASELINES if f in rows]
    if not found:
        return None
    return max(found, key=lambda p: (p["success"], p["kept"]))


def table(points: list[dict], removal: dict[str, bool]) -> str:
    tasks = list(dict.fromkeys(p["task"] for p in points if p["split"] == "eval"))
    head = f"{'task':17s} {'row':20s} {'setting':44s} {'presence':>8s} {'kept':>6s} {'done+kept':>9s} {'n':>3s}"
    lines = [head, "-" * len(head)]
    for task in tasks:
        rows = _eval(points, task)
        prototypes = [f for f in rows if f.startswith("prototype")]
        for family in ("untouched", "upper bound", "pack default", "pack", *BASELINES, *prototypes):
            p = rows.get(family)
            if p is None:
                continue
            presence = "-" if p["presence"] is None else f"{p['presence']:.0%}"
            success = "-" if p["success"] is None else f"{p['success']:.0%}"
            name = {"pack": "pack best"}.get(family, family.replace("prototype ", "proto: "))
            lines.append(f"{task:17s} {name:20s} {p['label'][:44]:44s} {presence:>8s} {p['kept']:6.0%} {success:>9s} {p['n']:3d}")
        lines.append("")
    return "\n".join(lines)


def goals(points: list[dict], removal: dict[str, bool], follow: dict | None = None) -> dict:
    out: dict[str, dict] = {}
    for k, v in (follow or {}).items():
        if k != "all":
            out[f"follows_prompts_{k}"] = {"value": round(v, 3), "goal": ">= 0.90", "met": v >= 0.9}
    tasks = list(dict.fromkeys(p["task"] for p in points if p["split"] == "eval"))
    default_wins = []
    for task in tasks:
        rows = _eval(points, task)
        base = best_baseline(rows)
        if "pack" in rows and base is not None:
            pack = rows["pack"]
            out[f"{task}_pack_best_beats_baselines"] = {
                "value": {"pack": [pack["presence"], pack["kept"], pack["label"]],
                          "best baseline": [base["presence"], base["kept"], base["label"]]},
                "goal": "presence at least as good as the best baseline, kept within 3 points",
                "met": beats(pack, base, removal[task])}
        if "pack default" in rows and base is not None:
            default_wins.append((task, beats(rows["pack default"], base, removal[task])))
    if default_wins:
        share = sum(w for _, w in default_wins) / len(default_wins)
        out["pack_default_at_1_beats_baselines_share"] = {
            "value": round(share, 3), "tasks_won": [t for t, w in default_wins if w],
            "goal": ">= 0.80 of the tasks", "met": share >= 0.8}

    def row(task, family):
        return _eval(points, task).get(family)

    targets = {  # task: (family, presence test, kept floor, words)
        "remove_red": (lambda v: v <= 0.10, 0.80, "<= 0.10 left, shapes kept >= 0.80"),
        "remove_cross": (lambda v: v <= 0.10, 0.90, "<= 0.10 left, colours kept >= 0.90"),
        "edit_red_blue": (lambda v: v >= 0.80, 0.80, ">= 0.80 edited, the rest kept >= 0.80"),
        "edit_small_large": (lambda v: v >= 0.80, 0.80, ">= 0.80 edited, the rest kept >= 0.80"),
    }
    for task, (test, floor, words) in targets.items():
        p = row(task, "pack")
        if p is not None:
            out[f"{task}_pack_best"] = {"value": [p["presence"], p["kept"], p["label"]], "goal": words,
                                        "met": test(p["presence"]) and p["kept"] >= floor}
    # Global tasks no worse than before this arena (style 100% / 95% kept, dots 100% / 69% kept at
    # strength 1, 64 prompts), with two pictures of slack.
    for task, (presence, kept) in {"style": (1.0, 0.953), "add_dots": (1.0, 0.688)}.items():
        p = row(task, "pack default")
        if p is not None:
            out[f"{task}_default_at_1_no_worse"] = {
                "value": [p["presence"], p["kept"]], "goal": f">= {presence - 2 / 64:.3f} / >= {kept - 2 / 64:.3f}",
                "met": p["presence"] >= presence - 2 / 64 and p["kept"] >= kept - 2 / 64}
    for task in tasks:
        if task.startswith("spec_"):
            for family, name in (("pack default", "default_at_1"), ("pack", "best")):
                p = row(task, family)
                if p is not None:
                    out[f"{task}_{name}_keeps_untouched"] = {"value": p["kept"], "goal": ">= 0.90",
                                                             "met": p["kept"] >= 0.9}
    return out


def merge(runs: list[dict], relabel: tuple[str, str] | None = None) -> list[dict]:
    """Points of several runs, one per (task, split, family, label); the first run's come first.

    relabel (old, new): in the runs after the first, labels containing `old` read `new` instead (a run
    made before a configuration of that name changed what it does). Where runs chose different settings
    for one family and task (the pack's best, from other variants in each run), the one whose tuning
    point did best is kept, as one run over all of them would have chosen; a specificity row follows
    the choice made for its task."""
    seen, out = set(), []
    for i, run in enumerate(runs):
        for p in run["points"]:
            if relabel and i > 0 and relabel[0] in p["label"] and relabel[1] not in p["label"]:
                p = dict(p, label=p["label"].replace(relabel[0], relabel[1]))
            key = (p["task"], p["split"], p["family"], p["label"])
            if key not in seen:
                seen.add(key)
                out.append(p)
    chosen: dict[tuple[str, str], str] = {}
    for task, family in dict.fromkeys((p["task"], p["family"]) for p in out if p["split"] == "eval"):
        evals = [p for p in out if p["task"] == task and p["family"] == family and p["split"] == "eval"]
        if len(evals) < 2:
            continue
        tuned = [p for p in out if p["task"] == task and p["family"] == family and p["split"] == "tune"
                 and any(e["label"] == p["label"] for e in evals)]
        if tuned:
            chosen[(task, family)] = choose(tuned)["label"]
    for (task, family), label in list(chosen.items()):
        out = [p for p in out if not (p["task"] == task and p["family"] == family and p["split"] == "eval"
                                      and p["label"] != label)]
        for spec in {p["task"] for p in out if p["label"].startswith(f"{task}'s ")}:
            out = [p for p in out if not (p["task"] == spec and p["family"] == family
                                          and p["label"].startswith(f"{task}'s ") and p["label"] != f"{task}'s {label}")]
    return out
