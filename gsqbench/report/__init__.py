"""HTML comparison reports (tables, plots, reconstruction grids) rendered from results files, without torch."""
from gsqbench.report.render import render_compare, render_regress, render_report

__all__ = ["render_report", "render_regress", "render_compare"]
