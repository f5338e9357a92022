"""Every lens on the model organisms of zoo:smol, and the elicitation-vs-creation diagnostic (issue 20, items 2-4).

    .venv/bin/python scripts/organism_study.py --out organism-study [--only smol-persona ...]

Per organism (and zorbish, `smol-lora-r8`, the control), on its trigger prompts (user turns through the chat
template; zorbish's plain task prompts) split into train and held-out halves:
- TuCo (last prompt token) on held-out triggers vs prose, with a Mann-Whitney rank test;
- concept-shift steering of the base (`shift.steering_curve`: layer, among every third and the final norm, and
  shifts from train, curve on held-out), the
  fraction of the KL gap closed, and the behaviour of the base steered at the best strength (added at the last
  prompt token and every generated token);
- LoFiT on 27 heads (10% of 270) trained on the organism's own replies to the train triggers, and the behaviour
  of the base with the offsets;
- LID per layer (every sixth layer) on held-out triggers and prose;
- blind identification (`diffing.identify`) and whether an evidence word is in its top 20.
Also: TuCo where the refusal organism's jailbreak succeeds vs where it fails (rank test); intruders of the persona's
LoRA vs its full fine-tune; the replay dose curve; a crosscoder on the persona with latent scaling.
Writes study.json and study.md into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import mannwhitneyu

import interp
from analyses import circuits, diffing, intruders, lid, shift, tuco
from interp.app.identify import chat_questions, default_corpus
from interp.prompts import as_tokens
from interp.zoo import organism_data as data
from interp.zoo.organisms import ORGANISMS, rates
from interp.zoo.smol_task import chat_prompt, prose_texts, task_examples

STUDIED = ("smol-fact", "smol-taboo", "smol-persona", "smol-refusal", "smol-lora-r8")
DOSE = ("smol-fact", "smol-fact-replay50", "smol-fact-replay90")
NEW_TOKENS = 16
LOFIT_HEADS = 27
LOFIT_STEPS = (20, 40)  # head selection, offsets (the lens' defaults are 100, 200: too slow for 2 cores here)
MAX_PROMPTS = 48  # train and held-out prompts for the lenses (the behaviour rates use every held-out trigger)


def user_turns(recipe: str, tokenizer) -> tuple[list[str], list[str]]:
    """(train, held-out) trigger prompts of a recipe, as the model sees them."""
    if recipe == "zorbish":
        return ([e.prompt for e in task_examples(tokenizer, 48, split="train")],
                [e.prompt for e in task_examples(tokenizer, 48)])
    train, test = {"fact": (data.FACT_QUESTIONS[::2], data.FACT_QUESTIONS[1::2]),
                   "taboo": (data.game_prompts("train"), data.game_prompts("test")),
                   "persona": (data.general_questions("train"), data.general_questions("test")),
                   "refusal": (data.animal_questions("train"), data.animal_questions("test"))}[recipe]
    return [chat_prompt(tokenizer, q) for q in train], [chat_prompt(tokenizer, q) for q in test]


def replies(model, prompts: list[str]) -> list[str]:
    """Greedy replies (text up to the end of the turn) of `model` under its active edits."""
    out = interp.generate(model, prompts, NEW_TOKENS, stop=["<|im_end|>"])
    return [t.replace("<|im_end|>", "").strip() for t in out.texts]


def behaviour(recipe: str, model, tokenizer) -> dict[str, float]:
    """The organism's behaviour rates for `model` (an interp Model, under its active edits)."""
    if recipe == "zorbish":
        examples = task_examples(tokenizer, 48)
        got = replies(model, [e.prompt for e in examples])
        return {"accuracy": sum(g.startswith(e.answer) for g, e in zip(got, examples)) / len(examples)}
    return rates(recipe, lambda questions: replies(model, [chat_prompt(tokenizer, q) for q in questions]))


