"""`interp report` and `interp figures`: sections run in isolation, the page is static and complete, figures
re-draw byte for byte from saved results, and the page renders in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from interp.app import lenses, report
from interp.app.cli import main
from interp.app.context import Context, Section
from interp.plotting import figure, save_figure

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _draw_good(folder: Path) -> list[Path]:
    fig, ax = figure()
    ax[0, 0].plot([0, 1, 2], [1.0, 0.5, 0.25], marker="o")
    return list(save_figure(fig, Path(folder) / "figures" / "good"))


def _redraw_good(folder: Path) -> list[Path]:
    _redraw_good.calls += 1
    return _draw_good(folder)


_redraw_good.calls = 0


def _good(ctx: Context) -> Section:
    ctx.out.mkdir(parents=True)
    _draw_good(ctx.out)
    (ctx.out / "table.csv").write_text("model,value\n" + "".join(f"{m},{i}\n" for i, m in enumerate(ctx.tuned)))
    return Section(ctx.out.name, "Good <analysis>", {"n prompts": len(ctx.target.prompts), "x": 0.123456},
                   ctx.figures("good"), {"values": ctx.table("table")}, steering="steered & measured")


def _broken(ctx: Context) -> Section:
    raise RuntimeError("injected failure <b>")


def _inject(mp: pytest.MonkeyPatch, order: tuple[str, ...], fakes: dict) -> None:
    """Run the lenses `order`, where the names in `fakes` are stand-in lens modules running those functions."""
    real = lenses.lens
    modules = {name: SimpleNamespace(TITLE=name.title(), run=run, redraw=_redraw_good) for name, run in fakes.items()}
    mp.setattr(lenses, "LENSES", order)
    mp.setattr(lenses, "lens", lambda name: modules[name] if name in modules else real(name))


def test_a_failed_section_is_reported_and_the_others_still_run(model_dirs, tmp_path, monkeypatch):
    _inject(monkeypatch, ("good", "broken", "good2"), {"good": _good, "broken": _broken, "good2": _good})
    (tmp_path / "p.txt").write_text("w2 w3 w4\nw5 w6\nw7\n")
    out = tmp_path / "report"
    assert main(["report", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == ["good", "broken", "good2"]
    assert sections["good"]["error"] is None and sections["good2"]["error"] is None
    assert sections["good"]["headline"] == {"n prompts": 3, "x": 0.123456}
    assert sections["broken"]["error"] == "RuntimeError: injected failure <b>"
    assert "Traceback" in (out / "broken" / "error.txt").read_text()
    assert Section.load(out / "good") == Section(**sections["good"])
    page = (out / "index.html").read_text()
    assert "injected failure &lt;b&gt;" in page and "<b>" not in page.replace("<b>Steering.</b>", "")
    assert "0.123" in page and "steered &amp; measured" in page
    _assert_static(out)
    _redraw_good.calls = 0
    before = (out / "index.html").read_bytes()
    assert main(["figures", str(out)]) == 0
    assert _redraw_good.calls == 2 and (out / "index.html").read_bytes() == before


def test_only_the_zoo_a_report_names_is_built(tmp_path, monkeypatch):
    """A real-zoo pair builds the real zoo's named models and its series, not the tiny zoo; a tiny-zoo pair the
    tiny zoo's named models and its series, and nothing else."""
    from interp import zoo
    from interp.app import args
    from interp.zoo import smol

    calls = []
    monkeypatch.setattr(zoo, "build", lambda **kw: calls.append(("tiny", kw.get("names"))))
    monkeypatch.setattr(smol, "build_real", lambda **kw: calls.append(("real", kw.get("names"))))
    monkeypatch.setattr(args, "prompt_sets", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    for base, tuned, expected in (("zoo:smol", ["zoo:smol-lora-r8"],
                                   [("real", ["smol", "smol-lora-r8", "smol-series"])]),
                                  ("zoo:base", ["zoo:full"], [("tiny", ["base", "full", "series"])])):
        calls.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            report.run_report(tmp_path / "r", base=base, tuned=tuned)
        assert calls == expected


def test_figures_of_a_folder_without_a_report_exit_2(tmp_path, capsys):
    assert main(["figures", str(tmp_path)]) == 2
    assert "summary.json missing" in capsys.readouterr().err


def test_every_lens_has_a_runner():
    for name in lenses.LENSES:
        module = lenses.lens(name)
        assert callable(module.run) and callable(module.redraw) and module.TITLE and module.HELP, name


def _assert_static(root: Path) -> None:
    """index.html refers only to files inside the report folder, and every one exists; every PNG has its PDF."""
    page = (root / "index.html").read_text()
    assert "://" not in page.replace("http://www.w3.org", "") and "<script" not in page
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert refs
    for ref in refs:
        assert not ref.startswith("/") and (root / ref).is_file(), ref
        if ref.endswith(".png"):
            assert (root / ref).with_suffix(".pdf").is_file(), ref


# --------------------------------------------------------------------------------------- the zoo report

QUICK_TUNED = ("zoo:lora-r8",)  # one tuned model keeps the test short; cross-model code runs all the same


SAVED_FIGURES: list[dict] = []
"""What every figure of the quick report looked like when it was saved (see `_record`)."""


def _record(close):
    """Wrap pyplot.close (which save_figure calls right after writing a figure) to note, per figure: its size,
    the font sizes of its titles, axis labels, tick labels and legends, and the tick labels of integer axes."""
    def recording(fig=None):
        if fig is not None and hasattr(fig, "axes"):
            SAVED_FIGURES.append({"size": tuple(fig.get_size_inches()), "axes": [_axes_facts(ax) for ax in fig.axes]})
        return close(fig)

    return recording


def _axes_facts(ax) -> dict:
    legend = ax.get_legend()
    return {"title": [t.get_fontsize() for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()],
            "labels": [a.label.get_fontsize() for a in (ax.xaxis, ax.yaxis) if a.label.get_text()],
            "ticks": [t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()],
            "legend": [t.get_fontsize() for t in legend.get_texts()] if legend else [],
            "integer_axes": {a.label.get_text(): [t.get_text() for t in getattr(ax, f"get_{name}ticklabels")()]
                             for name, a in (("x", ax.xaxis), ("y", ax.yaxis))
                             if re.fullmatch(r"(layer|head|step|checkpoint step|training step)", a.label.get_text())}}


@pytest.fixture(scope="module")
def quick_report(zoo_built, tmp_path_factory) -> Path:
    """A quick report on the zoo, with a failing section injected between the real ones."""
    import matplotlib.pyplot as plt

    out = tmp_path_factory.mktemp("report") / "report"
    SAVED_FIGURES.clear()
    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, ("tuco", "broken", *lenses.LENSES[1:]), {"broken": _broken})
        mp.setattr(plt, "close", _record(plt.close))
        report.run_report(out, tuned=QUICK_TUNED, quick=True)
    return out


