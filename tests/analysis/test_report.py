"""The published report: sections, figures, suppression, the pseudonym guard, determinism, paper vs run."""

from __future__ import annotations

import re

import polars as pl
import pytest

from cbp_platform.analysis.disclosure import PseudonymLeak, assert_no_pseudonyms, find_pseudonyms
from cbp_platform.analysis.report import PAPER, SECTIONS, paper_vs_run_table, render_report
from cbp_platform.analysis.tables import physical_activity_prevalence, stratified_comparisons, table_one

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ors(terms: dict[str, tuple[float, float, float, float]]) -> pl.DataFrame:
    return pl.DataFrame([dict(term=t, **dict(zip(("or", "or_low", "or_high", "p"), v))) for t, v in terms.items()])


MODELS = {
    "cbp": _ors({"Intercept": (0.2, 0.15, 0.3, 1e-20), "lmm_z2": (0.86, 0.79, 0.93, 2e-4),
                 "imat_z2": (1.23, 1.14, 1.31, 1e-8), "age10": (1.25, 1.2, 1.3, 1e-30)}),
    "nrs_high": _ors({"lmm_z2": (0.64, 0.58, 0.70, 1e-12), "imat_z2": (1.20, 1.10, 1.30, 1e-6)}),
}


@pytest.fixture(scope="module")
def inputs(cohort):
    f = cohort.frame
    t1, pa, st = table_one(f, lmm_unit=cohort.lmm_unit), physical_activity_prevalence(f), stratified_comparisons(f)
    pvr = paper_vs_run_table(flow=cohort.flow, table_one=t1, pa_prevalence=pa, stratified=st, model_results=MODELS)
    return dict(flow=cohort.flow, table_one=t1, pa_prevalence=pa, stratified=st, model_results=MODELS,
                model_summaries={"cbp": "Generalized linear mixed model\nsite variance 0.04"}, paper_vs_run=pvr,
                lineage={"cohort_hash": cohort.cohort_hash, "run_ids": ["run-a", "run-b"],
                         "packages": {"polars": "2.1.0"}})