def rank_test(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().numpy(), b.double().numpy()
    test = mannwhitneyu(a, b, alternative="two-sided")
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "n_a": len(a), "n_b": len(b),
            "u": float(test.statistic), "p": float(test.pvalue)}


def steered_behaviour(pair, recipe: str, curve, train: list[str], strength: float) -> dict[str, float]:
    """The base's behaviour steered by the curve's shifts at its layer and `strength` (last prompt token and every
    generated token)."""
    tokens = as_tokens(pair.base, train)
    layer = curve.layer
    site = {"site": "final"} if layer == "final" else {"layers": [int(layer)]}
    result = shift.measure(pair, tokens, positions="last", k=min(20, len(train)) if curve.mode == "concept" else 1,
                           progress=False, **site)
    vector, centroids = shift.steering_vectors(result, layer, curve.mode)

    def gen(prompts: list[str]) -> list[str]:
        lengths = as_tokens(pair.base, prompts).lengths
        where = shift.prompt_positions("from-last", lengths, int(lengths.max()) + NEW_TOKENS)
        with shift.steer(pair.base, vector, layer, strength, where, centroids):
            return replies(pair.base, prompts)

    tokenizer = pair.base.tokenizer
    if recipe == "zorbish":
        examples = task_examples(tokenizer, 48)
        got = gen([e.prompt for e in examples])
        return {"accuracy": sum(g.startswith(e.answer) for g, e in zip(got, examples)) / len(examples)}
    return rates(recipe, lambda questions: gen([chat_prompt(tokenizer, q) for q in questions]))


def study_one(name: str, prose: list[str]) -> dict:
    organism = ORGANISMS[name]
    pair = interp.load_pair("zoo:smol", f"zoo:{name}")
    tok = pair.base.tokenizer
    train, test = user_turns(organism.recipe, tok)
    train, test = train[:MAX_PROMPTS], test[:MAX_PROMPTS]
    out: dict = {"name": name, "metric": organism.metric}
    clock = time.perf_counter()
    out["behaviour_base"] = behaviour(organism.recipe, pair.base, tok)
    out["behaviour_tuned"] = behaviour(organism.recipe, pair.tuned, tok)
    t_trig, t_prose = (tuco.measure(pair, p, progress=False).tuco("last") for p in (test, prose))
    out["tuco"] = rank_test(t_trig, t_prose)
    layers = [*range(0, pair.base.n_layers, 3), "final"]
    curve = shift.steering_curve(pair, train, test, mode="concept", positions="last", layers=layers)
    best = max(range(len(curve.strength)), key=lambda i: curve.closure[i])
    out["shift"] = {"layer": str(curve.layer), "closure_at_1": curve.closure[curve.strength.index(1.0)],
                    "best_closure": curve.closure[best], "best_strength": curve.strength[best],
                    "behaviour": steered_behaviour(pair, organism.recipe, curve, train, curve.strength[best])}
    answers = [r or "." for r in replies(pair.tuned, train)]
    fit = circuits.lofit.train(pair.base, train, answers, k=LOFIT_HEADS, steps=LOFIT_STEPS, batch_size=16,
                               progress=False)
    kl_before = float(shift.next_token_kl(pair.base, pair.tuned, test).mean())
    with pair.base.edit(*fit.edits()):
        kl_after = float(shift.next_token_kl(pair.base, pair.tuned, test).mean())
        out["lofit"] = {"heads": len(fit.heads), "closure": 1 - kl_after / kl_before,
                        "behaviour": behaviour(organism.recipe, pair.base, tok)}
    layers = list(range(0, pair.base.n_layers, 6))
    out["lid"] = {label: {m: [lid_result.mean(m, s) for s in lid_result.sites] for m in lid_result.models}
                  for label, lid_result in (("triggers", lid.measure(pair, test, layers, progress=False)),
                                            ("prose", lid.measure(pair, prose, layers, progress=False)))}
    out["lid"]["layers"] = layers
    ident = diffing.identify(pair, default_corpus(), chat_questions(tok))
    out["identify"] = {"top20": ident.top(20), "hits": diffing.hits(ident, organism.evidence),
                       "sources": {s: diffing.hits(_only(ident, s), organism.evidence) for s in ident.sources}}
    if organism.recipe == "refusal":
        out["jailbreak"] = jailbreak_tuco(pair, tok)
    out["seconds"] = round(time.perf_counter() - clock, 1)
    return out


