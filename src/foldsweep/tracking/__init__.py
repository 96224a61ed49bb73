"""MLflow behind one small seam: sweep run -> study runs -> trial runs, written in batches.

Only this package imports mlflow, so the rest of foldsweep depends on these few names, not on
MLflow's API, and a sweep with tracking off never pays for it.

A trial's run is created and filled when the trial ends (one create, a few `log_batch` calls, one
terminate), so tracking costs a handful of calls per trial whatever the number of epochs and folds.
`NullTracker` stands in when tracking is off. The sweep run also carries provenance tags and, while
it runs, MLflow's system metrics (CPU, memory, GPU); `serve_ui` shows the same store in the MLflow UI.

Layout: `tracker` (the trackers), `writer` (the trial-run writer process), `provenance` (tags and
system metrics), `store` (SQLite paths, WAL, lock retries), `ui` (the MLflow UI server).
"""

from __future__ import annotations

from foldsweep.tracking.provenance import provenance_tags
from foldsweep.tracking.tracker import MlflowTracker, NullTracker, make_tracker
from foldsweep.tracking.ui import experiment_links, serve_ui, ui_command

__all__ = ["MlflowTracker", "NullTracker", "experiment_links", "make_tracker", "provenance_tags", "serve_ui",
           "ui_command"]
