"""Body-composition metrics from label maps and Dixon images, and agreement statistics."""
