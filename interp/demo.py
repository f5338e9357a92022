"""The main job until `interp report` lands: build the zoo, capture, steer, and write a small HTML page.

1. Capture `resid_post` at every layer (last prompt token) of base and tuned on the target skill's prompts,
   and measure per layer how far fine-tuning moved the hidden state: mean ||h_tuned - h_base|| / ||h_base||.
2. Steer the base with the mean difference at the layer where it is largest, added at the last prompt
   token with a sweep of scales, and measure the probability and accuracy of the first answer token.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from interp.capture import capture
from interp.intervene import add
from interp.models import load_pair
from interp.plotting import figure, model_color, save_figure
from interp.sites import every_layer

SCALES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def run_demo(out: Path, base: str = "zoo:base", tuned: str = "zoo:full", device: str = "auto",
             backend: str = "bridge", n_prompts: int = 128) -> Path:
    from interp import zoo

    if base.startswith("zoo:") or tuned.startswith("zoo:"):
        zoo.build(progress=True)
    pair = load_pair(base, tuned, device=device, backend=backend)
    examples = zoo.task_prompts(zoo.TARGET_SKILL, n_prompts, split="test")
    prompts = [e.prompt for e in examples]
    first = torch.tensor([pair.base.tokenizer(e.answer, add_special_tokens=False)["input_ids"][0] for e in examples])
    sites = every_layer("resid_post", pair.base.n_layers)

    acts = {m.name: capture(m, prompts, sites, positions="last", logits=True) for m in pair.models}
    h_base, h_tuned = acts[pair.base.name], acts[pair.tuned.name]
    moved = [float(((h_tuned[s] - h_base[s]).norm(dim=-1) / h_base[s].norm(dim=-1)).mean()) for s in sites]
    layer = max(range(len(sites)), key=moved.__getitem__)
    shift = (h_tuned[sites[layer]] - h_base[sites[layer]]).mean(0)

    def answer_stats(logits: torch.Tensor) -> tuple[float, float]:
        probs = logits.softmax(-1)[torch.arange(len(first)), first]
        return float(probs.mean()), float((logits.argmax(-1) == first).float().mean())

    sweep = []
    for s in SCALES:
        steered = capture(pair.base, prompts, [], positions="last", logits=True,
                          edits=[add(sites[layer], shift, scale=s, positions="last")], progress=False)
        sweep.append((s, *answer_stats(steered["logits"])))
    tuned_prob, tuned_acc = answer_stats(h_tuned["logits"])

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = figure()
    ax = ax[0, 0]
    ax.plot(range(len(moved)), moved, marker="o", color=model_color(pair.tuned.name))
    ax.set(xlabel="layer", ylabel=r"$\|h_{tuned}-h_{base}\| / \|h_{base}\|$", title="How far fine-tuning moved resid_post")
    save_figure(fig, out / "layer_shift")
    fig, ax = figure()
    ax = ax[0, 0]
    ax.plot([s for s, _, _ in sweep], [p for _, p, _ in sweep], marker="o", color=model_color(pair.base.name),
            label="base + scale x shift")
    ax.axhline(tuned_prob, ls="--", color=model_color(pair.tuned.name), label="tuned")
    ax.set(xlabel=f"steering scale (mean shift at resid_post.{layer}, last token)",
           ylabel="p(first answer token)", title="Steering the base toward the tuned model")
    ax.legend()
    save_figure(fig, out / "steering")

    summary = {"base": pair.base.name, "tuned": pair.tuned.name, "n_prompts": len(prompts), "backend": backend,
               "relative_shift_per_layer": moved, "steer_layer": layer,
               "steering": [{"scale": s, "p_answer": p, "accuracy": a} for s, p, a in sweep],
               "tuned_answer": {"p_answer": tuned_prob, "accuracy": tuned_acc}}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    rows = "".join(f"<tr><td>{s:g}</td><td>{p:.3f}</td><td>{a:.1%}</td></tr>" for s, p, a in sweep)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>interp demo</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto}} img{{width:48%}} td,th{{padding:0 1em}}</style>
</head><body><h1>interp demo: {html.escape(pair.base.name)} vs {html.escape(pair.tuned.name)}</h1>
<p>{len(prompts)} prompts of the zoo's target skill. Fine-tuning moved the last-token residual stream most at
layer {layer} ({moved[layer]:.2f} of its norm). Adding that mean shift to the base at the last token:</p>
<table><tr><th>scale</th><th>p(answer)</th><th>accuracy</th></tr>{rows}
<tr><td>tuned</td><td>{tuned_prob:.3f}</td><td>{tuned_acc:.1%}</td></tr></table>
<p><img src="layer_shift.png" alt="relative shift per layer"> <img src="steering.png" alt="steering sweep"></p>
</body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"
