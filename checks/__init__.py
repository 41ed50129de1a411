"""Asset checks: Great Expectations 1.x suites, image QC, model QC."""
