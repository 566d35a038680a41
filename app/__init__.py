"""The CMG analysis app (Streamlit). Entry point: `python -m app` (or `streamlit run app/main.py`) from the
repository root."""
