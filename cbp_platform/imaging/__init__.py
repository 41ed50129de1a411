"""Imaging I/O helpers shared by the simulator and the pipeline."""
