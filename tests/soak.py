"""A server soak on loopback: many queued prompts mixing no maps, two maps files and several strengths
on the thin SD1.5 checkpoint; checks that each (maps, strength, seed) always gives the same pixels
and that the server's memory stays flat after warm-up. Used by tests (reduced) and bench/soak."""
from __future__ import annotations

import random

import psutil

from graphs import image_digests, learn_nodes, sampled_again, sampling_graph, steer

LEARN = {
    "A": ("a watercolor painting of", "a photo of"),
    "B": ("a pencil sketch of", "a photo of"),
}
SUBJECTS = ["a house", "a boat", "a tree", "a dog", "a road", "a lake", "a city", "a field", "a bridge", "a cat"]


def learn_graph(name: str) -> dict:
    source, target = LEARN[name]
    graph = learn_nodes("\n".join(f"{source} {s}" for s in SUBJECTS),
                        "\n".join(f"{target} {s}" for s in SUBJECTS), batch_size=32)
    graph["save"] = {"class_type": "ACTSaveTransportMaps", "inputs": {
        "maps": ["fit", 0], "name": f"soak_{name}", "overwrite": True}}
    return graph


def sample_graph(maps: str | None, strength: float, seed: int, tag: int) -> dict:
    graph = sampling_graph(seed, f"soak_{tag}", steps=2, text="a harbour at dawn")
    if maps:
        graph["load"] = {"class_type": "ACTLoadTransportMaps", "inputs": {"maps_name": f"soak_{maps}.safetensors"}}
        steer(graph, ["load", 0], strength)
    return graph


def soak(server, prompts: int, seed: int = 0) -> dict:
    for name in LEARN:
        entry = server.run(learn_graph(name), timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    rng = random.Random(seed)
    process = psutil.Process(server.process.pid)
    seen: dict[tuple, str] = {}
    mismatches, recomputed, rss = 0, 0, []
    warm_up = max(1, prompts // 5)
    for i in range(prompts):
        maps = rng.choice([None, "A", "B"])
        key = (maps, rng.choice([0.5, 1.0]) if maps else 0.0, rng.choice([1, 2]))
        entry = server.run(sample_graph(key[0], key[1], key[2], i))
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        recomputed += sampled_again(entry)
        digest = image_digests(server, entry)[0]
        if seen.setdefault(key, digest) != digest:
            mismatches += 1
        if i + 1 == warm_up or i + 1 == prompts:
            rss.append(process.memory_info().rss)
    return {"prompts": prompts, "distinct_settings": len(seen), "recomputed_samples": recomputed,
            "determinism_mismatches": mismatches, "rss_after_warmup_mb": round(rss[0] / 1e6, 1),
            "rss_at_end_mb": round(rss[-1] / 1e6, 1), "rss_growth_mb": round((rss[-1] - rss[0]) / 1e6, 1)}
