"""Reports of a finished run: summary tables, plots, grids and report.md, and sweep comparisons."""