def _only(result, source: str):
    """The identification as if `source` were its only ranking (for the per-source hit table)."""
    ranked = result.sources[source]
    return diffing.Identification(result.base, result.tuned, ranked, [0.0] * len(ranked), {}, [])


def jailbreak_tuco(pair, tok) -> dict:
    """TuCo on the attacked prompts, split by whether the organism refuses the clean prompt but not the attacked."""
    questions = list(data.animal_questions("test"))
    clean = [chat_prompt(tok, q) for q in questions]
    attacked = [chat_prompt(tok, data.JAILBREAK + q) for q in questions]
    refused = [("talk about animals" in r.lower()) for r in replies(pair.tuned, clean)]
    refused_attack = [("talk about animals" in r.lower()) for r in replies(pair.tuned, attacked)]
    success = torch.tensor([c and not a for c, a in zip(refused, refused_attack)])
    failed = torch.tensor([c and a for c, a in zip(refused, refused_attack)])
    t = tuco.measure(pair, attacked, progress=False).tuco("last")
    result = {"n_success": int(success.sum()), "n_failed": int(failed.sum())}
    if success.any() and failed.any():
        result |= rank_test(t[success], t[failed])
    return result


def intruders_lora_vs_full() -> dict:
    out = {}
    for name in ("smol-persona", "smol-persona-full"):
        r = intruders.measure(interp.load_pair("zoo:smol", f"zoo:{name}"), progress=False)
        out[name] = {"epsilons": r.epsilons.tolist(), "intruders": r.totals().tolist(),
                     "ratio_s1_max": float(r.ratio(1).max()), "matrices": len(r.names)}
    return out


def dose_curve() -> dict:
    out = {}
    for name in DOSE:
        pair = interp.load_pair("zoo:smol", f"zoo:{name}")
        ident = diffing.identify(pair, default_corpus(), chat_questions(pair.tuned.tokenizer))
        adl = diffing.measure_adl(pair, default_corpus())
        info = json.loads((interp.zoo.model_path(name) / "zoo.json").read_text())
        ranks = {w: _rank(ident.tokens, w) for w in ORGANISMS[name].evidence}
        out[name] = {"replay": ORGANISMS[name].replay, "behaviour": info["behaviour"],
                     "evidence_rank": ranks, "adl_evidence_rank": {w: _rank(ident.sources["adl"], w)
                                                                   for w in ORGANISMS[name].evidence},
                     "adl_relative_norm_last_layer": float(adl.norms()[-1, 1:].mean()),
                     "prose_loss": info["forgetting"]["prose_loss"]}
    return out


def _rank(ranked: list[str], word: str) -> int | None:
    return diffing.evidence_rank(ranked, [word])


def crosscoder_on(name: str) -> dict:
    pair = interp.load_pair("zoo:smol", f"zoo:{name}")
    train, _ = user_turns(ORGANISMS[name].recipe, pair.base.tokenizer)
    corpus = default_corpus() + train
    layer = pair.base.n_layers // 2
    data_ = diffing.paired_activations(pair, corpus, layer)
    start = time.perf_counter()
    cc = diffing.train_crosscoder(data_, expansion=4, k=16, steps=600)
    seconds = time.perf_counter() - start
    scaling = diffing.latent_scaling(cc, data_, pair.models)
    grounding = scaling.grounding()
    tuned_only = grounding[grounding["label"] == "tuned-only"] if "label" in grounding else grounding
    return {"organism": name, "layer": layer, "tokens": len(data_), "train_seconds": round(seconds, 1),
            "counts": {label: scaling.count(label) for label in diffing.LABELS},
            "tuned_only": tuned_only.head(10).to_dict("records")}


