#!/usr/bin/env Rscript
# Reference fits of the random-intercept logistic GLMM with lme4, for tests/fixtures/lme4/.
#
#   cbp ~ <fixed effects of DESIGN.meta.json> + (1 | site),  family = binomial
#
# for the simulated designs the paper's adjusted model:
#   cbp ~ lmm_z2 + imat_z2 + age_10y + female + diabetes + dyslipidemia + osteoporosis + osteoarthritis
#         + pa_moderate + pa_high + (1 | site)
#
# fitted with nAGQ = 1 (Laplace) and nAGQ = 25 (adaptive Gauss-Hermite), each twice:
#   * "default": glmerControl() as shipped (the fit and the time a user of lme4 gets),
#   * "tight":   a converged-to-the-last-digit refit (bobyqa rhoend 1e-10, PIRLS tolerance 1e-12), the
#                reference our estimates are compared with: it removes lme4's optimizer tolerance from the
#                comparison, so that what is compared is the objective function.
#
# Usage (from the repository root):
#   .venv/bin/python -m cbp_platform.stats.reference --n 30868 --seed 1 --out /tmp/lme4/paper.csv
#   Rscript tools/lme4_reference.R /tmp/lme4/paper.csv tests/fixtures/lme4/paper.json
#   (small: --n 2240 --seed 3; clustered: --clustered --seed 20250101, whose CSV is also committed)
# The design CSV comes with DESIGN.meta.json (n, seed, sha256 of the design); it is copied into the output,
# so the Python test can regenerate the same design from (n, seed) and check its hash before comparing.
# Needs R >= 4.1 with lme4 and jsonlite (Debian: apt-get install r-base-core r-cran-lme4 r-cran-jsonlite).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) stop("usage: Rscript tools/lme4_reference.R DESIGN.csv OUT.json [nAGQ ...]")
csv <- args[[1]]
out <- args[[2]]
nagqs <- if (length(args) > 2) as.integer(args[-(1:2)]) else c(1L, 25L)

meta <- fromJSON(sub("\\.csv$", ".meta.json", csv))
d <- read.csv(csv, colClasses = c(site = "character"))
d$site <- factor(d$site, levels = sort(unique(d$site)))
form <- reformulate(c(meta$fixed, "(1 | site)"), response = "cbp")

controls <- list(
  default = glmerControl(),
  tight = glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                       optCtrl = list(rhobeg = 2e-2, rhoend = 1e-10, maxfun = 1e5))
)

fit_one <- function(nagq, label) {
  warns <- character()
  t0 <- proc.time()[["elapsed"]]
  m <- withCallingHandlers(
    glmer(form, data = d, family = binomial, nAGQ = nagq, control = controls[[label]]),
    warning = function(w) {
      warns <<- c(warns, conditionMessage(w))
      invokeRestart("muffleWarning")
    })
  elapsed <- proc.time()[["elapsed"]] - t0
  V <- as.matrix(vcov(m))
  re <- ranef(m, condVar = TRUE)$site
  theta <- unname(getME(m, "theta"))
  list(
    nAGQ = nagq,
    control = label,
    elapsed_s = elapsed,
    terms = names(fixef(m)),
    estimate = unname(fixef(m)),
    se = unname(sqrt(diag(V))),
    vcov = unname(V),
    theta = theta,                       # the site SD (binomial: scale 1, theta = sigma)
    site_variance = theta^2,
    loglik = as.numeric(logLik(m)),
    aic = AIC(m),
    nobs = nobs(m),
    ranef = list(site = rownames(re), mode = unname(re[, 1]),
                 cond_sd = unname(sqrt(attr(re, "postVar")[1, 1, ]))),
    optimizer = m@optinfo$optimizer,
    feval = m@optinfo$feval,
    optimizer_message = m@optinfo$message,
    lme4_messages = m@optinfo$conv$lme4$messages,
    warnings = warns,
    gradient = unname(m@optinfo$derivs$gradient),
    singular = isSingular(m)
  )
}

fits <- list()
for (label in names(controls)) {
  for (k in nagqs) {
    cat(sprintf("glmer nAGQ=%d control=%s ... ", k, label))
    f <- fit_one(k, label)
    cat(sprintf("%.2f s, logLik %.6f\n", f$elapsed_s, f$loglik))
    fits[[length(fits) + 1]] <- f
  }
}

res <- list(
  description = paste("lme4::glmer reference fits of the random-intercept logistic model on the design",
                      "described under 'design' (written by cbp_platform.stats.reference);",
                      "produced by tools/lme4_reference.R"),
  design = meta,
  formula = paste(deparse(form), collapse = " "),
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  created = format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z"),
  machine = paste(Sys.info()[["sysname"]], Sys.info()[["machine"]]),
  fits = fits
)
dir.create(dirname(out), showWarnings = FALSE, recursive = TRUE)
write_json(res, out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
cat("wrote", out, "\n")
