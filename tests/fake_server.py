"""`python -m tests.fake_server [streamlit run options]`: the app (app/main.py) served by streamlit with
`tests.app_fixtures.FakePredictor` in place of the runs' real Predictor, for the browser test and the bench.

The swap is the in-process tests' monkeypatch of the app's one predictor factory, `app.state.load_predictor`,
made in the server's own process before streamlit starts (streamlit runs the pages in this process and they
import the same `app.state` module), so the product code reads no environment variable for it.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from app import state
    from app.__main__ import main as serve
    from tests.app_fixtures import FakePredictor

    state.load_predictor = FakePredictor.load
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
