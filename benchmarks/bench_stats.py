"""Fit time of the mixed logistic regression against lme4 on the same data in the same run, and its growth in n.

Designs (the paper's adjusted model, 10 covariates + intercept, random intercept per site):

* ``paper5``: the paper-size simulated cohort of the lme4 fixture, ``simulated_design(30868, 1)``: 27,600
  analysable rows, the 5 MRI sites (checked against ``tests/fixtures/lme4/paper.design.parquet``);
* ``nako18``: 27,518 rows of the same covariates over the NAKO's 18 study centres (``multisite_design``).

Each is written as CSV to a temporary directory and fitted by ``lme4::glmer`` (``tools/lme4_timing.R``, default
control, one run per nAGQ; R 4.x with lme4 from Debian, installed with apt-get if ``Rscript`` or lme4 is
missing) and by ``fit_glmm`` (median of 5, the model checks included), Laplace against nAGQ = 1 and AGQ-25
against nAGQ = 25. Target: ours <= 1/100 of lme4's time, at the same answer (max |coefficient difference|
printed). Then the scaling of ours at ~3k, 30k and 300k rows of both designs (median of 7: now and then a
300k-row fit takes 1.5 times as long, page faults of its large buffers): seconds, seconds per 1k rows and
likelihood evaluations; lme4 at 300k rows is skipped unless CBP_BENCH_LME4_300K=1 (it takes minutes). The
machine's load average is recorded with the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lme4" / "paper.json"
TIMING_R = ROOT / "tools" / "lme4_timing.R"
TARGET_RATIO = 0.01
R_PACKAGES = ("r-base-core", "r-cran-lme4", "r-cran-jsonlite")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def ensure_r() -> str | None:
    """``Rscript`` with lme4 and jsonlite, installing Debian's packages if missing; None (with a reason printed)
    if that is not possible."""
    probe = ["Rscript", "-e", "suppressPackageStartupMessages({library(lme4); library(jsonlite)})"]

    def ok() -> bool:
        return shutil.which("Rscript") is not None and subprocess.run(probe, capture_output=True).returncode == 0

    if ok():
        return shutil.which("Rscript")
    if not shutil.which("apt-get"):
        print("  R with lme4 is missing and there is no apt-get: lme4 timings skipped")
        return None
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *R_PACKAGES]
    print(f"  installing {' '.join(R_PACKAGES)} (Debian) ...", flush=True)
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        print("  apt-get update ...", flush=True)
        subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  installing R failed ({r.stderr.strip()[-300:]}): lme4 timings skipped")
            return None
    if not ok():
        print("  R installed but lme4 does not load: lme4 timings skipped")
        return None
    print("  R installed", flush=True)
    return shutil.which("Rscript")


def _write(frame, fixed, path: Path) -> Path:
    frame.write_csv(path)
    path.with_suffix(".meta.json").write_text(json.dumps({"fixed": list(fixed), "n_obs": frame.height}))
    return path


def lme4_fits(rscript: str | None, csv: Path, nagqs=(1, 25)) -> dict[int, dict] | None:
    """lme4's default fits of a design CSV (one run per nAGQ), by nAGQ; None if R is not available."""
    if rscript is None:
        return None
    out = csv.with_suffix(".lme4.json")
    subprocess.run([rscript, str(TIMING_R), str(csv), str(out), *map(str, nagqs)], check=True)
    return {int(f["nAGQ"]): f for f in json.loads(out.read_text())["fits"]}


def time_ours(frame, fixed, nagq: int, repeats: int, one_thread: bool = False):
    """Median wall time of ``fit_glmm`` (checks included) over ``repeats`` fits, and the last result.

    ``one_thread``: the whole call with BLAS on one thread (the optimiser always is; the data checks' QR and
    statsmodels' matrix_rank are not, and a two-thread BLAS call can wait for a busy core on a shared machine).
    """
    from contextlib import nullcontext

    from cbp_platform.stats import fit_glmm
    from cbp_platform.stats._optimise import one_blas_thread

    times, res = [], None
    for _ in range(repeats):
        with one_blas_thread() if one_thread else nullcontext():
            t = time.perf_counter()
            res = fit_glmm(frame, "cbp", fixed, "site", nagq=nagq)
            times.append(time.perf_counter() - t)
    return statistics.median(times), res


