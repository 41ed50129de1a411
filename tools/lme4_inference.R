#!/usr/bin/env Rscript
# lme4 reference values for the GLMM's inference (tests/fixtures/lme4/<name>.inference.json):
#   profile-likelihood CIs        confint(fit, method = "profile")
#   the site effect               performance::icc (adjusted ICC, latent scale), the MOR from theta
#   tests                         anova(restricted, full) (LRT of nested models); the site variance against 0
#                                 (2 (logLik(glmer) - logLik(glm)), chi-square(1) p and its half, the boundary p)
#   predictions                   fitted(fit), predict(fit, re.form = NA, type = "response"),
#                                 residuals(fit, type = "pearson")
# for nAGQ = 1 (Laplace) and nAGQ = 25, each fit converged tightly (bobyqa rhoend 1e-10, PIRLS 1e-12) so that what
# is compared is the objective, not lme4's optimiser tolerance.
#
# Usage (from the repository root; the design CSV is written by the test helper, see docs/statistics.md):
#   .venv/bin/python -c "import polars as pl; pl.read_parquet('tests/fixtures/lme4/fivesite.parquet')\
#       .write_csv('/tmp/fivesite.csv')"
#   Rscript tools/lme4_inference.R /tmp/fivesite.csv tests/fixtures/lme4/fivesite.inference.json \
#       "lmm_z2 + imat_z2 + age_10y + female + diabetes + dyslipidemia + osteoporosis + osteoarthritis + pa_moderate + pa_high" pa_high
#   Rscript tools/lme4_inference.R tests/fixtures/lme4/clustered.csv tests/fixtures/lme4/clustered.inference.json "x1 + x2" x2
# The last argument is the term the restricted model of the LRT drops.
# Needs R >= 4.1 with lme4, jsonlite and performance (Debian: r-cran-lme4 r-cran-jsonlite r-cran-performance).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
  library(performance)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 4) stop("usage: Rscript tools/lme4_inference.R DESIGN.csv OUT.json 'x1 + x2' DROPPED_TERM")
csv <- args[[1]]; out <- args[[2]]; rhs <- args[[3]]; dropped <- args[[4]]
d <- read.csv(csv, colClasses = c(site = "character"))
d$site <- factor(d$site, levels = sort(unique(d$site)))
full <- as.formula(paste("cbp ~", rhs, "+ (1 | site)"))
restricted <- update(full, as.formula(paste(". ~ . -", dropped)))
fixed_only <- as.formula(paste("cbp ~", rhs))
tight <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                      optCtrl = list(rhobeg = 2e-2, rhoend = 1e-10, maxfun = 1e5))

# The profile computed directly on lme4's own deviance function (glmer(..., devFunOnly = TRUE), over
# c(theta, beta)): each point minimises the deviance over the other parameters (bobyqa, theta >= 0), each bound
# is the root of the signed square root zeta = -+ qnorm(0.975) (uniroot, tol 1e-9). This is what
# confint(method = "profile") computes, without its spline interpolation; it is also there where lme4 1.1-31's
# profile.merMod stops with "Profiling over both the residual variance and fixed effects is not numerically
# consistent" (its check of devfun2, restarted from u = 0, against logLik at the 1e-5 relative level: many small
# clusters trip it).
exact_profile <- function(m, nagq) {
  devf <- glmer(full, data = d, family = binomial, nAGQ = nagq, devFunOnly = TRUE)
  opt <- c(unname(getME(m, "theta")), unname(fixef(m)))
  base <- devf(opt)
  V <- as.matrix(vcov(m))
  se <- c(NA, sqrt(diag(V)))
  q <- qnorm(0.975)
  pdev <- function(j, v) {
    free <- setdiff(seq_along(opt), j)
    start <- opt[free]
    f <- function(x) { p <- opt; p[free] <- x; p[j] <- v; devf(p) }
    lower <- ifelse(free == 1, 0, -Inf)
    r <- minqa::bobyqa(start, f, lower = lower, control = list(rhobeg = 0.02, rhoend = 1e-9, maxfun = 1e5))
    r$fval
  }
  zeta <- function(j, v) sign(v - opt[j]) * sqrt(max(0, pdev(j, v) - base))
  bound <- function(j, side) {
    target <- side * q
    if (j == 1 && side < 0) {
      if (opt[1] < 1e-4 || zeta(1, 0) >= target) return(0)
      return(uniroot(function(v) zeta(1, v) - target, c(0, opt[1]), tol = 1e-9)$root)
    }
    step <- if (j == 1) max(0.25, opt[1]) else q * se[j]
    a <- opt[j]; b <- opt[j] + side * step
    while ((zeta(j, b) - target) * side < 0) { a <- b; b <- opt[j] + 2 * (b - opt[j]) }
    uniroot(function(v) zeta(j, v) - target, sort(c(a, b)), tol = 1e-9)$root
  }
  lo <- sapply(seq_along(opt), bound, side = -1)
  hi <- sapply(seq_along(opt), bound, side = 1)
  list(parameter = c("sd_(Intercept)|site", names(fixef(m))), lower = lo, upper = hi, deviance = base)
}

