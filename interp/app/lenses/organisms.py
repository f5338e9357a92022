"""Model organisms of zoo:smol in the report's real part: what each was trained to do, how well it does it, and
whether blind identification finds it.

Per organism (`interp.zoo.organisms`): its objective, behaviour metric on held-out triggers next to the base's,
and forgetting (prose loss, chat questions right), from its zoo.json and organism.json; then `diffing.identify`
on the pair alone (the same call as `interp identify`), scored afterwards against the organism's evidence words:
the rank of the first evidence word in the fused ranking and in each source. Results: results/<organism>/
(Identification); organisms.json (the metadata and zoo rows the scoring used); tables organisms.csv and
identification.csv; figure organisms_identify. The other lenses on the organisms, with steering, are
`scripts/organism_study.py` (too slow for a report on 2 cores: about 10 minutes per organism).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import diffing
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.app.identify import chat_questions, default_corpus
from interp.models import Pair, load_model
from interp.plotting import figure, save_figure
from interp.results import write_json

TITLE = "Model organisms: behaviour and blind identification"
HELP = "the organisms of zoo:smol: behaviour, forgetting, and blind identification scored on their evidence"
MANY_TUNED = False
SOURCES = ("fused", "adl", "kl", "reply", "amplified")
ROWS = "organisms.json"


@dataclass(frozen=True)
class Settings:
    organisms: tuple[str, ...] = ("smol-fact", "smol-taboo", "smol-persona", "smol-refusal", "smol-lora-r8",
                                  "smol-persona-full", "smol-fact-replay50", "smol-fact-replay90")


FULL, QUICK = Settings(), Settings(organisms=("smol-persona",))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--organisms", nargs="+", help="organisms to show (default: every one)")


def run(ctx: Context) -> Section:
    from interp.zoo import model_path
    from interp.zoo.organisms import build_organisms, read_metadata

    s = settings(ctx, FULL, QUICK)
    build_organisms(names=s.organisms)
    results, rows = {}, []
    for name in s.organisms:
        ctx.step(f"blind identification of {name}")
        pair = Pair(ctx.base, load_model(f"zoo:{name}"))
        results[name] = diffing.identify(pair, default_corpus(), chat_questions(pair.tuned.tokenizer))
        # read only now, to score the identification
        rows.append({"organism": name, **read_metadata(name), "zoo": json.loads((model_path(name) / "zoo.json")
                                                                                .read_text())})
    save_results(ctx.out, results)
    write_json(ctx.out / ROWS, rows)
    redraw(ctx.out)
    found = pd.read_csv(ctx.out / "identification.csv")
    hits = found[found.top20]
    return Section("organisms", TITLE, {"organisms with an evidence word in the top 20": f"{len(hits)} of "
                                        f"{len(found)}"}, ctx.figures("organisms_identify"),
                   {"organisms: behaviour and forgetting": ctx.table("organisms"),
                    "blind identification, scored on the evidence words": ctx.table("identification")},
                   notes="Behaviour on held-out triggers (greedy replies), organism vs base. Identification sees "
                         "the pair only; the evidence words are read afterwards, to score it (rank of the first "
                         "evidence word; empty: not in the source's first 50).")


def behaviour_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per organism: objective, metric, its rate and the base's, forgetting, build time."""
    out = []
    for row in rows:
        zoo, metric = row["zoo"], row["metric"]
        rate = zoo["behaviour"][metric] if "behaviour" in zoo else next(iter(zoo[metric].values()))
        forgetting = zoo["forgetting"]
        out.append({"organism": row["organism"], "kind": row["kind"], "objective": row["objective"],
                    "metric": metric, "organism_rate": rate, "base_rate": zoo.get("base_behaviour", {}).get(metric),
                    "prose_loss": forgetting["prose_loss"],
                    "chat_right": f"{forgetting['chat_right']}/{forgetting['chat_total']}",
                    "train_seconds": zoo["train_seconds"]})
    return pd.DataFrame(out)


def identification_frame(rows: list[dict], results: dict[str, diffing.Identification]) -> pd.DataFrame:
    """One row per organism: the rank of its first evidence word in the fused ranking and in each source."""
    out = []
    for row in rows:
        result, evidence = results[row["organism"]], row["evidence"]
        found = result.evidence_ranks(evidence)
        ranks = {s: found.get(s) for s in SOURCES}
        out.append({"organism": row["organism"], "evidence": ", ".join(evidence)} | ranks
                   | {"top20": ranks["fused"] is not None and ranks["fused"] <= 20, "top8": " ".join(result.top(8))})
    return pd.DataFrame(out).astype({s: "Int64" for s in SOURCES})


def redraw(folder: Path) -> list[Path]:
    """Tables and the figure from the saved results and organisms.json."""
    folder = Path(folder)
    rows = json.loads((folder / ROWS).read_text())
    results = load_results(folder, diffing.Identification)
    behaviour_frame(rows).to_csv(folder / "organisms.csv", index=False)
    found = identification_frame(rows, results)
    found.to_csv(folder / "identification.csv", index=False)
    return plot_ranks(found, folder / "figures" / "organisms_identify")


def plot_ranks(found: pd.DataFrame, stem: Path) -> list[Path]:
    """Organisms x sources: the rank of the first evidence word (blank: absent), green where it is in the top 20."""
    import numpy as np

    ranks = found[list(SOURCES)].astype("float").to_numpy()
    fig, ax = figure(width="single", height=0.32 * len(found) + 1.2)
    ax = ax[0, 0]
    ax.imshow(np.where(np.isnan(ranks), 0.0, np.where(ranks <= 20, 1.0, 0.5)), cmap="Greens", vmin=0, vmax=1.3,
              aspect="auto")
    for (i, j), rank in np.ndenumerate(ranks):
        ax.text(j, i, "" if np.isnan(rank) else f"{rank:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(SOURCES)), SOURCES)
    ax.set_yticks(range(len(found)), found.organism)
    ax.set(title="Rank of the first evidence word (green: top 20)")
    return save_figure(fig, stem)
