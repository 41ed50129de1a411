#!/usr/bin/env Rscript
# Fit time of lme4::glmer on one design, for the speed benchmark (benchmarks/bench_stats.py, `make bench`).
#
#   cbp ~ <fixed effects of DESIGN.meta.json> + (1 | site),  family = binomial,  glmerControl() as shipped
#
# fitted once per nAGQ (default 1 = Laplace and 25 = adaptive Gauss-Hermite); the elapsed time of each glmer()
# call (proc.time, reading the CSV excluded) is printed and written as JSON with the estimates, so that the
# benchmark can compare the answers as well as the times. The reference fixtures are tools/lme4_reference.R's.
#
# Usage: Rscript tools/lme4_timing.R DESIGN.csv OUT.json [nAGQ ...]
# DESIGN.meta.json beside the CSV names the fixed effects ("fixed"), as for tools/lme4_reference.R.
# Needs R >= 4.1 with lme4 and jsonlite (Debian: apt-get install r-base-core r-cran-lme4 r-cran-jsonlite).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) stop("usage: Rscript tools/lme4_timing.R DESIGN.csv OUT.json [nAGQ ...]")
csv <- args[[1]]
out <- args[[2]]
nagqs <- if (length(args) > 2) as.integer(args[-(1:2)]) else c(1L, 25L)

meta <- fromJSON(sub("\\.csv$", ".meta.json", csv))
d <- read.csv(csv, colClasses = c(site = "character"))
d$site <- factor(d$site, levels = sort(unique(d$site)))
form <- reformulate(c(meta$fixed, "(1 | site)"), response = "cbp")

fits <- list()
for (k in nagqs) {
  cat(sprintf("  lme4 glmer nAGQ=%d on %d rows, %d sites ... ", k, nrow(d), nlevels(d$site)))
  warns <- character()
  t0 <- proc.time()[["elapsed"]]
  m <- withCallingHandlers(
    glmer(form, data = d, family = binomial, nAGQ = k, control = glmerControl()),
    warning = function(w) {
      warns <<- c(warns, conditionMessage(w))
      invokeRestart("muffleWarning")
    })
  elapsed <- proc.time()[["elapsed"]] - t0
  cat(sprintf("%.2f s, logLik %.6f\n", elapsed, as.numeric(logLik(m))))
  fits[[length(fits) + 1]] <- list(
    nAGQ = k,
    elapsed_s = elapsed,
    terms = names(fixef(m)),
    estimate = unname(fixef(m)),
    se = unname(sqrt(diag(as.matrix(vcov(m))))),
    theta = unname(getME(m, "theta")),
    loglik = as.numeric(logLik(m)),
    feval = m@optinfo$feval,
    warnings = warns
  )
}

res <- list(
  design = meta,
  rows = nrow(d),
  sites = nlevels(d$site),
  formula = paste(deparse(form), collapse = " "),
  control = "glmerControl() (default)",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  created = format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z"),
  fits = fits
)
dir.create(dirname(out), showWarnings = FALSE, recursive = TRUE)
write_json(res, out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