one <- function(nagq) {
  cat(sprintf("nAGQ=%d: fit ... ", nagq))
  m1 <- glmer(full, data = d, family = binomial, nAGQ = nagq, control = tight)
  m0 <- glmer(restricted, data = d, family = binomial, nAGQ = nagq, control = tight)
  g0 <- glm(fixed_only, data = d, family = binomial)
  cat("profile ... ")
  t0 <- proc.time()[["elapsed"]]
  ci <- tryCatch(confint(m1, method = "profile", level = 0.95, oldNames = FALSE),
                 error = function(e) { cat("confint(profile) failed:", conditionMessage(e), "\n"); NULL })
  profile_s <- proc.time()[["elapsed"]] - t0
  t0 <- proc.time()[["elapsed"]]
  exact <- exact_profile(m1, nagq)
  exact_s <- proc.time()[["elapsed"]] - t0
  cat(sprintf("%.1f s, exact %.1f s\n", profile_s, exact_s))
  theta <- unname(getME(m1, "theta"))
  ic <- performance::icc(m1)
  an <- anova(m0, m1)
  lrt_var <- as.numeric(2 * (logLik(m1) - logLik(g0)))
  list(
    nAGQ = nagq,
    terms = names(fixef(m1)),
    estimate = unname(fixef(m1)),
    theta = theta,
    loglik = as.numeric(logLik(m1)),
    profile = if (is.null(ci)) NULL else list(parameter = rownames(ci), lower = unname(ci[, 1]),
                                                upper = unname(ci[, 2]), elapsed_s = profile_s),
    profile_exact = c(exact, list(elapsed_s = exact_s)),
    icc_adjusted = unname(ic$ICC_adjusted),
    mor = exp(sqrt(2 * theta^2) * qnorm(0.75)),
    lrt = list(dropped = dropped, loglik_restricted = as.numeric(logLik(m0)), chisq = an$Chisq[[2]],
               df = an$Df[[2]], p = an[["Pr(>Chisq)"]][[2]], aic = unname(an$AIC), bic = unname(an$BIC)),
    variance_test = list(loglik_glm = as.numeric(logLik(g0)), statistic = lrt_var,
                         p_naive = pchisq(lrt_var, 1, lower.tail = FALSE),
                         p_boundary = 0.5 * pchisq(lrt_var, 1, lower.tail = FALSE)),
    fitted = unname(fitted(m1)),
    predict_population = unname(predict(m1, re.form = NA, type = "response")),
    resid_pearson = unname(residuals(m1, type = "pearson")),
    singular = isSingular(m1)
  )
}

res <- list(
  description = "lme4 reference values for profile CIs, ICC/MOR, LRTs and predictions (tools/lme4_inference.R)",
  design = basename(csv), formula = paste(deparse(full), collapse = " "), dropped = dropped,
  R_version = R.version.string, lme4_version = as.character(packageVersion("lme4")),
  performance_version = as.character(packageVersion("performance")),
  created = format(Sys.time(), "%Y-%m-%dT%H:%M:%S%z"),
  fits = list(one(1L), one(25L))
)
write_json(res, out, auto_unbox = TRUE, digits = NA, pretty = FALSE)
cat("wrote", out, "\n")