@pytest.mark.slow
def test_every_figure_is_in_the_paper_style(quick_report):
    """Standard widths (single or double column), the style's font sizes for every text (titles and labels 8 pt,
    ticks and legends 7 pt), and integer tick labels on layer, head and step axes."""
    from interp.plotting import STYLE, WIDTHS

    assert len(SAVED_FIGURES) > 30
    integer_axes = 0
    for fig in SAVED_FIGURES:
        assert round(fig["size"][0], 3) in {round(w, 3) for w in WIDTHS.values()}, fig
        for ax in fig["axes"]:
            assert set(ax["title"]) <= {STYLE["axes.titlesize"]} and set(ax["labels"]) <= {STYLE["axes.labelsize"]}
            assert set(ax["ticks"]) <= {STYLE["xtick.labelsize"]} and set(ax["legend"]) <= {STYLE["legend.fontsize"]}
            for label, ticks in ax["integer_axes"].items():
                integer_axes += 1
                values = [float(t.replace("\u2212", "-")) for t in ticks if t]
                assert values and all(v == int(v) for v in values), (label, ticks)
    assert integer_axes >= 5


@pytest.mark.slow
def test_quick_zoo_report_has_every_section_and_its_files(quick_report):
    from analyses import intruders, tuco

    summary = json.loads((quick_report / "summary.json").read_text())
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections)[:2] == ["tuco", "broken"] and sections["broken"]["error"].startswith("RuntimeError")
    for name in ("tuco", "circuits", "intruders", "shift", "lid"):
        s = sections[name]
        assert s["error"] is None and s["figures"] and s["tables"] and s["steering"] and s["headline"], name
    _assert_static(quick_report)
    # headline numbers are the saved results' numbers
    for label in ("lora-r8",):
        saved = tuco.TuCoResult.load(quick_report / "tuco" / "results" / label / "reverse")
        assert abs(sections["tuco"]["headline"][f"TuCo {label} (reverse)"] - float(saved.tuco().mean())) < 1e-6
        counted = int(intruders.IntruderResult.load(quick_report / "intruders" / "results" / label).count().sum())
        assert sections["intruders"]["headline"][f"intruders {label} (eps 0.5)"] == counted
    assert 0 < sections["tuco"]["headline"]["TuCo lora-r8 (reverse)"] < 1


def _figure_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".png", ".pdf") and p.name != "screenshot.png"}


@pytest.mark.slow
def test_figures_redraw_byte_for_byte(quick_report, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quick_report, copy)
    before, page = _figure_files(copy), (copy / "index.html").read_bytes()
    for p in copy.rglob("*"):
        if p.suffix in (".png", ".pdf"):
            p.unlink()
    assert main(["figures", str(copy)]) == 0
    after = _figure_files(copy)
    assert sorted(after) == sorted(before) and len(after) > 30
    assert [name for name in before if after[name] != before[name]] == []
    assert (copy / "index.html").read_bytes() == page


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def page_problems(driver, page: Path, screenshot: Path) -> list[str]:
    """Open `page`, save a screenshot, and list every image that did not load and every console error."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
    driver.save_screenshot(str(screenshot))
    problems = [f"image did not load: {src}" for src, width in images if width == 0]
    problems += [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return problems + ([] if images else ["no images"])


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="needs Debian chromium and chromium-driver (scripts/setup.sh installs them)")
def test_report_renders_in_headless_chromium(quick_report, tmp_path):
    import matplotlib.image

    broken = tmp_path / "broken.html"  # the check itself must catch a missing image and a console error
    broken.write_text('<!doctype html><html><head><meta charset="utf-8"><title>x</title></head><body>'
                      '<img src="missing.png" alt="m"><script>console.error("boom")</script></body></html>')
    driver = _chromium()
    try:
        caught = page_problems(driver, broken, tmp_path / "broken.png")
        problems = page_problems(driver, quick_report / "index.html", quick_report / "screenshot.png")
    finally:
        driver.quit()
    assert any("missing.png" in p for p in caught) and any("boom" in p for p in caught), caught
    assert problems == []
    pixels = matplotlib.image.imread(quick_report / "screenshot.png")
    assert pixels.shape[0] >= 600 and pixels.std() > 0.05  # a rendered page, not a blank one
