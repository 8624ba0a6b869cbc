"""Store backends behind one interface (``base.JobStore``), chosen by URL with ``open_store``."""