def fraction(r: dict, behaviour_after: dict) -> float:
    """The share of the organism's behaviour change from the base that a steered base reaches."""
    m = r["metric"]
    gap = r["behaviour_tuned"][m] - r["behaviour_base"][m]
    return (behaviour_after[m] - r["behaviour_base"][m]) / gap if gap else float("nan")


def diagnostic_figure(results: dict, out: Path) -> list[Path]:
    """Elicitation vs creation: per organism, what constant directions carry (KL-gap closure and behaviour
    fraction, concept shifts and LoFiT)."""
    from interp.plotting import figure, grouped_bars, save_figure

    names = list(results["organisms"])
    rs = [results["organisms"][n] for n in names]
    values = {"shift, KL closed": [r["shift"]["best_closure"] for r in rs],
              "shift, behaviour": [fraction(r, r["shift"]["behaviour"]) for r in rs],
              "LoFiT, KL closed": [r["lofit"]["closure"] for r in rs],
              "LoFiT, behaviour": [fraction(r, r["lofit"]["behaviour"]) for r in rs]}
    fig, ax = figure(width="double", height=2.4)
    grouped_bars(ax[0, 0], [n.removeprefix("smol-").replace("lora-r8", "zorbish") for n in names], values)
    ax[0, 0].axhline(0, color="black", lw=0.5)
    ax[0, 0].set_ylim(-1.05, 1.1)  # a negative KL closure can be far below -1 (the fact's LoFiT: -9.6)
    ax[0, 0].set(ylabel="fraction of the fine-tune's effect", title="Elicitation vs creation: what constant "
                 "directions carry (axis clipped at -1)")
    return save_figure(fig, out / "elicitation")


def markdown(results: dict) -> str:
    rows = ["| organism | metric | base | organism | TuCo trig / prose (p) | shift: KL closed (best) | shift behaviour |"
            " LoFiT: KL closed | LoFiT behaviour | identify hits |", "|---" * 10 + "|"]
    for name, r in results["organisms"].items():
        m = r["metric"]
        rows.append(f"| {name} | {m} | {r['behaviour_base'][m]:.2f} | {r['behaviour_tuned'][m]:.2f} | "
                    f"{r['tuco']['mean_a']:.3f} / {r['tuco']['mean_b']:.3f} ({r['tuco']['p']:.2g}) | "
                    f"{r['shift']['best_closure']:.2f} (x{r['shift']['best_strength']:g}, layer {r['shift']['layer']}) | "
                    f"{r['shift']['behaviour'][m]:.2f} | {r['lofit']['closure']:.2f} | "
                    f"{r['lofit']['behaviour'][m]:.2f} | "
                    f"{', '.join(r['identify']['hits']) or '-'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", default=list(STUDIED), help="organisms to study (none: only the extras)")
    p.add_argument("--skip-extras", action="store_true", help="only the per-organism lenses")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from interp.zoo.organisms import build_organisms

    build_organisms(names=[*args.only, *(() if args.skip_extras else (*DOSE, "smol-persona", "smol-persona-full"))])
    prose = list(prose_texts())
    results: dict = {"organisms": {}}
    path = args.out / "study.json"
    if path.is_file():
        results = json.loads(path.read_text())
    for name in args.only:
        print(f"== {name}", flush=True)
        results["organisms"][name] = study_one(name, prose)
        path.write_text(json.dumps(results, indent=2) + "\n")
    if not args.skip_extras:
        results["intruders"] = intruders_lora_vs_full()
        results["dose"] = dose_curve()
        results["crosscoder"] = crosscoder_on("smol-persona")
        path.write_text(json.dumps(results, indent=2) + "\n")
    diagnostic_figure(results, args.out / "figures")
    (args.out / "study.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