def parts(frame, fixed) -> dict:
    """Where a fit's time goes (one run each, seconds): design, data checks (logistic IRLS, QR rank,
    separation), likelihood set-up, optimiser (Laplace, AGQ-25)."""
    from cbp_platform.stats._likelihood import GroupedLogitLikelihood
    from cbp_platform.stats._optimise import maximise, start_values
    from cbp_platform.stats.checks import design_checks
    from cbp_platform.stats.design import build_design
    from cbp_platform.stats.logistic import logistic_mle

    out = {}
    t = time.perf_counter()
    D = build_design(frame, "cbp", fixed, "site")
    out["design_s"] = time.perf_counter() - t
    t = time.perf_counter()
    logistic = logistic_mle(D.y, D.X)
    out["logistic_irls_s"] = time.perf_counter() - t
    t = time.perf_counter()
    design_checks(D, logistic=logistic)
    out["other_checks_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lik = GroupedLogitLikelihood(D.y, D.X, D.groups)
    start = start_values(lik, logistic)
    out["setup_and_start_s"] = time.perf_counter() - t
    for nagq in (1, 25):
        t = time.perf_counter()
        opt = maximise(lik, start, nagq)
        out[f"optimise_nagq{nagq}_s"] = time.perf_counter() - t
        out[f"evaluations_nagq{nagq}"] = opt.n_evaluations
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def run(repeats: int = 5, scale_repeats: int = 7) -> dict:
    import polars as pl

    from cbp_platform.stats import PAPER_COVARIATES, simulated_design
    from cbp_platform.stats.design import design_differences, multisite_design

    fixed = list(PAPER_COVARIATES)
    out: dict = {"load_at_start": _load(), "target_ratio": TARGET_RATIO}
    print(f"GLMM fit against lme4 (load average {out['load_at_start']})")
    ref = json.loads(FIXTURE.read_text())["design"]
    paper = simulated_design(ref["n_simulated"], ref["seed"]).frame
    diff = design_differences(paper, pl.read_parquet(FIXTURE.with_name(ref["values"])))
    if diff:
        raise RuntimeError(f"the simulated design differs from the lme4 fixture's ({'; '.join(diff)})")
    designs = {"paper5": (paper, "5 MRI sites, simulated_design(30868, 1)"),
               "nako18": (multisite_design(27518), "18 NAKO centres, multisite_design(27518)")}
    rscript = ensure_r()
    with tempfile.TemporaryDirectory(prefix="cbp-bench-lme4-") as tmp:
        for name, (frame, what) in designs.items():
            sites = frame.get_column("site").n_unique()
            print(f"{name}: {frame.height} rows, {len(fixed)} covariates + intercept, {sites} sites ({what})")
            theirs = lme4_fits(rscript, _write(frame, fixed, Path(tmp) / f"{name}.csv"))
            res_d: dict = {"rows": frame.height, "sites": sites, "description": what}
            for nagq in (1, 25):
                label = "laplace" if nagq == 1 else f"agq{nagq}"
                load = _load()
                ours, res = time_ours(frame, fixed, nagq, repeats)
                row = {"seconds": round(ours, 4), "load": load, "evaluations": res.diagnostics.n_evaluations}
                line = f"  {'Laplace' if nagq == 1 else 'AGQ-25 '}: ours {ours:.3f} s (median of {repeats})"
                if theirs is not None:
                    f = theirs[nagq]
                    dcoef = max(abs(res.coefficient(t)["estimate"] - b) for t, b in zip(f["terms"], f["estimate"]))
                    ratio = ours / f["elapsed_s"]
                    theta = f["theta"][0] if isinstance(f["theta"], list) else f["theta"]   # JSON unboxes length 1
                    row.update(lme4_seconds=round(f["elapsed_s"], 3), ratio_to_lme4=round(ratio, 5),
                               max_abs_coef_diff=float(f"{dcoef:.3g}"),
                               site_sd_diff=float(f"{abs(res.site_sd - theta):.3g}"),
                               loglik_diff=float(f"{res.loglik - f['loglik']:.3g}"))
                    line += (f", lme4 {f['elapsed_s']:.2f} s (one run) -> ratio {ratio:.4f} (target <= "
                             f"{TARGET_RATIO}){'' if ratio <= TARGET_RATIO else ' MISSED'}; max |coef - lme4| "
                             f"{dcoef:.1e}, logLik - lme4's {res.loglik - f['loglik']:.1e}")
                else:
                    line += ", lme4 not run"
                one, _ = time_ours(frame, fixed, nagq, repeats, one_thread=True)
                row["seconds_blas_one_thread"] = round(one, 4)
                if theirs is not None:
                    row["ratio_blas_one_thread"] = round(one / theirs[nagq]["elapsed_s"], 5)
                line += f"; ours with all of fit_glmm's BLAS on one thread {one:.3f} s"
                print(line + f" [load {load}]", flush=True)
                res_d[label] = row
            res_d["parts"] = parts(frame, fixed)
            print(f"  where the time goes (one run, s): {res_d['parts']}")
            out[name] = res_d

    print(f"scaling of ours (median of {scale_repeats}; lme4 at 300k rows "
          f"{'run' if os.environ.get('CBP_BENCH_LME4_300K') == '1' else 'skipped: minutes per fit'}):")
    scaling: dict = {}
    sizes = {"paper5": [(f"{k}k", simulated_design(n, ref['seed']).frame) for k, n in ((3, 3087), (30, 30868),
                                                                                          (300, 308680))],
             "nako18": [(f"{k}k", multisite_design(n)) for k, n in ((3, 2752), (30, 27518), (300, 275180))]}
    with tempfile.TemporaryDirectory(prefix="cbp-bench-lme4-") as tmp:
        for name, frames in sizes.items():
            scaling[name] = {}
            for label, frame in frames:
                row: dict = {"rows": frame.height}
                for nagq in (1, 25):
                    key = "laplace" if nagq == 1 else f"agq{nagq}"
                    load = _load()
                    sec, res = time_ours(frame, fixed, nagq, scale_repeats)
                    one, _ = time_ours(frame, fixed, nagq, scale_repeats, one_thread=True)
                    row[key] = {"seconds": round(sec, 4), "seconds_per_1k_rows": round(sec / frame.height * 1e3, 5),
                                "seconds_blas_one_thread": round(one, 4),
                                "seconds_per_1k_rows_blas_one_thread": round(one / frame.height * 1e3, 5),
                                "evaluations": res.diagnostics.n_evaluations, "load": load}
                    print(f"  {name} {label} ({frame.height} rows) {key:>7}: {sec:.3f} s, "
                          f"{sec / frame.height * 1e6:.2f} ms per 1k rows; BLAS on one thread {one:.3f} s, "
                          f"{one / frame.height * 1e6:.2f} ms per 1k rows; {res.diagnostics.n_evaluations} "
                          f"evaluations [load {load}]", flush=True)
                if label == "300k" and os.environ.get("CBP_BENCH_LME4_300K") == "1" and rscript:
                    theirs = lme4_fits(rscript, _write(frame, fixed, Path(tmp) / f"{name}{label}.csv"))
                    for nagq, f in theirs.items():
                        row["laplace" if nagq == 1 else f"agq{nagq}"]["lme4_seconds"] = round(f["elapsed_s"], 3)
                scaling[name][label] = row
            for key in ("laplace", "agq25"):
                n3, n30, n300 = (scaling[name][lb]["rows"] for lb in ("3k", "30k", "300k"))
                growth = {"rows_3k_to_30k": round(n30 / n3, 2), "rows_30k_to_300k": round(n300 / n30, 2)}
                for variant, field in (("", "seconds"), ("_blas_one_thread", "seconds_blas_one_thread")):
                    t3, t30, t300 = (scaling[name][lb][key][field] for lb in ("3k", "30k", "300k"))
                    growth[f"3k_to_30k{variant}"] = round(t30 / t3, 2)
                    growth[f"30k_to_300k{variant}"] = round(t300 / t30, 2)
                scaling[name][f"{key}_growth"] = growth
                print(f"  {name} {key}: time x{growth['3k_to_30k']:.1f} for rows x{n30 / n3:.1f} (3k -> 30k), "
                      f"x{growth['30k_to_300k']:.1f} for rows x{n300 / n30:.1f} (30k -> 300k); BLAS on one thread "
                      f"x{growth['3k_to_30k_blas_one_thread']:.1f} and x{growth['30k_to_300k_blas_one_thread']:.1f}")
    out["scaling"] = scaling
    out["lme4_300k"] = "run" if os.environ.get("CBP_BENCH_LME4_300K") == "1" else "skipped"
    out["load_at_end"] = _load()
    print(f"load average at the end {out['load_at_end']}")
    return out


if __name__ == "__main__":
    run()