def test_report_renders_every_section_and_figure(tmp_path, inputs, cohort):
    paths = render_report(tmp_path, known_pseudonyms=cohort.frame["pseudonym"], lmm_unit=cohort.lmm_unit,
                          standardisation=cohort.standardisation, **inputs)
    for key in ("report_md", "report_html", "figure_flow", "figure_pa_prevalence", "figure_forest",
                "table_table_one", "table_flow", "table_pa_prevalence", "table_stratified", "table_paper_vs_run",
                "table_model_cbp", "table_model_nrs_high"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    for key in ("figure_flow", "figure_pa_prevalence", "figure_forest"):
        png = paths[key].read_bytes()
        assert png.startswith(PNG_MAGIC) and b"Software" not in png
    md, page = paths["report_md"].read_text(), paths["report_html"].read_text()
    for anchor in SECTIONS:
        assert f'id="{anchor}"' in page, anchor
    for heading in ("Exclusion flow", "Table 1", "Physical activity", "Mixed logistic regression", "Stratified",
                    "Paper vs this run", "Lineage", "Disclosure control"):
        assert heading in md and heading in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(imgs) == ["figures/flow.png", "figures/forest.png", "figures/pa_prevalence.png"]
    assert all((tmp_path / i).is_file() for i in imgs)
    assert "![" in md and "figures/forest.png" in md
    assert f"{cohort.n:,}" in md and cohort.cohort_hash in md and cohort.cohort_hash in page
    assert "site variance 0.04" in md and "LMM, per 2 SD" in md
    sd = cohort.standardisation["lmm"]["sd"]
    assert f"2 SD = {2 * sd:.2f} cm3/(kg/m)" in md
    assert "<script" not in page and "http" not in page.split("<body>")[1]      # self-contained
    # no pseudonym anywhere in what was written
    known = cohort.frame["pseudonym"].to_list() + cohort.exclusions["pseudonym"].to_list()
    for p in paths.values():
        if p.suffix in (".md", ".html", ".csv"):
            assert find_pseudonyms(p.read_text(), known) == [], p


def test_report_is_deterministic(tmp_path, inputs):
    a = render_report(tmp_path / "a", **inputs)
    b = render_report(tmp_path / "b", **inputs)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    assert not list(tmp_path.rglob("*.tmp"))


def test_pseudonym_guard_refuses_to_write(tmp_path, inputs, cohort):
    p = cohort.frame["pseudonym"][3]
    leaky = {**inputs, "model_summaries": {"cbp": f"outlier row: {p}"}}
    with pytest.raises(PseudonymLeak) as exc:
        render_report(tmp_path / "x", known_pseudonyms=cohort.frame["pseudonym"], **leaky)
    assert p not in str(exc.value)
    assert not (tmp_path / "x").exists()
    # glued into a longer word, only the known list catches it
    glued = {**inputs, "lineage": {**inputs["lineage"], "note": f"x{p}y"}}
    render_report(tmp_path / "y", **glued)
    with pytest.raises(PseudonymLeak):
        render_report(tmp_path / "z", known_pseudonyms=[p], **glued)
    # a pseudonym-shaped token is refused even when it is not in the known list
    with pytest.raises(PseudonymLeak):
        assert_no_pseudonyms("participant 23456789AB excluded")
    assert_no_pseudonyms("sha 23456789ab, LMM per 2 SD, STRATIFIED, run-0a1b2c3d4e")


def test_report_suppresses_small_cells(tmp_path, inputs, cohort):
    f = cohort.frame.head(40)          # small: osteoporosis cells under 5
    st = stratified_comparisons(f)
    assert st.filter(pl.col("stratum") == "osteoporosis")["cbp_n"].min() < 5
    t1 = table_one(f)
    paths = render_report(tmp_path, **{**inputs, "table_one": t1, "stratified": st,
                                       "pa_prevalence": physical_activity_prevalence(f)})
    pub = pl.read_csv(paths["table_stratified"], infer_schema=False)
    assert set(pub.filter(pl.col("Stratum") == "Osteoporosis")["CBP n"]) == {"<5"}
    assert "<5" in paths["report_md"].read_text() and "&lt;5" in paths["report_html"].read_text()
    for col in ("CBP", "No CBP", "All"):
        for cell in pl.read_csv(paths["table_table_one"], infer_schema=False)[col]:
            m = re.match(r"^(\d[\d,]*)( \(|$)", cell)
            assert m is None or int(m.group(1).replace(",", "")) >= 5, cell


def test_paper_vs_run_table(inputs, cohort):
    pvr = inputs["paper_vs_run"]
    assert pvr.columns == ["section", "quantity", "paper", "this_run", "paper_value", "run_value"]
    row = {q: r for q, r in zip(pvr["quantity"], pvr.iter_rows(named=True))}
    assert row["Analysed"]["paper_value"] == PAPER["analysed_n"] == 27518
    assert row["Analysed"]["run_value"] == cohort.n
    assert row["Participants with MRI (start of flow)"]["run_value"] == 3000
    assert row["CBP, n (%)"]["run_value"] == pytest.approx(100 * cohort.frame["cbp"].mean())
    lmm = row["CBP: OR LMM, per 2 SD (95 % CI)"]
    assert lmm["paper"] == "0.87 (0.79-0.95), p = 0.003" and lmm["this_run"].startswith("0.86 (0.79-0.93)")
    assert row["Pain intensity NRS >= 4: OR LMM, per 2 SD (95 % CI)"]["run_value"] == 0.64
    assert row["Osteoarthritis: LMM, CBP (run: median)"]["paper_value"] == 22.9
    assert row["Osteoporosis: InterMAT, Mann-Whitney U p"]["paper"] == "p = 0.0019"
    assert set(pvr["section"]) == {"Cohort", "Physical activity", "Models", "Stratified"}
    none = paper_vs_run_table(flow=inputs["flow"], table_one=inputs["table_one"],
                              pa_prevalence=inputs["pa_prevalence"], stratified=inputs["stratified"], model_results={})
    assert set(none.filter(pl.col("section") == "Models")["this_run"]) == {"not fitted"}
    with pytest.raises(ValueError, match="lack columns"):
        paper_vs_run_table(flow=inputs["flow"], table_one=inputs["table_one"], pa_prevalence=inputs["pa_prevalence"],
                           stratified=inputs["stratified"], model_results={"cbp": pl.DataFrame({"term": ["x"]})})


def test_small_cell_note_and_markers_follow_the_disclosure_limit(tmp_path, inputs, cohort):
    """Under a limit of 10 a count of 7 is hidden and shown as '<10', and the note says 10 and '<10' (it said '<5'
    whatever the limit); under the default 5 the same count is shown."""
    from cbp_platform.analysis.report import figure_pa_prevalence

    f = cohort.frame.head(40)
    small = {**inputs, "table_one": table_one(f), "stratified": stratified_comparisons(f),
             "pa_prevalence": physical_activity_prevalence(f)}
    t1 = small["table_one"]
    dys = t1.filter(pl.col("key") == "dyslipidemia")["all_n"][0]
    assert 5 <= dys < 10
    ten = render_report(tmp_path / "ten", min_count=10, **small)
    md = ten["report_md"].read_text()
    assert "Counts below 10 and every statistic computed from them are shown as '<10'" in md
    assert re.search(r"<5(?!00)", md) is None                       # "<500" is a MET category, not a marker
    pub = pl.read_csv(ten["table_table_one"], infer_schema=False)
    assert pub.filter(pl.col("Characteristic") == "Dyslipidemia")["All"][0] == "<10"
    five = render_report(tmp_path / "five", **small)
    md5 = five["report_md"].read_text()
    assert "Counts below 5 and every statistic computed from them are shown as '<5'" in md5
    pub5 = pl.read_csv(five["table_table_one"], infer_schema=False)
    assert pub5.filter(pl.col("Characteristic") == "Dyslipidemia")["All"][0].startswith(f"{dys} (")
    _, labels = figure_pa_prevalence(small["pa_prevalence"], min_count=1000)
    assert all(lab.endswith("n = <1000") for lab in labels)


def test_secondary_exposure_has_its_own_section_never_beside_the_paper(tmp_path, inputs, cohort):
    """A secondary analysis (the CBP model adding fat fraction) goes to the 'Secondary exposures' section with the
    fat fraction's own descriptive rows; it never feeds the paper-vs-run table (even listed first, with another
    LMM OR), Table 1 or the paper's forest plot."""
    from cbp_platform.analysis.report import SECONDARY_SECTION, figure_forest

    secondary = _ors({"lmm_z2": (0.50, 0.40, 0.60, 1e-9), "imat_z2": (1.23, 1.14, 1.31, 1e-8),
                      "ff_z2": (1.05, 0.90, 1.22, 0.51)})
    models = {"cbp_ff": secondary, **MODELS}
    pvr = paper_vs_run_table(flow=inputs["flow"], table_one=inputs["table_one"], pa_prevalence=inputs["pa_prevalence"],
                             stratified=inputs["stratified"], model_results=models)
    assert pvr.equals(inputs["paper_vs_run"])
    paths = render_report(tmp_path, **{**inputs, "model_results": models, "paper_vs_run": pvr,
                                       "model_summaries": {**inputs["model_summaries"], "cbp_ff": "secondary fit"}},
                          standardisation=cohort.standardisation, lmm_unit=cohort.lmm_unit)
    page, md = paths["report_html"].read_text(), paths["report_md"].read_text()
    assert f'id="{SECONDARY_SECTION}"' in page
    paper_part, secondary_part = md.split("Secondary exposures")
    assert "Fat fraction" not in paper_part and "fat fraction" not in paper_part.lower()
    assert "Fat fraction, per 2 SD" in secondary_part and "secondary fit" in secondary_part
    sd = cohort.standardisation["ff"]["sd"]
    assert f"Fat fraction mean {cohort.standardisation['ff']['mean']:.2f}, SD {sd:.2f} (2 SD = {2 * sd:.2f} %)" in md
    assert "Muscle fat fraction, %" in paths["table_secondary_table_one"].read_text()
    assert "fat fraction" not in paths["table_table_one"].read_text().lower()
    assert "Fat fraction" in paths["table_secondary_stratified"].read_text()
    assert "Fat fraction" not in paths["table_stratified"].read_text()
    assert paths["table_model_cbp_ff"].is_file() and paths["figure_forest_secondary"].read_bytes().startswith(PNG_MAGIC)
    assert paths["figure_forest"].read_bytes() == figure_forest(MODELS)[0]      # the paper's forest: paper models only
    # a secondary analysis that could not be fitted is said so, in its section
    failed = render_report(tmp_path / "failed", **{**inputs, "model_summaries": {
        "cbp_ff": "Not fitted on 60 participants: model checks failed: events_per_variable."}})
    text = failed["report_md"].read_text().split("Secondary exposures")[1]
    assert "Not fitted on 60 participants" in text and "No secondary model results" in text
