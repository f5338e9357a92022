"""`interp report` and `interp figures`: sections run in isolation, the page is static and complete, figures
re-draw byte for byte from saved results, and the page renders in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from interp import report
from interp.cli import main
from interp.plotting import figure, save_figure

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _draw_good(folder: Path) -> list[Path]:
    fig, ax = figure()
    ax[0, 0].plot([0, 1, 2], [1.0, 0.5, 0.25], marker="o")
    return list(save_figure(fig, Path(folder) / "good"))


def _redraw_good(folder: Path) -> list[Path]:
    _redraw_good.calls += 1
    return _draw_good(folder)


_redraw_good.calls = 0


def _good(ctx: report.Context) -> report.Section:
    ctx.out.mkdir(parents=True)
    _draw_good(ctx.out)
    (ctx.out / "table.csv").write_text("model,value\n" + "".join(f"{m},{i}\n" for i, m in enumerate(ctx.tuned)))
    return report.Section(ctx.out.name, "Good <analysis>", {"n prompts": len(ctx.target[1].prompts), "x": 0.123456},
                          [ctx.rel(ctx.out / "good.png")], {"values": ctx.rel(ctx.out / "table.csv")},
                          steering="steered & measured", redraw=[("test_report:_redraw_good", ctx.rel(ctx.out))])


def _broken(ctx: report.Context) -> report.Section:
    raise RuntimeError("injected failure <b>")


def _inject(mp: pytest.MonkeyPatch, sections: dict, builders: dict) -> None:
    from analyses import report_sections

    mp.setattr(report, "SECTIONS", sections)
    mp.setattr(report_sections, "BUILDERS", {**report_sections.BUILDERS, **builders})


def test_a_failed_section_is_reported_and_the_others_still_run(model_dirs, tmp_path, monkeypatch):
    _inject(monkeypatch, {"good": "Good", "broken": "Broken", "missing": "Missing", "good2": "Good again"},
            {"good": _good, "broken": _broken, "good2": _good})
    (tmp_path / "p.txt").write_text("w2 w3 w4\nw5 w6\nw7\n")
    out = tmp_path / "report"
    assert main(["report", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == ["good", "broken", "missing", "good2"]
    assert sections["good"]["error"] is None and sections["good2"]["error"] is None
    assert sections["good"]["headline"] == {"n prompts": 3, "x": 0.123456}
    assert sections["broken"]["error"] == "RuntimeError: injected failure <b>"
    assert "Traceback" in (out / "broken" / "error.txt").read_text()
    assert sections["missing"]["error"].startswith("not available")
    page = (out / "index.html").read_text()
    assert "injected failure &lt;b&gt;" in page and "<b>" not in page.replace("<b>Steering.</b>", "")
    assert "0.123" in page and "steered &amp; measured" in page
    _assert_static(out)
    _redraw_good.calls = 0
    before = (out / "index.html").read_bytes()
    assert main(["figures", str(out)]) == 0
    assert _redraw_good.calls == 2 and (out / "index.html").read_bytes() == before


def test_only_the_zoo_a_report_names_is_built(tmp_path, monkeypatch):
    """A real-zoo pair builds the real zoo's named models and its series, not the tiny zoo; a tiny-zoo pair the tiny
    zoo only."""
    from interp import zoo
    from interp.zoo import smol

    calls = []
    monkeypatch.setattr(zoo, "build", lambda **kw: calls.append(("tiny", kw.get("names"))))
    monkeypatch.setattr(smol, "build_real", lambda **kw: calls.append(("real", kw.get("names"))))
    monkeypatch.setattr(report, "prompt_sets", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    for base, tuned, expected in (("zoo:smol", ["zoo:smol-lora-r8"],
                                   [("real", ["smol", "smol-lora-r8", "smol-series"])]),
                                  ("zoo:base", ["zoo:full"], [("tiny", None)])):
        calls.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            report.run_report(tmp_path / "r", base=base, tuned=tuned)
        assert calls == expected


def test_figures_of_a_folder_without_a_report_exit_2(tmp_path, capsys):
    assert main(["figures", str(tmp_path)]) == 2
    assert "summary.json missing" in capsys.readouterr().err


def test_sections_find_their_builders():
    from analyses import circuits, report_sections

    for name in ("tuco", "intruders", "shift", "lid"):
        assert report.builder(name) is report_sections.BUILDERS[name]
    assert report.builder("circuits") is circuits.report_section
    assert report.builder("no-such-analysis") is None


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


@pytest.fixture(scope="module")
def quick_report(zoo_built, tmp_path_factory) -> Path:
    """A quick report on the zoo, with a failing section injected between the real ones."""
    out = tmp_path_factory.mktemp("report") / "report"
    sections = dict(report.SECTIONS)
    sections = {"tuco": sections.pop("tuco"), "broken": "Broken", **sections}
    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, sections, {"broken": _broken})
        report.run_report(out, tuned=QUICK_TUNED, quick=True)
    return out


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
        saved = tuco.TuCoResult.load(quick_report / "tuco" / label / "results" / "reverse")
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
