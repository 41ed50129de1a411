"""Back-muscle segmentation (MONAI): network bundle, preprocessing, training, inference."""
