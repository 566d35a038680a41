"""`python -m app [streamlit run options]` (what `make app` runs): the analysis app (app/main.py and pages/),
with the modules its pages read imported before the server starts listening, so the first page a browser opens
does not also pay for importing pandas, plotly and the run readers (about 2.5 s on 2 cores). None of them
imports torch; the pages that score or train import it when they do."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from streamlit.web import cli

MAIN = Path(__file__).resolve().parent / "main.py"


def preload() -> None:
    """Import what the pages import (once per server process; streamlit runs the pages in this process)."""
    # before the server runs, each st.cache_data decorator would log that it has no runtime yet (it needs none)
    logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)
    import app.components  # noqa: F401
    import app.imaging  # noqa: F401
    import app.latent_maps  # noqa: F401
    import app.plots  # noqa: F401
    import app.state  # noqa: F401
    import app.tables  # noqa: F401
    import app.training  # noqa: F401
    import app.uploads  # noqa: F401
    import cmg_core.audit_report  # noqa: F401


def main(argv: list[str]) -> int:
    preload()
    return cli.main(["run", str(MAIN), *argv], prog_name="streamlit")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
