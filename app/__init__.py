"""The CMG analysis app (Streamlit). Entry point: `streamlit run app/main.py` from the repository root."""
