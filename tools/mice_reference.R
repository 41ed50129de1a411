#!/usr/bin/env Rscript
# Reference pooling of the multiply imputed GLMM with lme4 + mice, for tests/fixtures/mice/.
#
# Reads the m completed data sets that cbp_platform.stats.imputation wrote (one long CSV, column .imp = 1..m),
# fits on each
#   cbp ~ lmm_z2 + imat_z2 + age_10y + female + diabetes + dyslipidemia + osteoporosis + osteoarthritis
#         + pa_moderate + pa_high + (1 | site),  family = binomial, nAGQ = 25
# with the tight control of tools/lme4_reference.R (bobyqa rhoend 1e-10, PIRLS tolerance 1e-12), and pools the
# fixed effects with mice::pool (Rubin's rules, Barnard-Rubin df; broom.mixed tidies the merMod fits; dfcom from
# glance's df.residual = observations - parameters). The imputation itself is Python's; what is cross-checked
# is the GLMM on each completed data set and the pooling.
#
# Usage (from the repository root):
#   .venv/bin/python -m cbp_platform.stats.imputation --write-reference --n 2240 --seed 3 --out /tmp/mice/small
#   Rscript tools/mice_reference.R /tmp/mice/small.csv tests/fixtures/mice/small.json
#   cp /tmp/mice/small.imputations.parquet tests/fixtures/mice/
# Needs R >= 4.1 with lme4, mice, broom.mixed and jsonlite (Debian: r-cran-lme4 r-cran-mice r-cran-broom.mixed
# r-cran-jsonlite).

suppressPackageStartupMessages({
  library(lme4)
  library(mice)
  library(broom.mixed)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) stop("usage: Rscript tools/mice_reference.R IMPUTED.csv OUT.json [nAGQ]")
csv <- args[[1]]
out <- args[[2]]
nagq <- if (length(args) > 2) as.integer(args[[3]]) else 25L

meta <- fromJSON(sub("\\.csv$", ".meta.json", csv))
long <- read.csv(csv, colClasses = c(site = "character"))
imps <- sort(unique(long$.imp))
form <- reformulate(c(meta$fixed, "(1 | site)"), response = "cbp")
control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                        optCtrl = list(rhobeg = 2e-2, rhoend = 1e-10, maxfun = 1e5))

t0 <- proc.time()[["elapsed"]]
fits <- lapply(imps, function(i) {
  d <- long[long$.imp == i, ]
  d <- d[order(d$.id), ]
  d$site <- factor(d$site, levels = sort(unique(d$site)))
  glmer(form, data = d, family = binomial, nAGQ = nagq, control = control)
})
elapsed_fit <- proc.time()[["elapsed"]] - t0
t1 <- proc.time()[["elapsed"]]
pooled <- pool(as.mira(fits))
elapsed_pool <- proc.time()[["elapsed"]] - t1
p <- pooled$pooled
s <- summary(pooled, conf.int = TRUE)

per_fit <- lapply(fits, function(m) list(estimate = unname(fixef(m)), se = unname(sqrt(diag(as.matrix(vcov(m))))),
                                         theta = unname(getME(m, "theta")), loglik = as.numeric(logLik(m)),
                                         df_residual = df.residual(m), singular = isSingular(m)))

res <- list(
  description = paste("lme4::glmer fits on the m completed data sets written by cbp_platform.stats.imputation,",
                      "pooled with mice::pool; produced by tools/mice_reference.R"),
  design = meta,
  formula = paste(deparse(form), collapse = " "),
  nAGQ = nagq,
  control = "tight (bobyqa rhoend 1e-10, tolPwrss 1e-12)",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  mice_version = as.character(packageVersion("mice")),
  broom_mixed_version = as.character(packageVersion("broom.mixed")),
  created = format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z"),
  machine = paste(Sys.info()[["sysname"]], Sys.info()[["machine"]]),
  elapsed_fit_s = elapsed_fit,
  elapsed_pool_s = elapsed_pool,
  m = length(fits),
  terms = as.character(p$term),
  pooled = list(estimate = p$estimate, ubar = p$ubar, b = p$b, t = p$t, dfcom = p$dfcom, df = p$df,
                riv = p$riv, lambda = p$lambda, fmi = p$fmi),
  summary = list(std_error = s$std.error, statistic = s$statistic, df = s$df, p_value = s$p.value,
                 conf_low = s[["2.5 %"]], conf_high = s[["97.5 %"]]),
  fits = per_fit
)
dir.create(dirname(out), showWarnings = FALSE, recursive = TRUE)
write_json(res, out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
cat(sprintf("%d fits in %.1f s, pooled in %.2f s; wrote %s\n", length(fits), elapsed_fit, elapsed_pool, out))
